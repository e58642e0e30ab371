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
# # 04 · Results
#
# Loads every run record in `results_dir/runs/` and compares the methods at each bit width.
# Accuracies are **test** top-1 at the epoch of best **validation** accuracy (the test set is
# never used for selection). Error bars: standard deviation over seeds; the gain plot pairs
# runs by seed and shows a 95% Student-t interval of the paired difference (needs ≥ 2 seeds).
# The published numbers are a faint reference: `liao2020` selected its epoch on the test set.

# %% tags=["parameters"]
preset: str = "smoke"  # preset whose results are shown (used in titles)
# folder with runs/; figures/ and summary.csv are written here
results_dir: str = "../results/smoke"

# %%
from pathlib import Path

import matplotlib.pyplot as plt

from IPython.display import Markdown

from kdlib import plots
from kdlib.results import (chain_contrasts, drawn_from_digest, load_published, load_records,
                           load_results, paired_gain, results_table, summarise, summary_table)
from kdlib.verdict import holm_standing, render_answer, same_run_widths

figures = Path(results_dir) / "figures"
frame = load_results(results_dir)
records = load_records(results_dir)
drawn_from = drawn_from_digest(results_dir)  # stamped into each figure: `readme --check` reads it
if frame.empty:
    raise FileNotFoundError(f"no run records in {Path(results_dir) / 'runs'}: "
                            "run notebooks 01-03 first")
summary = summarise(frame)
summary_table(frame).to_csv(Path(results_dir) / "summary.csv", index=False)
teacher_acc = frame.loc[frame["method"] == "teacher", "test_top1"].mean()
n_seeds = frame["seed"].nunique()
print(f"{len(frame)} runs, {n_seeds} seed(s), models: {sorted(frame['model'].unique())}")

# %% [markdown]
# ## Test top-1 (%) per method × bit width

# %%
table = results_table(summary)
table

# %%
published = load_published(frame["model"].iloc[0])
published[published["source"] == "liao2020"].pivot_table(index="method", columns="w_bits",
                                                          values="top1")

# %% [markdown]
# ## Accuracy vs bit width

# %%
fig = plots.plot_accuracy_vs_bits(summary, teacher_acc=teacher_acc, published=published,
                                  title=f"{frame['model'].iloc[0]} on CIFAR-100, preset {preset}")
plots.save_figure(fig, figures / "accuracy_vs_bits.png", drawn_from)
plt.show()

# %% [markdown]
# ## Gain over training each bit width on its own

# %%
gains = paired_gain(frame)
fig = plots.plot_gain_over_individual(gains)
plots.save_figure(fig, figures / "gain_over_individual.png", drawn_from)
plt.show()
gains

# %% [markdown]
# ## Where the chain's gain comes from
#
# Three paired (by seed) contrasts at every bit width, each with its 95% interval:
# `ta_chain − progressive_kd32` (an assistant vs the 32-bit teacher, same init path and
# budget), `progressive_kd32 − direct_kd_matched` (stepping down vs jumping, same teacher and
# budget), `ta_chain − progressive` (what distillation adds along the chain). An interval that
# contains 0 leaves the question open at that width; * marks the calls that stand when all
# tested widths together may err 5% (Holm's correction).

# %%
contrasts = chain_contrasts(frame)
if not contrasts.empty:
    fig = plots.plot_chain_contrasts(contrasts, stands=holm_standing(frame),
                                     same_run=same_run_widths(frame))
    plots.save_figure(fig, figures / "chain_contrasts.png", drawn_from)
    plt.show()
contrasts

# %% [markdown]
# ## The answer, in words
#
# Read off the contrasts above and nothing else (`kdlib.verdict`, also the README's
# paragraph): a width is resolved only where its 95% interval excludes 0.

# %%
Markdown(render_answer(frame))

# %% [markdown]
# ## Training curves of the chain

# %%
fig = plots.plot_chain_curves(records, seed=int(frame["seed"].min()))
plots.save_figure(fig, figures / "chain_curves.png", drawn_from)
plt.show()

# %% [markdown]
# ## Accuracy vs model size

# %%
fig = plots.plot_accuracy_vs_size(frame)
plots.save_figure(fig, figures / "accuracy_vs_size.png", drawn_from)
plt.show()

# %% [markdown]
# ## Cost of the runs

# %%
frame.groupby("method").agg(runs=("run_id", "count"),
                            wall_time_min=("wall_time_s", lambda s: s.sum() / 60),
                            images_per_s=("images_per_s", "median"))
