"""What crosses between this machine and a lent one: the names, the limits, and files split
into parts checked by their sha256s (see :mod:`kdlib.lease`)."""
from __future__ import annotations

import hashlib
import lzma
import os
from pathlib import Path
from typing import Any

LEASE_DIR = ".lease"  # in the repository root; ignored by git, named in each call's carry
# on the lent machine: survives between calls, not leases ($KDLIB_LEASE_STASH for rehearsals)
STASH = Path(os.environ.get("KDLIB_LEASE_STASH") or "/dev/shm/kdlib-lease")
DATA_MANIFEST = "data.json"
STASH_PLAN = "stash.json"  # what each call stores: checked by every later call's `store`
STASH_INCOMPLETE_EXIT = 3  # `lease store`'s exit status when earlier calls' files are missing
DATA_FILES = ("meta", "train", "test")  # of cifar-100-python/
CALL_MIB = 64  # what one call may carry: the travelling tree, the carried paths
CALL_MARGIN_MIB = 3  # the manifest, the calls file, files written between prepare and the call
MIN_PART_MIB = 4
OUT_FILE_MIB = 15  # returned files: at most 16 MiB each
OUT_MAX_FILES = 8
RESULTS_ARCHIVE = "results.tar"
RETURN_MANIFEST = "manifest.json"  # beside the returned parts
CALLS_FILE = "calls.json"  # in LEASE_DIR: the calls prepare printed
AGAIN_FILE = "again.json"  # in LEASE_DIR: the follow-up call
# the data archive's pixels are prediction residuals (kdlib.lease.pixels), small numbers
# around 0 with little left for a delta filter: plain LZMA2 whose literals are coded in the
# context of the byte before them (lc=4) and not of their position (lp=pb=0): 95.9 MiB for
# the three files (`lease prepare` prints it), 117.5 MiB with xz's delta filters on the raw
# pixels (tests/test_lease_pixels.py compares the two). lzma reads the filters back there.
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 4, "lp": 0, "pb": 0}]
CALL_TIMEOUT_S = 600  # the device tool's limit for one command
COMMAND_MAX_CHARS = 2000  # and for its command line
GO_GRACE_S = 20  # `go` is interrupted this long after its --minutes (it plans to end before)
PACK_S = 25  # packing and the return, after `go` ended or was interrupted
KILL_AFTER_S = 15  # `go` still running this long after its interruption is killed
# one more call on the machine while it is warm, for the device time the session has left
# (the reply's lease.budget_left_s, put in for AGAIN_LEFT): `go` for that less AGAIN_GO_MARGIN_S
# (the tree's transfer, go's grace, pack, the return, and slack), never under AGAIN_MIN_S
AGAIN_LEFT = "SECONDS_LEFT"
AGAIN_GO_MARGIN_S = 100
AGAIN_MIN_S = 200
RETURNED = "returned"  # in the stash: a copy of what each `pack` of this machine returned
CALL_LOG = "calls.jsonl"  # in the stash: when each step of each call ran there
MIB = 1 << 20
CARRIED_MANIFEST = "sha256.json"
CARRIED_SUFFIX = ".xz"
# a checkpoint holds the weights twice (now and at the best epoch: often the same values) and
# xz finds the repeat: 3.4 MB of ResNet-20 checkpoint carry as 2.06 MB (measured on twelve)
CARRIED_XZ_PRESET = 6


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def split_into_parts(blob: bytes, folder: Path, stem: str, part_bytes: int) -> list[dict[str, Any]]:
    parts = []
    for i, start in enumerate(range(0, len(blob), part_bytes)):
        path = folder / f"{stem}.{i:02d}"
        path.write_bytes(blob[start:start + part_bytes])
        parts.append({"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    return parts


def join_parts(folder: Path, manifest: dict[str, Any]) -> bytes:
    """The parts named in ``manifest``, each checked, concatenated and checked as a whole."""
    chunks = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: carry {LEASE_DIR}/{part['name']} in a "
                                    f"call and run `python3 -m kdlib lease store` on it first")
        if sha256_of(path) != part["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in the manifest: carry it again")
        chunks.append(path.read_bytes())
    blob = b"".join(chunks)
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError("the reassembled archive does not match its sha256: parts from two "
                         "different `lease prepare` runs? Prepare again and carry all parts")
    return blob
