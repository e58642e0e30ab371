"""Which run trained what: two methods whose runs train the same thing (the same config but
for the method name, from the same teacher and init) are one training, recorded under the
first name and copied under the other (``same_run_as``)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

from kdlib.config import EXECUTION_ONLY_FIELDS, RunConfig
from kdlib.results import load_records


def training_key(cfg: RunConfig, canonical: Callable[[str | None], str | None]) -> str:
    """What a run trains, whatever it is called: its config without the method name and the
    execution-only fields, with its teacher and init runs replaced by the runs that actually
    trained them (``canonical``). Two methods with one key are one training run."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in (*EXECUTION_ONLY_FIELDS, "method")}
    d["teacher_id"], d["init_id"] = canonical(cfg.teacher_id), canonical(cfg.init_id)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class TrainedIndex:
    """Which run trained what, in one results folder (none: an empty index, for a plan alone):
    training key -> run id, and each alias run id -> the run id that trained it."""

    def __init__(self, results_dir: str | os.PathLike | None = None):
        self.by_key: dict[str, str] = {}
        self.alias_of: dict[str, str] = {}
        for record in load_records(results_dir) if results_dir is not None else []:
            if record.get("same_run_as"):
                self.alias_of[record["run_id"]] = record["same_run_as"]
            elif record.get("training_key"):
                self.by_key.setdefault(record["training_key"], record["run_id"])

    def canonical(self, run_id: str | None) -> str | None:
        return self.alias_of.get(run_id, run_id) if run_id is not None else None

    def key(self, cfg: RunConfig) -> str:
        return training_key(cfg, self.canonical)

    def claim(self, cfg: RunConfig) -> str:
        """The run id that trains ``cfg``: a run known to train the same thing, else ``cfg``'s
        own, noted so that a later run that trains the same thing is its alias."""
        run_id = cfg.run_id()
        trained_as = self.by_key.setdefault(self.key(cfg), run_id)
        if trained_as != run_id:
            self.alias_of[run_id] = trained_as
        return trained_as
