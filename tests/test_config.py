"""Config validation, presets, run ids."""
import dataclasses
import re

import pytest
from conftest import committed_records

from kdlib.checks import check_bits, check_num_classes, format_bits, parse_bits
from kdlib.config import RunConfig, validate
from kdlib.presets import PRESETS, build_config, get_preset


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16, 32, 5, 12])
def test_supported_bits_accepted(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bits", [0, -1, 17, 33, 2.5, "four", "4", None, True])
def test_bad_bits_name_value_and_accepted(bits):
    with pytest.raises(ValueError, match=r"w_bits=.*accepted: an integer in 1\.\.16 or 32"):
        check_bits(bits, "w_bits")


@pytest.mark.parametrize("value", [1, 0, -3, True, 2.0, "10"])
def test_bad_num_classes_refused(value):
    with pytest.raises(ValueError, match="num_classes="):
        check_num_classes(value)
    assert check_num_classes(2) == 2


@pytest.mark.parametrize("w_bits, a_bits", [(4, 8), (8, 4), (1, 32), (2, 2)])
def test_format_bits_is_the_inverse_of_parse_bits(w_bits, a_bits):
    assert parse_bits(format_bits(w_bits, a_bits)) == (w_bits, a_bits)


@pytest.mark.parametrize("spec, bits", [
    (4, (4, 4)), ("4", (4, 4)), (" 8 ", (8, 8)), ("4/8", (4, 8)), ("32/2", (32, 2)),
    ((2, 8), (2, 8)), ([8, 4], (8, 4)),
])
def test_parse_bits_reads_every_spelling_of_a_width(spec, bits):
    """A width as the command line gives it (text) or as a notebook or script writes it
    (numbers, pairs): weights first, activations second, the same run either way."""
    assert parse_bits(spec) == bits


@pytest.mark.parametrize("spec, message", [
    ("4/x", "bits='4/x' is not 'W/A'"), ("4/8/2", "bits='4/8/2' is not 'W/A'"),
    ("4/0", "a_bits=0"), ("0/4", "w_bits=0"), ((4, 33), "a_bits=33"), ("four", "w_bits='four'"),
])
def test_parse_bits_refuses_a_bad_width_naming_it(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_bits(spec)


@pytest.mark.parametrize("field, value, pattern", [
    ("model", "vgg99", r"model='vgg99' is unknown; accepted: .*resnet20"),
    ("method", "magic", r"method='magic' is unknown"),
    ("quantizer", "xnor", r"quantizer='xnor' is unknown; accepted: dorefa, pact, lsq"),
    ("lr", -0.1, r"lr=-0.1 is invalid"),
    ("lr", 0.0, r"lr=0.0 is invalid"),
    ("epochs", 0, r"epochs=0 is invalid"),
    ("epochs", -3, r"epochs=-3 is invalid"),
    ("epochs", 2.5, r"epochs=2.5 is invalid; expected an integer"),
    ("kd_alpha", 1.5, r"kd_alpha=1.5 is invalid"),
    ("kd_alpha", -0.1, r"kd_alpha=-0.1 is invalid"),
    ("kd_temperature", 0, r"kd_temperature=0 is invalid"),
    ("kd_temperature", -2.0, r"kd_temperature=-2.0 is invalid"),
    ("w_bits", 0, r"w_bits=0 is not supported"),
    ("a_bits", 33, r"a_bits=33 is not supported"),
    ("a_bits", "four", r"a_bits='four' is not supported"),
    ("schedule", "linear", r"schedule='linear' is unknown; accepted: cosine, multistep"),
    ("train_size", 49000, r"train_size=49000 is invalid"),
    ("batch_size", 0, r"batch_size=0 is invalid"),
    ("val_size", 20000, r"val_size=20000 is invalid"),
    ("test_size", 20000, r"test_size=20000 is invalid"),
    ("train_size", 1000.5, r"train_size=1000.5 is invalid; expected an integer"),
    ("momentum", 1.5, r"momentum=1.5 is invalid"),
    ("weight_decay", -0.1, r"weight_decay=-0.1 is invalid"),
    ("lr_gamma", 0.0, r"lr_gamma=0.0 is invalid"),
    ("warmup_epochs", 201, r"warmup_epochs=201 is invalid"),  # more than the 200 epochs
    ("label_smoothing", 1.5, r"label_smoothing=1.5 is invalid"),
    ("milestones", (0.75, 0.5), r"milestones=\[0.75, 0.5\] must be increasing"),
    ("milestones", (0.0, 0.5), r"milestones=0.0 is invalid"),
    ("group_weights", "yes", r"group_weights='yes' is invalid; expected True or False"),
    ("epochs", True, r"epochs=True is invalid"),
    ("seed", -1, r"seed=-1 is invalid"),
    ("split_seed", -1, r"split_seed=-1 is invalid"),
    ("recipe", -1, r"recipe=-1 is invalid"),
    ("kd_mode", "fitnet", r"kd_mode='fitnet' is unknown; accepted: hinton, apprentice"),
    ("precision", "fp16", r"precision='fp16' is unknown"),
    ("eval_batch_size", 0, r"eval_batch_size=0 is invalid"),
    ("num_classes", 1, r"num_classes="),
])
def test_validate_rejects_bad_values(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate(RunConfig().replace(**{field: value}))


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['epoch'\]"):
        RunConfig.from_dict({"epoch": 3})


def test_run_id_stable_and_sensitive():
    a = RunConfig(epochs=3)
    assert a.run_id() == RunConfig(epochs=3).run_id()
    assert a.run_id() != RunConfig(epochs=4).run_id()
    assert a.run_id() != a.replace(teacher_id="x").run_id()
    # execution-only settings do not change what is trained
    assert a.run_id() == a.replace(eval_batch_size=17, preset="other").run_id()
    assert a.run_id().startswith("resnet20-individual-w32a32-s0-")


def _another(value):
    """A value of another kind than ``value``'s default, for the run id only (not validated)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, tuple):
        return (*value, 0.9)
    return f"{value}-other"  # str, or None


def test_every_field_but_the_execution_only_ones_is_in_the_run_id():
    """Above all ``recipe``: a code change that changes numbers bumps it, so old records of the
    same settings are not taken for new ones."""
    from kdlib.config import EXECUTION_ONLY_FIELDS

    base = RunConfig()
    for field in dataclasses.fields(RunConfig):
        changed = base.replace(**{field.name: _another(getattr(base, field.name))})
        assert (changed.run_id() == base.run_id()) == (field.name in EXECUTION_ONLY_FIELDS), \
            field.name


def test_round_trip_through_dict():
    cfg = RunConfig(milestones=(0.3, 0.6), w_bits=4)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_build_valid_configs():
    for name, preset in PRESETS.items():
        student = build_config(name, "resnet20")
        teacher = build_config(name, "resnet20", teacher=True)
        assert student.preset == name and teacher.preset == name
        for key, value in preset.teacher_run.items():
            assert getattr(teacher, key) == value
        assert list(preset.chain) == sorted(preset.chain, reverse=True) and preset.chain[0] == 32


def test_overrides_win_over_preset_and_are_validated():
    assert build_config("smoke", overrides={"epochs": 7}).epochs == 7
    assert build_config("smoke", teacher=True, overrides={"epochs": 7}).epochs == 7
    with pytest.raises(ValueError, match="epochs=-1"):
        build_config("smoke", overrides={"epochs": -1})


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"preset='fast' is unknown; accepted: smoke, quick, "
                                         r"quick_squeezenet, gpu, paper"):
        get_preset("fast")


def test_every_field_is_documented_beside_its_definition():
    """The README's field list is rendered from these comments: a new field needs one."""
    from kdlib.config import describe_fields

    rows = describe_fields()
    assert [r["field"] for r in rows] == [f.name for f in dataclasses.fields(RunConfig)]
    assert [r["field"] for r in rows if not r["meaning"]] == []
    assert {"field": "kd_alpha", "default": "0.9",
            "meaning": "weight of the KD term; 1-alpha on the CE term"} in rows


def test_field_list_keeps_every_meaning_in_its_cell():
    """GitHub ends a table cell at a bare '|': `dorefa | pact | lsq` showed as `dorefa`, and
    kd_temperature's formula was cut at its '||'."""
    from kdlib.report import render_config_fields

    rows = render_config_fields().splitlines()[2:]
    cells = {row.split("|")[1].strip(): re.split(r"(?<!\\)\|", row)[1:-1] for row in rows}
    assert cells.keys() == {f.name for f in dataclasses.fields(RunConfig)}
    assert {len(parts) for parts in cells.values()} == {3}
    assert cells["quantizer"][2].strip() == r"dorefa \| pact \| lsq"
    assert r"softmax(t/T) \|\| softmax(s/T)" in cells["kd_temperature"][2]


def test_preset_descriptions_state_their_epochs():
    checked = 0
    for preset in PRESETS.values():
        teacher = re.search(r"teacher (\d+) epochs", preset.description)
        if teacher:
            teacher_epochs = build_config(preset.name, teacher=True).epochs
            assert int(teacher.group(1)) == teacher_epochs, preset.name
            checked += 1
        link = re.search(r"(\d+) epochs? per chain link", preset.description)
        if link:
            assert int(link.group(1)) == build_config(preset.name).epochs, preset.name
            checked += 1
    assert checked >= 4


def test_a_legacy_record_config_is_read_as_recipe_1():
    legacy = {k: v for k, v in RunConfig().to_dict().items() if k not in ("precision", "recipe")}
    cfg = RunConfig.from_dict({**legacy, "bf16": False})
    assert cfg.recipe == 1 and cfg.precision == "exact"
    assert cfg.run_id() != RunConfig().run_id()


@pytest.mark.parametrize("overrides", [{"preset": "paper"}, {"model": "resnet20"}])
def test_an_override_of_the_preset_or_model_is_refused_not_ignored(overrides):
    with pytest.raises(ValueError, match=f"overrides name \\['{next(iter(overrides))}'\\]"):
        build_config("smoke", "resnet8", overrides=overrides)
    cfg = build_config("smoke", "resnet8", overrides={"epochs": 3})
    assert (cfg.preset, cfg.model, cfg.epochs) == ("smoke", "resnet8", 3)


@pytest.mark.parametrize("method", ["teacher", "individual"])
def test_a_starting_point_the_method_does_not_take_is_refused(method):
    """`individual` with an init would be a fine-tune under its name; no method but the KD ones
    takes a teacher. Every method takes what its planner gives it."""
    from kdlib.config import INIT_METHODS, KD_METHODS, METHODS

    with pytest.raises(ValueError, match=f"init_id is set but method='{method}' starts from "
                                         "random weights; methods that start from a trained"):
        validate(RunConfig(method=method, init_id="r"))
    with pytest.raises(ValueError, match=f"teacher_id is set but method='{method}' distils "):
        validate(RunConfig(method=method, teacher_id="t"))
    for other in METHODS:
        validate(RunConfig(method=other, init_id="r" if other in INIT_METHODS else None,
                           teacher_id="t" if other in KD_METHODS else None))
    with pytest.raises(ValueError, match="teacher_id is set but method='finetune'.*"
                                         r"\(KD_METHODS in kdlib/config.py\)$"):
        validate(RunConfig(method="finetune", init_id="r", teacher_id="t"))
    with pytest.raises(ValueError, match=r"\(INIT_METHODS in kdlib/config.py\)$"):
        validate(RunConfig(method="individual", init_id="r"))


def test_run_id_names_model_method_bits_and_seed():
    cfg = RunConfig(model="resnet8", method="finetune", w_bits=4, a_bits=8, seed=3, split_seed=5)
    assert re.fullmatch(r"resnet8-finetune-w4a8-s3-[0-9a-f]{10}", cfg.run_id())


def test_the_execution_only_fields_are_these_and_no_more():
    """The run-id test above takes the list as given; this pins the list itself (a field taken
    in or out changes every id, and the committed records would no longer be found)."""
    from kdlib.config import EXECUTION_ONLY_FIELDS

    assert set(EXECUTION_ONLY_FIELDS) == {"eval_batch_size", "preset", "cuda_graphs",
                                          "group_weights"}
    base = RunConfig()
    assert base.replace(group_weights=False, cuda_graphs=True).run_id() == base.run_id()
    assert base.replace(precision="bf16").run_id() != base.run_id()


def test_every_committed_record_is_found_under_its_configs_run_id():
    """A run id is a function of the config alone: the committed records, written by this
    recipe, must still be named by it (a change to the hash would retrain them all)."""
    import json

    from kdlib.config import recipe_for

    checked = 0
    for path in committed_records():
        record = json.loads(path.read_text())
        cfg = RunConfig.from_dict(record["config"])
        if cfg.recipe != recipe_for(cfg.quantizer):
            continue
        assert cfg.run_id() == record["run_id"] == path.stem, path
        checked += 1
    assert checked >= 100


def test_cuda_graphs_and_compile_are_not_combined():
    with pytest.raises(ValueError, match="does not combine with compile=True"):
        validate(RunConfig(cuda_graphs=True, compile=True))
    assert validate(RunConfig(cuda_graphs=True)).cuda_graphs


# What the README's preset table (and the preset's own description) states as its protocol (the
# data, the epochs, the seeds): a value changed here changes what every result of it means.
README_PROTOCOL = {
    "smoke": dict(run=dict(train_size=200, epochs=1), teacher=dict(epochs=2)),
    "quick": dict(run=dict(train_size=None, val_size=5000, test_size=None, lr=0.05,
                           schedule="cosine", channels_last=True),
                  teacher=dict(schedule="cosine"), seeds=(0, 1, 2)),
    "quick_squeezenet": dict(run=dict(train_size=8000, val_size=2500, test_size=None),
                             seeds=(0, 1, 2)),
    "gpu": dict(run=dict(train_size=None, val_size=5000, test_size=None, lr=0.05,
                         batch_size=128, schedule="cosine", channels_last=True),
                teacher=dict(schedule="cosine"), seeds=(0, 1, 2)),
    "paper": dict(run=dict(train_size=None, val_size=5000, test_size=None, epochs=200, lr=0.1,
                           weight_decay=5e-4, batch_size=128, schedule="cosine",
                           channels_last=True, compile=True),
                  teacher=dict(epochs=200, lr=0.1), seeds=(0, 1, 2)),
}


@pytest.mark.parametrize("name", sorted(README_PROTOCOL))
def test_each_preset_keeps_the_protocol_the_readme_states(name):
    """The README's preset table (paper: 200 epochs x seeds 0 1 2, the 45k/5k split, the full
    10k test set; smoke: a 200-image slice, 1 epoch, teacher 2)."""
    protocol = README_PROTOCOL[name]
    student, teacher = build_config(name), build_config(name, teacher=True)
    for cfg, expected in ((student, protocol["run"]), (teacher, protocol.get("teacher", {}))):
        assert {k: getattr(cfg, k) for k in expected} == expected
    if "seeds" in protocol:
        assert tuple(get_preset(name).seeds) == protocol["seeds"]


def test_the_presets_that_run_the_quick_grid_run_its_methods():
    """`gpu` is the quick grid at GPU scale; `quick_squeezenet` is it but `finetune` (README):
    their contrasts are set beside quick's, method by method. `smoke` (plumbing in seconds)
    trains fewer images and epochs than any of them."""
    quick, gpu, squeeze = (get_preset(n) for n in ("quick", "gpu", "quick_squeezenet"))
    assert (gpu.chain, gpu.chain_methods, gpu.methods) == (quick.chain, quick.chain_methods,
                                                           quick.methods)
    assert (squeeze.chain, squeeze.chain_methods) == (quick.chain, quick.chain_methods)
    assert squeeze.methods == tuple(m for m in quick.methods if m != "finetune")
    smoke = build_config("smoke")
    assert all(smoke.train_size < (build_config(n).train_size or 45_000)
               and smoke.epochs <= build_config(n).epochs for n in PRESETS if n != "smoke")


def test_every_committed_result_is_a_run_its_preset_still_plans():
    """The committed grids (results/<preset>/runs) were trained with the presets' values: a value
    changed under them would plan other run ids, retrain the whole grid and leave the README's
    results describing a preset that no longer exists."""
    import json

    from kdlib.config import recipe_for
    from kdlib.experiments import plan_grid

    records = committed_records()  # a local smoke run's records are no committed grid
    checked = 0
    for name in PRESETS:
        configs = [RunConfig.from_dict(json.loads(p.read_text())["config"])
                   for p in records if p.parent.parent.name == name]
        configs = [c for c in configs if c.recipe == recipe_for(c.quantizer)]
        if not configs:
            continue
        seeds = sorted({c.seed for c in configs})
        planned = {cfg.run_id() for model in {c.model for c in configs}
                   for cfg in plan_grid(preset=name, model=model, seeds=seeds)}
        assert [c.run_id() for c in configs if c.run_id() not in planned] == [], name
        checked += len(configs)
    assert checked >= 100


def test_the_default_preset_is_the_one_make_runs_and_the_readme_shows():
    """`python -m kdlib` and `make` must write the results the README's results section names."""
    from pathlib import Path

    from kdlib.presets import DEFAULT_PRESET

    root = Path(__file__).resolve().parent.parent
    make_default = re.search(r"^PRESET \?= (\S+)$", (root / "Makefile").read_text(), re.M)
    assert make_default and make_default.group(1) == DEFAULT_PRESET
    assert f"## Results (preset `{DEFAULT_PRESET}`" in (root / "README.md").read_text()


def test_a_config_is_made_at_its_quantizers_recipe():
    """Recipe 3 changed PACT's and LSQ's numbers only: DoReFa configs keep recipe 2, and with it
    their run ids and committed records; a config switched to another quantizer takes that
    one's recipe, an explicit recipe (an old record's) stays."""
    from kdlib.config import RECIPE_OF_QUANTIZER, RECIPE_VERSION, recipe_for
    from kdlib.checks import QUANTIZERS

    assert set(RECIPE_OF_QUANTIZER) == set(QUANTIZERS)
    assert max(RECIPE_OF_QUANTIZER.values()) == RECIPE_VERSION
    assert RunConfig().recipe == recipe_for("dorefa") == 2
    assert RunConfig(quantizer="pact").recipe == RunConfig(quantizer="lsq").recipe == 3
    assert RunConfig().replace(quantizer="lsq").recipe == 3
    assert RunConfig(quantizer="lsq").replace(quantizer="dorefa").recipe == 2
    assert RunConfig(quantizer="pact", recipe=2).replace(epochs=3).recipe == 2
    old = RunConfig.from_dict({**RunConfig(quantizer="pact").to_dict(), "recipe": 2})
    assert old.run_id() != RunConfig(quantizer="pact").run_id()  # never reused as today's
