"""CIFAR's pixels coded as prediction residuals for the lease's data archive: a byte-for-byte
bijection that xz compresses about 18% smaller than the raw pixels under delta filters.

Every call of a lease carries the tree beside a data part, so the smaller the archive,
the fewer calls the data takes (and the more the tree may grow before it takes one more). Each
image is coded as its green plane and the red and blue planes' signed differences from green
(the colours move together), each pixel as its difference (mod 256) from the median edge
detector's prediction (LOCO-I / JPEG-LS: from the left, upper and upper-left pixels, zero
outside the image). Only the pickled pixel array's bytes change, in place and at the same
length, so the file around them (labels, names) stays as it was, and the decoded file is
checked against the original's sha256 on the device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PIXEL_CODING = "med-green-v1"  # the manifest names it; a manifest of another coding is rebuilt
SIDE = 32
IMAGE_BYTES = 3 * SIDE * SIDE  # planar R, G, B rows of 32 bytes, as CIFAR stores them


def locate_pixels(path: Path) -> dict[str, int] | None:
    """Where the pickled file ``path`` holds its ``data`` array's raw bytes: ``{"offset",
    "images"}``, or None where they are not there once and contiguously (then the file travels
    uncoded)."""
    from kdlib.data import _unpickle  # lazy: the device only decodes

    pixels = np.ascontiguousarray(_unpickle(Path(path)).get("data", np.empty(0)))
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != IMAGE_BYTES \
            or not len(pixels):
        return None
    raw, needle = Path(path).read_bytes(), pixels.tobytes()
    offset = raw.find(needle[:4096])
    if offset < 0 or raw[offset:offset + len(needle)] != needle \
            or raw.find(needle[:4096], offset + 1) >= 0:
        return None
    return {"offset": offset, "images": len(pixels)}


def _med(left: np.ndarray, up: np.ndarray, upleft: np.ndarray) -> np.ndarray:
    """The median edge detector: the smaller of left and up under an edge above or to the
    left (upper-left beyond both), the larger over one, else the plane through the three."""
    hi, lo = np.maximum(left, up), np.minimum(left, up)
    return np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))


def encode_pixels(pixels: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8 RGB images -> (N, 3072) uint8 residuals (green, red - green, blue -
    green planes, each pixel less its prediction from its coded neighbours, mod 256)."""
    rgb = pixels.reshape(-1, 3, SIDE, SIDE).astype(np.int16)
    planes = np.stack([rgb[:, 1], rgb[:, 0] - rgb[:, 1], rgb[:, 2] - rgb[:, 1]], axis=1)
    padded = np.pad(planes, ((0, 0), (0, 0), (1, 0), (1, 0)))  # zero row above, column left
    predicted = _med(padded[..., 1:, :-1], padded[..., :-1, 1:], padded[..., :-1, :-1])
    return ((planes - predicted) & 255).astype(np.uint8).reshape(len(pixels), IMAGE_BYTES)


def decode_pixels(residuals: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_pixels`: pixel by pixel in raster order (each prediction
    needs its decoded neighbours), all images and planes at once."""
    n = len(residuals)
    # position-major, so that each step reads and writes contiguous (plane, image) blocks
    coded = np.ascontiguousarray(residuals.reshape(n, 3, SIDE, SIDE).transpose(2, 3, 1, 0)
                                 ).astype(np.int16)
    planes = np.zeros((SIDE + 1, SIDE + 1, 3, n), dtype=np.int16)  # green, red - g, blue - g
    rgb = np.empty((SIDE, SIDE, 3, n), dtype=np.uint8)
    for i in range(SIDE):
        for j in range(SIDE):
            value = _med(planes[i + 1, j], planes[i, j + 1], planes[i, j]) + coded[i, j]
            green = value[0] & 255
            red, blue = (green + value[1]) & 255, (green + value[2]) & 255
            planes[i + 1, j + 1] = green, red - green, blue - green
            rgb[i, j] = red, green, blue
    return np.ascontiguousarray(rgb.transpose(3, 2, 0, 1)).reshape(n, IMAGE_BYTES)


def recode_file(raw: bytes, span: dict[str, Any], *, encode: bool) -> bytes:
    """``raw`` (a pickled file's bytes) with the pixels at ``span`` (:func:`locate_pixels`)
    encoded, or decoded back."""
    start, end = span["offset"], span["offset"] + span["images"] * IMAGE_BYTES
    block = np.frombuffer(raw, dtype=np.uint8, count=end - start, offset=start)
    block = block.reshape(span["images"], IMAGE_BYTES)
    coded = encode_pixels(block) if encode else decode_pixels(block)
    return raw[:start] + coded.tobytes() + raw[end:]
