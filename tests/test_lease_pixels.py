"""The lease's data archive codes CIFAR's pixels as prediction residuals: the coding must be a
bijection (the device rebuilds the original files, checked by sha256: the archive's round
trip is tests/test_lease.py's), must be the median edge detector it claims (checked against a
pixel-by-pixel reference), and must pay (fewer bytes than the delta-filtered raw pixels, on
real images)."""
import lzma

import numpy as np
import pytest

from kdlib.data import _unpickle
from kdlib.fake_data import write_pickle
from kdlib.lease.pixels import (IMAGE_BYTES, decode_pixels, encode_pixels, locate_pixels,
                                recode_file)
from kdlib.lease.transfer import XZ_FILTERS

# what the archive used before the residuals: xz's delta filters on the raw pixels
DELTA_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_DELTA, "dist": 32},
                 {"id": lzma.FILTER_LZMA2, "preset": 6}]


def _images(kind: str, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "random":
        return rng.integers(0, 256, (n, IMAGE_BYTES), dtype=np.uint8)
    if kind == "extremes":  # 0 and 255 side by side in every plane: the differences wrap
        return rng.choice(np.array([0, 1, 254, 255], dtype=np.uint8), (n, IMAGE_BYTES))
    value = {"black": 0, "white": 255}[kind]
    return np.full((n, IMAGE_BYTES), value, dtype=np.uint8)


@pytest.mark.parametrize("kind", ["random", "extremes", "black", "white"])
def test_residuals_decode_to_the_same_pixels(kind):
    pixels = _images(kind)
    residuals = encode_pixels(pixels)
    assert residuals.dtype == np.uint8 and residuals.shape == pixels.shape
    assert np.array_equal(decode_pixels(residuals), pixels)


def _reference_residuals(image: np.ndarray) -> np.ndarray:
    """One image coded pixel by pixel, written from the definition: planes G, R - G, B - G;
    each pixel less the median edge detector's prediction from its neighbours (0 outside)."""
    r, g, b = (image.reshape(3, 32, 32).astype(int)[c] for c in range(3))
    out = []
    for plane in (g, r - g, b - g):
        for i in range(32):
            for j in range(32):
                a = plane[i, j - 1] if j else 0          # left
                up = plane[i - 1, j] if i else 0        # above
                c = plane[i - 1, j - 1] if i and j else 0
                if c >= max(a, up):
                    guess = min(a, up)
                elif c <= min(a, up):
                    guess = max(a, up)
                else:
                    guess = a + up - c
                out.append((plane[i, j] - guess) % 256)
    return np.array(out, dtype=np.uint8)


def test_the_coding_is_the_median_edge_detector_on_green_and_colour_differences():
    ramp = np.add.outer(np.arange(32), 3 * np.arange(32)).astype(np.uint8)
    smooth = np.concatenate([(ramp + 10).ravel(), ramp.ravel(), (ramp + 20).ravel()])  # R G B
    pixels = np.vstack([_images("random", 2), _images("extremes", 1), smooth[None]])
    for image, residuals in zip(pixels, encode_pixels(pixels)):
        assert np.array_equal(residuals, _reference_residuals(image))
    # a flat colour leaves one residual a plane, its first pixel: what makes the coding pay
    flat = np.repeat(np.array([110, 100, 120], dtype=np.uint8), 32 * 32)[None]
    assert np.flatnonzero(encode_pixels(flat)[0]).tolist() == [0, 1024, 2048]


def test_a_file_is_recoded_only_inside_its_pixels(fake_data_root, tmp_path):
    path = fake_data_root / "cifar-100-python" / "test"
    span = locate_pixels(path)
    raw = path.read_bytes()
    assert span == {"offset": span["offset"], "images": 200}
    start, end = span["offset"], span["offset"] + 200 * IMAGE_BYTES
    coded = recode_file(raw, span, encode=True)
    assert len(coded) == len(raw) and coded[:start] == raw[:start] and coded[end:] == raw[end:]
    assert coded[start:end] != raw[start:end]
    assert coded[start:end] == encode_pixels(
        np.frombuffer(raw[start:end], dtype=np.uint8).reshape(200, IMAGE_BYTES)).tobytes()
    assert recode_file(coded, span, encode=False) == raw
    assert locate_pixels(fake_data_root / "cifar-100-python" / "meta") is None  # no pixels
    floats = tmp_path / "floats"
    write_pickle({b"data": np.zeros((2, IMAGE_BYTES), dtype=np.float32)}, floats)
    assert locate_pixels(floats) is None  # not CIFAR's bytes: the file travels as it is


def test_rows_that_are_not_32x32_rgb_images_travel_uncoded(tmp_path):
    grey = tmp_path / "grey"
    write_pickle({b"data": np.arange(2 * 1024, dtype=np.uint8).reshape(2, 1024)}, grey)
    assert locate_pixels(grey) is None


@pytest.mark.parametrize("case", ["floats", "pairs", "twice", "decoy"])
def test_pixels_not_once_whole_and_as_uint8_rows_travel_uncoded(case, tmp_path):
    """Only an (N, 3072) uint8 array whose bytes the file holds once, whole and in order is
    coded: another dtype or shape, a second copy of the bytes, or a block that only starts like
    them leaves the file as it is."""
    pixels = _images("random", 3)
    write_pickle({b"data": pixels}, tmp_path / "once")
    assert locate_pixels(tmp_path / "once")["images"] == 3
    rows = np.random.default_rng(2).random((2, IMAGE_BYTES), dtype=np.float32)
    obj = {"floats": {b"data": rows},
           "pairs": {b"data": np.repeat(pixels[..., None], 2, axis=2)},  # (N, 3072, 2) uint8
           "twice": {b"data": pixels, b"copy": pixels.tobytes()},
           # a block that starts as the pixels do, then the pixels stored column-major
           "decoy": {b"decoy": pixels.tobytes()[:4096] + b"\0",
                     b"data": np.asfortranarray(pixels)}}[case]
    write_pickle(obj, tmp_path / case)
    assert locate_pixels(tmp_path / case) is None


@pytest.mark.realdata
@pytest.mark.slow
def test_real_images_coded_take_fewer_bytes_than_delta_filtered(real_data_root):
    pixels = np.ascontiguousarray(
        _unpickle(real_data_root / "cifar-100-python" / "test")["data"][:2000])
    before = len(lzma.compress(pixels.tobytes(), format=lzma.FORMAT_XZ, filters=DELTA_FILTERS))
    after = len(lzma.compress(encode_pixels(pixels).tobytes(), format=lzma.FORMAT_XZ,
                              filters=XZ_FILTERS))
    assert after < 0.88 * before, (after, before)
