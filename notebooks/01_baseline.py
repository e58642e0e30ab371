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
# # 01 · Baseline: the full-precision teacher
#
# Trains the 32-bit model that heads the teacher-assistant chain (notebook 02) and that
# `finetune` / `direct_kd` start from (notebook 03). One teacher per seed. Every
# hyperparameter comes from the preset (`kdlib/presets.py`) plus `overrides`; the run
# record lands in `results_dir/runs/`. A finished run is skipped, an interrupted one resumes.

# %% tags=["parameters"]
preset: str = "smoke"  # smoke | quick | quick_squeezenet | gpu | paper (kdlib/presets.py)
model: str = ""  # "" -> the preset's; else a name of kdlib.models.list_models()
seeds: list = [0]  # one teacher per seed
data_dir: str = ""  # folder holding cifar-100-python/; "" -> $KDLIB_DATA, else ./data
results_dir: str = "../results/smoke"  # run records, checkpoints and figures go here
overrides: dict = {}  # RunConfig fields that replace the preset's, e.g. {"epochs": 3}
device: str = ""  # "" -> cuda when available, else cpu

# %%
import pandas as pd

from kdlib import experiments
from kdlib.models import create_model
from kdlib.quant import model_size_report

# %% [markdown]
# The configuration, validated once before anything is trained:

# %% tags=["nbval-check-output"]
seeds = experiments.check_seeds(seeds)  # [] or a repeated seed: a clear error, here
config = experiments.plan_teacher(preset, model or None, seeds[0], overrides)  # as trained
print(pd.Series(config.to_dict()).to_string())

# %% tags=["nbval-check-output"]
print(config.model, model_size_report(create_model(config.model, num_classes=config.num_classes)))

# %%
records = experiments.run_teacher(preset=preset, model=model or None, seeds=seeds,
                                  data_dir=data_dir or None, results_dir=results_dir,
                                  overrides=overrides, device=device or None)

# %%
pd.DataFrame([{"run_id": r["run_id"], "seed": r["config"]["seed"], **r["metrics"],
               "wall_time_s": r["wall_time_s"], "images_per_s": r["images_per_s"]}
              for r in records])
