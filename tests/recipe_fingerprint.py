"""The training recipe's fingerprint: what a tiny fixed grid computes, hashed.

A run id hashes a run's configuration, and ``kdlib.config.RECIPE_VERSION`` is part of it, so a
change of training code that changes the numbers must bump that version, or records made by
the old code are silently reused and pooled with new ones. This module trains a small grid on
generated data (every method's path: CE and KD, random, teacher and link init, 32, 16, 4 and
1 bit, DoReFa, PACT and LSQ, channels_last, exact and bf16) and hashes its losses and
accuracies; ``tests/recipe_fingerprints.json`` keeps the hash per recipe version and per
machine (processor and torch build: floating-point kernels differ between processors, so
another CPU computes other last bits). ``test_recipe.py`` compares. CUDA's own paths (TF32,
replayed steps, torch.compile) are not covered here.

    python tests/recipe_fingerprint.py            # print this machine's fingerprint
    python tests/recipe_fingerprint.py --record   # store it for the current recipe version
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

FINGERPRINTS = Path(__file__).with_name("recipe_fingerprints.json")
TINY = {"train_size": 200, "val_size": 100, "test_size": 100, "batch_size": 50}
GRIDS = (  # (plan_grid arguments): the chain's methods and the students at every width
    dict(chain=[32, 16, 4, 1], chain_methods=["ta_chain", "progressive"],
         methods=["individual", "direct_kd"], overrides={**TINY, "channels_last": True}),
    dict(chain=[32, 4], chain_methods=["ta_chain"], methods=["individual"],
         overrides={**TINY, "quantizer": "pact"}),
    dict(chain=[32, 4], chain_methods=["ta_chain"], methods=["individual"],
         overrides={**TINY, "quantizer": "lsq"}),
    dict(chain=[32, 4], chain_methods=["progressive"], methods=["direct_kd"],
         overrides={**TINY, "precision": "bf16"}),  # the opt-in mode's own arithmetic
)
NUMBERS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")  # per epoch


def machine() -> str:
    """Whose last bits a fingerprint holds: the processor and the torch build."""
    from kdlib.device import cpu_model

    return f"{cpu_model() or 'unknown CPU'}, torch {torch.__version__}"


def fingerprint(data_root: str | os.PathLike, results_dir: str | os.PathLike,
                grids: tuple[dict, ...] = GRIDS) -> str:
    """sha256 of every run's per-epoch numbers and test metrics, one thread, no TensorBoard."""
    from kdlib import experiments

    threads, tensorboard = torch.get_num_threads(), os.environ.get("KDLIB_TENSORBOARD")
    torch.set_num_threads(1)  # another thread count may sum in another order
    os.environ["KDLIB_TENSORBOARD"] = "0"
    try:
        numbers = {}
        for i, grid in enumerate(grids):
            plan = experiments.plan_grid(preset="smoke", model="resnet8", seeds=[0], **grid)
            for record in experiments.execute(plan, data_dir=data_root, progress=False,
                                              results_dir=Path(results_dir) / str(i)):
                numbers[record["run_id"]] = {
                    "history": [{k: row[k] for k in NUMBERS} for row in record["history"]],
                    "metrics": record["metrics"]}
    finally:  # as it was: the tests that run after this one see no difference
        torch.set_num_threads(threads)
        if tensorboard is None:
            os.environ.pop("KDLIB_TENSORBOARD", None)
        else:
            os.environ["KDLIB_TENSORBOARD"] = tensorboard
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()


def stored() -> dict[str, dict[str, str]]:
    """{recipe version: {machine: fingerprint}}."""
    return json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.exists() else {}


def compute() -> str:
    from kdlib.fake_data import write_fake_cifar100

    with tempfile.TemporaryDirectory() as tmp:
        return fingerprint(write_fake_cifar100(Path(tmp) / "data"), Path(tmp) / "results")


def main(argv: list[str] | None = None) -> int:
    from kdlib.config import RECIPE_VERSION

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true",
                        help=f"store it in {FINGERPRINTS.name} under recipe {RECIPE_VERSION}")
    args = parser.parse_args(argv)
    value = compute()
    print(f"recipe {RECIPE_VERSION} on {machine()}: {value}")
    if args.record:
        table = stored()
        table.setdefault(str(RECIPE_VERSION), {})[machine()] = value
        FINGERPRINTS.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        print(f"stored in {FINGERPRINTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kdlib from this checkout
    sys.exit(main())
