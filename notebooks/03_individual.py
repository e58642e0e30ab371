# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The controls: individual, finetune, direct KD, direct KD on the chain's budget
#
# Every bit width trained four more ways, so the chain's gain can be attributed:
#
# | method | init | teacher | epochs |
# |---|---|---|---|
# | `individual` | random | none (cross-entropy only) | the teacher's schedule (fair trained-alone baseline) |
# | `finetune` | 32-bit teacher weights | none | one link's |
# | `direct_kd` | 32-bit teacher weights | the 32-bit teacher | one link's |
# | `direct_kd_matched` | 32-bit teacher weights | the 32-bit teacher | k links' at the chain's k-th width |
#
# Without `finetune`, a chain that beats `individual` could just be a better initialisation;
# without `direct_kd_matched`, it could just be more training.

# %% tags=["parameters"]
preset: str = "smoke"  # smoke | quick | quick_squeezenet | gpu | paper (kdlib/presets.py)
model: str = ""  # "" -> the preset's; else a name of kdlib.models.list_models()
seeds: list = [0]  # one grid per seed
# student bit widths, the chain's links in order; `kdlib run` injects the preset's
bits: list = [4, 1]
methods: list = ["individual", "finetune", "direct_kd", "direct_kd_matched"]  # any of these
data_dir: str = ""  # folder holding cifar-100-python/; "" -> $KDLIB_DATA, else ./data
results_dir: str = "../results/smoke"  # run records, checkpoints and figures go here
overrides: dict = {}  # RunConfig fields that replace the preset's, e.g. {"epochs": 3}
device: str = ""  # "" -> cuda when available, else cpu

# %%
from kdlib import experiments
from kdlib.results import records_table

# %% tags=["nbval-check-output"]
seeds = experiments.check_seeds(seeds)  # [] or a repeated seed: a clear error, here
plan = experiments.plan_students(preset, model or None, seeds[0], methods, bits, overrides)
print(experiments.plan_table(plan).to_string())

# %%
records = experiments.run_students(preset=preset, model=model or None, seeds=seeds, methods=methods,
                                   bits=bits, data_dir=data_dir or None,
                                   results_dir=results_dir, overrides=overrides,
                                   device=device or None)

# %%
records_table(records)
