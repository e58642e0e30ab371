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
# # 02 · Teacher-assistant chain
#
# Each link of `chain` starts from the weights of the link before it (BatchNorm statistics
# included): 32 → 16 → 8 → 4 → 2 → 1 bits by default. Depth and width never change, only
# precision. Who teaches a link is the method's:
#
# | method | each link distilled from | what it isolates |
# |---|---|---|
# | `ta_chain` | the link before it (a teacher assistant) | the seed's method |
# | `progressive` | nobody (cross-entropy) | stepping down without distillation |
# | `progressive_kd32` | the 32-bit teacher | the chain's path, no assistant |
#
# Every link trains for the same epochs. The chain of seed *s* starts from the teacher of
# seed *s* (trained here if notebook 01 has not run). A link that is the same training as
# another method's run (e.g. every method's first link from the teacher with the teacher's
# distillation) is trained once and recorded under each name (`same_run_as`).

# %% tags=["parameters"]
preset: str = "smoke"  # smoke | quick | quick_squeezenet | gpu | paper (kdlib/presets.py)
model: str = ""  # "" -> the preset's; else a name of kdlib.models.list_models()
seeds: list = [0]  # one chain per seed
chain: list = [32, 4, 1]  # descending bit widths ("W/A": apart); `kdlib run` injects the preset's
methods: list = ["ta_chain", "progressive", "progressive_kd32"]  # who teaches each link (see below)
data_dir: str = ""  # folder holding cifar-100-python/; "" -> $KDLIB_DATA, else ./data
results_dir: str = "../results/smoke"  # run records, checkpoints and figures go here
overrides: dict = {}  # RunConfig fields that replace the preset's, e.g. {"kd_temperature": 2.0}
device: str = ""  # "" -> cuda when available, else cpu

# %%
import pandas as pd

from kdlib import experiments
from kdlib.results import records_table
from kdlib.quant import level_summary

# %% [markdown]
# The planned runs (validated before anything is trained; ids derive from the configs):

# %% tags=["nbval-check-output"]
seeds = experiments.check_seeds(seeds)  # [] or a repeated seed: a clear error, here
plan = experiments.plan_chain(preset, model or None, seeds[0], chain, overrides, method="ta_chain")
print(experiments.plan_table(plan).to_string())

# %% [markdown]
# The weight grid of each link (DoReFa: 2·q_k(tanh w / 2 max|tanh w| + ½) − 1;
# 1 bit: sign(w)·E|w|) and its activations (clipped to [0, 1], then 2^k levels):

# %% tags=["nbval-check-output"]
print(pd.DataFrame([level_summary(c.w_bits) for c in plan]).to_string(index=False))

# %%
records = experiments.run_ta_chain(preset=preset, model=model or None, seeds=seeds, chain=chain,
                                   methods=methods, data_dir=data_dir or None,
                                   results_dir=results_dir, overrides=overrides,
                                   device=device or None)

# %%
records_table(records)
