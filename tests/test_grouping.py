"""Runs pool only when their whole configuration but the seed agrees (issue: trustworthy
records)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kdlib.config import RunConfig
from kdlib.results import (chain_contrasts, load_results, paired_contrast, save_record,
                           setting_ids, summarise, summary_table)


def _record(cfg: RunConfig, top1: float, **extra) -> dict:
    metrics = {"best_epoch": 1, "best_val_top1": top1, "best_val_top5": 0.0, "test_top1": top1,
               "test_top5": 0.0, "final_test_top1": top1, "final_test_top5": 0.0}
    return {"run_id": cfg.run_id(), "config": cfg.to_dict(), "metrics": metrics,
            "history": [{}], **extra}


def _teacher(seed: int) -> RunConfig:
    return RunConfig(model="resnet8", method="teacher", seed=seed, epochs=2)


def _link(method: str, bits: int, seed: int, init: RunConfig, teacher: RunConfig | None, **kw):
    return RunConfig(model="resnet8", method=method, w_bits=bits, a_bits=bits, seed=seed,
                     init_id=init.run_id(), teacher_id=teacher.run_id() if teacher else None, **kw)


def _write(tmp_path, rows):
    for cfg, top1 in rows:
        save_record(tmp_path, _record(cfg, top1))
    return load_results(tmp_path)


def test_seeds_share_a_setting_but_two_chains_do_not(tmp_path):
    rows = []
    for seed in (0, 1):
        t = _teacher(seed)
        rows.append((t, 50.0))
        long8 = _link("ta_chain", 8, seed, t, t)  # 32 -> 8 -> 2
        rows += [(long8, 40.0), (_link("ta_chain", 2, seed, long8, long8), 30.0 + seed)]
        short = _link("ta_chain", 2, seed, t, t)  # 32 -> 2, same method and bits, other chain
        rows.append((short, 20.0 + seed))
    frame = _write(tmp_path, rows)
    two_bit = frame[frame["w_bits"] == 2]
    assert two_bit["setting"].nunique() == 2  # the chains differ
    assert two_bit.groupby("setting")["seed"].nunique().tolist() == [2, 2]  # seeds share one
    summary = summarise(frame)
    rows2 = summary[summary["w_bits"] == 2].sort_values("mean")
    assert rows2["mean"].tolist() == [20.5, 30.5] and rows2["n"].tolist() == [2, 2]


def test_another_temperature_is_another_row_not_another_seed(tmp_path):
    rows = []
    for seed in (0, 1, 2):
        t = _teacher(seed)
        rows.append((t, 50.0))
        rows.append((_link("direct_kd", 4, seed, t, t, kd_temperature=4.0), 40.0))
        rows.append((_link("direct_kd", 4, seed, t, t, kd_temperature=2.0), 30.0))
    summary = summarise(_write(tmp_path, rows))
    kd = summary[summary["method"] == "direct_kd"]
    assert sorted(kd["mean"]) == [30.0, 40.0] and kd["n"].tolist() == [3, 3]
    assert kd["std"].tolist() == [0.0, 0.0]


def test_contrast_refuses_to_mix_settings(tmp_path):
    rows = []
    for seed in (0, 1):
        t = _teacher(seed)
        rows += [(t, 50.0), (_link("progressive", 4, seed, t, None), 35.0)]
        rows.append((_link("direct_kd", 4, seed, t, t, kd_alpha=0.9), 40.0))
        rows.append((_link("direct_kd", 4, seed, t, t, kd_alpha=0.5), 38.0))
    frame = _write(tmp_path, rows)
    # kd_alpha is shared: progressive (alpha 0.9 by default) pairs with the 0.9 run only
    got = paired_contrast(frame, "direct_kd", "progressive")
    assert got["mean"].tolist() == [5.0] and got["n"].tolist() == [2]
    mixed = frame[frame["method"] != "progressive"].assign(kd_alpha=0.9)  # hide the difference
    mixed = mixed.assign(method=mixed["method"].where(mixed["method"] != "teacher", "progressive"))
    with pytest.raises(ValueError, match="several settings"):
        paired_contrast(mixed, "direct_kd", "progressive")


def test_a_record_older_than_an_execution_only_field_still_pairs(tmp_path):
    """A seed's chain trained before `group_weights` existed (its record lacks the field) pairs
    with that seed's control trained after: the field never changes what is computed."""
    rows = []
    for seed in (0, 1):
        t = _teacher(seed)
        chain16 = _link("ta_chain", 16, seed, t, t)
        rows += [(t, 50.0), (chain16, 45.0), (_link("ta_chain", 8, seed, chain16, chain16), 40.0),
                 (_link("progressive_kd32", 8, seed, chain16, t), 41.0 + seed)]
    for cfg, top1 in rows:
        record = _record(cfg, top1)
        if cfg.method == "ta_chain" and cfg.seed == 0:
            del record["config"]["group_weights"], record["config"]["cuda_graphs"]
        save_record(tmp_path, record)
    got = chain_contrasts(load_results(tmp_path))
    row = got[(got["contrast"] == "ta_chain − progressive_kd32") & (got["w_bits"] == 8)].iloc[0]
    assert row["n"] == 2 and row["mean"] == pytest.approx(-1.5)


def test_contrast_interval_matches_a_paired_t_test_and_drops_unpaired_seeds(tmp_path):
    a = [41.0, 43.5, 42.0, 44.0]
    b = [40.0, 41.0, 41.5, 42.0]
    rows = []
    for seed in range(4):
        t = _teacher(seed)
        chain16 = _link("ta_chain", 16, seed, t, t)
        rows += [(t, 50.0), (chain16, 45.0),
                 (_link("ta_chain", 8, seed, chain16, chain16), a[seed]),
                 (_link("progressive_kd32", 8, seed, chain16, t), b[seed])]
    t5 = _teacher(5)
    chain16 = _link("ta_chain", 16, 5, t5, t5)
    rows += [(t5, 50.0), (chain16, 45.0), (_link("ta_chain", 8, 5, chain16, chain16), 99.0)]
    got = chain_contrasts(_write(tmp_path, rows))  # seed 5 has no progressive_kd32: left out
    row = got[(got["contrast"] == "ta_chain − progressive_kd32") & (got["w_bits"] == 8)].iloc[0]
    diff = np.subtract(a, b)
    assert row["n"] == 4 and row["mean"] == pytest.approx(diff.mean())
    low, high = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert row["ci95_low"] == pytest.approx(low) and row["ci95_high"] == pytest.approx(high)
    assert math.isclose(row["std"], diff.std(ddof=1))


def test_summary_csv_holds_methods_then_contrasts(tmp_path):
    rows = []
    for seed in (0, 1):
        t = _teacher(seed)
        link = _link("ta_chain", 4, seed, t, t)
        rows += [(t, 50.0), (link, 40.0 + seed), (_link("progressive", 4, seed, t, None), 38.0)]
    table = summary_table(_write(tmp_path, rows))
    assert table["method"].tolist()[-1] == "ta_chain − progressive"
    assert table.iloc[-1]["mean"] == pytest.approx(2.5)


def test_settings_of_unknown_teachers_fall_back_to_their_seedless_name():
    t0, t1 = _teacher(0), _teacher(1)
    recs = [_record(_link("direct_kd", 4, s, t, t), 1.0) for s, t in ((0, t0), (1, t1))]
    ids = setting_ids(recs)
    assert len(set(ids.values())) == 1  # the teachers' seeds and hashes are stripped


def test_execution_only_fields_do_not_split_a_setting():
    teacher = _teacher(0)
    base = _link("individual", 4, 0, teacher, None)
    other = base.replace(seed=1, eval_batch_size=base.eval_batch_size * 2, preset="other")
    records = [_record(teacher, 60.0), _record(base, 40.0), _record(other, 41.0)]
    ids = setting_ids(records)
    assert ids[base.run_id()] == ids[other.run_id()]
    changed = base.replace(lr=base.lr / 2)  # a field that changes the numbers still splits
    assert setting_ids([*records, _record(changed, 40.0)])[changed.run_id()] != ids[base.run_id()]


def test_a_setting_does_not_depend_on_the_order_of_a_records_config_keys():
    """A record written with its config in another key order (by hand, by another writer) is
    the same setting: its seeds still pool."""
    teacher = _teacher(0)
    a, b = (_link("direct_kd", 4, seed, teacher, teacher) for seed in (0, 1))
    reordered = _record(b, 1.0)
    reordered["config"] = dict(reversed(list(reordered["config"].items())))
    ids = setting_ids([_record(teacher, 1.0), _record(a, 1.0), reordered])
    assert ids[a.run_id()] == ids[b.run_id()]


def test_the_same_init_under_another_teacher_is_another_setting():
    """A distilled run's setting includes its teacher's setting: the same init and config
    distilled from two different teachers must not pool as seeds of one setting."""
    teacher, longer = _teacher(0), _teacher(0).replace(epochs=3)
    a = _link("direct_kd", 2, 0, teacher, teacher)
    b = _link("direct_kd", 2, 0, teacher, longer)  # same init, another teacher
    ids = setting_ids([_record(cfg, 1.0) for cfg in (teacher, longer, a, b)])
    assert a.run_id() != b.run_id() and ids[a.run_id()] != ids[b.run_id()]
    again = _link("direct_kd", 2, 1, _teacher(1), _teacher(1))  # another seed, same setting
    ids = setting_ids([_record(cfg, 1.0) for cfg in (teacher, _teacher(1), a, again)])
    assert ids[a.run_id()] == ids[again.run_id()]


def test_the_same_teacher_from_another_init_is_another_setting():
    """A run's setting includes its init run's setting: the same teacher and config started
    from two different inits (32-bit teacher vs an 8-bit link) are two settings."""
    teacher = _teacher(0)
    link8 = _link("ta_chain", 8, 0, teacher, teacher)
    a = _link("ta_chain", 2, 0, teacher, teacher)
    b = _link("ta_chain", 2, 0, link8, teacher)  # same teacher, another init
    ids = setting_ids([_record(cfg, 1.0) for cfg in (teacher, link8, a, b)])
    assert a.run_id() != b.run_id() and ids[a.run_id()] != ids[b.run_id()]


def test_a_contrast_does_not_pair_runs_of_another_kd_temperature():
    """Pairs must agree on every shared hyperparameter: the KD temperature is not a method
    field, so a chain at T = 4 has no pair in a control at T = 2 (nothing, not a mixed
    difference), and pairs once both are at T = 4."""
    rows = [{"model": "resnet8", "method": method, "w_bits": 2, "a_bits": 2, "seed": seed,
             "kd_temperature": temp, "test_top1": 40.0 + seed + gain}
            for seed in (0, 1, 2)
            for method, temp, gain in (("ta_chain", 4.0, 1.0), ("progressive_kd32", 2.0, 0.0))]
    frame = pd.DataFrame(rows)
    assert paired_contrast(frame, "ta_chain", "progressive_kd32").empty
    same = frame.assign(kd_temperature=4.0)
    row = paired_contrast(same, "ta_chain", "progressive_kd32").iloc[0]
    assert row["n"] == 3 and row["mean"] == pytest.approx(1.0)
