"""The training engine: fit(), evaluate(), pick_device(), checkpoints and resume.

Everything runs on CPU, in one thread, with a tiny ResNet (resnet8 at 10 classes) on a small
synthetic, learnable data set (class = colour pattern + noise, 16x16 pixels: the models pool
globally and the augmentation is size-agnostic), so the whole file takes seconds.
"""
import copy
import itertools
import os
import re
import signal
import subprocess
import sys
import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import kdlib.train as train_mod
from kdlib.config import RunConfig
from kdlib.data import normalize
from kdlib.schedules import lr_at
from kdlib.results import TIMING_FIELDS
from graph_emulator import HOST_DATA
from kdlib.step import frozen_teacher, make_trainer
from kdlib.train import FitResult, NonFiniteLossError, evaluate, fit, pick_device
from kdlib.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
HISTORY_KEYS = {"epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5", "val_loss",
                "seconds", "images_per_s"}


def make_splits(n_train=320, n_val=100, n_test=120, seed=0):
    """Learnable synthetic splits: 10 classes, each a fixed 4x4 colour pattern upsampled to
    16x16 plus Gaussian noise. (Also copied verbatim into the kill test's script.)"""
    import torch
    from kdlib.data import DataSplits

    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (10, 3, 4, 4), generator=g).float()

    def part(n):
        labels = torch.arange(n) % 10
        base = torch.nn.functional.interpolate(protos[labels], size=16, mode="nearest")
        noise = torch.randn(n, 3, 16, 16, generator=g) * 40
        return (base + noise).clamp(0, 255).to(torch.uint8), labels

    tr, va, te = part(n_train), part(n_val), part(n_test)
    return DataSplits(tr[0], tr[1], va[0], va[1], te[0], te[1])


def make_cfg(**kw) -> RunConfig:
    base = dict(model="resnet8", num_classes=NUM_CLASSES, epochs=2, batch_size=32, lr=0.05,
                eval_batch_size=64, method="individual", seed=0, schedule="cosine")
    return RunConfig(**{**base, **kw})


def make_model(cfg: RunConfig, seed: int | None = None) -> nn.Module:
    from kdlib.models import create_model

    torch.manual_seed(cfg.seed if seed is None else seed)
    return create_model(cfg.model, num_classes=cfg.num_classes, w_bits=cfg.w_bits,
                        a_bits=cfg.a_bits, quantizer=cfg.quantizer)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def untimed(history):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in history]


def metrics(result: FitResult) -> dict:
    d = result.to_dict()
    d["history"] = untimed(d["history"])
    for k in ("wall_time_s", "train_images_per_s"):
        d.pop(k)
    return d




@pytest.fixture(scope="module")
def splits():
    return make_splits()


@pytest.fixture(scope="module")
def trained(splits):
    """One plain 3-epoch run shared by several read-only tests."""
    cfg = make_cfg(epochs=3)
    model = make_model(cfg)
    init = copy.deepcopy(model.state_dict())
    result = fit(model, splits, cfg, progress=False)
    return cfg, init, model, result


# ----------------------------------------------------------------------------- device
def test_pick_device_defaults_and_forced_choices():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("auto").type == expected
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_pick_device_cuda_unavailable_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")


def test_pick_device_refuses_a_cuda_index_past_the_last_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")  # the last one there is
    for index in (2, 3):
        with pytest.raises(ValueError, match="only 2 CUDA device"):
            pick_device(f"cuda:{index}")


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_matches_manual_computation(splits):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, NUM_CLASSES))
    model.train()
    out = evaluate(model, splits.val_images, splits.val_labels, batch_size=33)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model(normalize(splits.val_images)).double().numpy()
    y = splits.val_labels.numpy()
    order = np.argsort(-logits, axis=1)
    top1 = 100.0 * np.mean(order[:, 0] == y)
    top5 = 100.0 * np.mean([y[i] in order[i, :5] for i in range(len(y))])
    z = logits - logits.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
    assert out["top1"] == pytest.approx(top1)
    assert out["top5"] == pytest.approx(top5)
    assert out["loss"] == pytest.approx(ce, rel=1e-5)
    assert 0 <= out["top1"] <= out["top5"] <= 100


def test_evaluate_refuses_an_empty_split(splits):
    """An empty split has no accuracy: a clear error, not a division by zero."""
    with pytest.raises(ValueError, match="empty split"):
        evaluate(make_model(make_cfg()), splits.val_images[:0], splits.val_labels[:0])


def test_evaluate_runs_in_eval_mode_without_grad(splits):
    seen = {}

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 16 * 16, NUM_CLASSES)

        def forward(self, x):
            seen["training"] = self.training
            seen["inference"] = torch.is_inference_mode_enabled()
            return self.lin(x.flatten(1))

    evaluate(Spy(), splits.val_images, splits.val_labels)
    assert seen == {"training": False, "inference": True}


# ----------------------------------------------------------------------------- fit basics
def test_fit_learns_and_reports_history(trained, splits):
    cfg, _, model, result = trained
    assert isinstance(result, FitResult)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    for row in result.history:
        assert set(row) == HISTORY_KEYS
        assert row["lr"] == pytest.approx(lr_at(row["epoch"] - 1, cfg))
        assert row["seconds"] > 0 and row["images_per_s"] > 0
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_top1 > 30  # chance is 10%: the synthetic classes are learnable
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert result.train_images_per_s > 0 and result.wall_time_s > 0
    assert result.device == "cpu"


def test_fit_selects_best_val_epoch_and_returns_its_weights(trained, splits):
    cfg, _, model, result = trained
    val = [row["val_top1"] for row in result.history]
    assert result.best_epoch == 1 + val.index(max(val))
    assert result.best_val_top1 == max(val)
    assert result.best_val_top5 == result.history[result.best_epoch - 1]["val_top5"]
    # the returned model holds the best-val weights: re-evaluating reproduces the record
    assert evaluate(model, splits.val_images, splits.val_labels)["top1"] == result.best_val_top1
    test = evaluate(model, splits.test_images, splits.test_labels)
    assert (test["top1"], test["top5"]) == (result.test_top1, result.test_top5)


def spy_on_evaluate(monkeypatch, splits, model, val_top1s):
    """Replace train.evaluate: validation top-1 follows the script; every call is logged as
    (split, model state at call time, result)."""
    scripted_val = iter(val_top1s)
    calls = []
    real_evaluate = train_mod.evaluate

    def spy(m, images, labels, **kw):
        out = real_evaluate(m, images, labels, **kw)
        split = "val" if torch.equal(labels.cpu(), splits.val_labels) else "test"
        if split == "val":
            out = {**out, "top1": next(scripted_val)}
        calls.append((split, {k: v.clone() for k, v in model.state_dict().items()}, out))
        return out

    monkeypatch.setattr(train_mod, "evaluate", spy)
    return calls


def test_best_epoch_is_selected_on_val_and_test_is_seen_at_final_then_best(
        splits, tmp_path, monkeypatch):
    """Validation top-1 scripted to peak at epoch 2 of 3: fit must return epoch 2's weights,
    and evaluate the test split exactly twice, at the end: final weights, then epoch 2's."""
    cfg = make_cfg(epochs=3)
    model = make_model(cfg)
    calls = spy_on_evaluate(monkeypatch, splits, model, [50.0, 80.0, 60.0])
    result = fit(model, splits, cfg, checkpoint_path=tmp_path / "ck.pt", progress=False)
    assert [c[0] for c in calls] == ["val", "val", "val", "test", "test"]
    assert (result.best_epoch, result.best_val_top1) == (2, 80.0)
    assert result.best_val_top5 == calls[1][2]["top5"]
    epoch2_state, final_state = calls[1][1], calls[2][1]
    assert not states_equal(epoch2_state, final_state)
    assert states_equal(model.state_dict(), epoch2_state)  # fit returns the best-val weights
    assert states_equal(calls[3][1], final_state) and states_equal(calls[4][1], epoch2_state)
    assert (result.final_test_top1, result.final_test_top5) == (calls[3][2]["top1"],
                                                                calls[3][2]["top5"])
    assert (result.test_top1, result.test_top5) == (calls[4][2]["top1"], calls[4][2]["top5"])
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert states_equal(ckpt["model"], final_state)
    assert states_equal(ckpt["best"]["state"], epoch2_state) and ckpt["best"]["epoch"] == 2


@pytest.mark.parametrize("nesterov, m", [(False, 0.9), (True, 0.9), (True, 0.0)])
def test_the_optimizer_applies_the_configs_weight_decay_and_momentum(nesterov, m):
    """With zero loss gradients the only gradient is the weight decay's, d = wd * w: two SGD
    steps as PyTorch documents them (velocity b = m * b + d; step d + m * b with Nesterov, else
    b), computed here by hand. Momentum 0 with the default nesterov=True is plain SGD (torch's
    SGD refuses Nesterov without momentum)."""
    from kdlib.step import make_optimizer

    lr, wd = 0.5, 0.01
    layer = nn.Linear(3, 2)
    w0 = layer.weight.detach().clone()
    optimizer = make_optimizer(layer, make_cfg(lr=lr, weight_decay=wd, momentum=m,
                                               nesterov=nesterov))
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    expected, velocity = w0, torch.zeros_like(w0)
    for _ in range(2):
        optimizer.step()
        d = wd * expected
        velocity = m * velocity + d
        expected = expected - lr * (d + m * velocity if nesterov else velocity)
        torch.testing.assert_close(layer.weight.detach(), expected)


@pytest.mark.parametrize("val, best", [([50.0, 80.0, 80.0], 2), ([0.0, 0.0, 0.0], 1)])
def test_a_tie_in_validation_keeps_the_earlier_epoch(splits, monkeypatch, val, best):
    """Validation top-1 50, 80, 80: the best epoch is 2, the first to reach 80 (a later epoch
    that only equals it trained longer for no measured gain). A run at 0% throughout (a
    diverged low-bit run) still has a best epoch, its first."""
    cfg = make_cfg(epochs=3)
    model = make_model(cfg)
    calls = spy_on_evaluate(monkeypatch, splits, model, val)
    result = fit(model, splits, cfg, progress=False)
    assert (result.best_epoch, result.best_val_top1) == (best, val[best - 1])
    assert states_equal(model.state_dict(), calls[best - 1][1])


def test_test_split_seen_once_when_the_last_epoch_is_best(splits, monkeypatch):
    cfg = make_cfg(epochs=2)
    model = make_model(cfg)
    calls = spy_on_evaluate(monkeypatch, splits, model, [50.0, 80.0])
    result = fit(model, splits, cfg, progress=False)
    assert [c[0] for c in calls] == ["val", "val", "test"] and result.best_epoch == 2
    assert (result.test_top1, result.test_top5) == (result.final_test_top1, result.final_test_top5)
    test = evaluate(model, splits.test_images, splits.test_labels)
    assert (test["top1"], test["top5"]) == (result.test_top1, result.test_top5)


def test_fit_is_reproducible(splits):
    cfg = make_cfg(epochs=2)
    a, b = make_model(cfg), make_model(cfg)
    assert states_equal(a.state_dict(), b.state_dict())
    ra, rb = fit(a, splits, cfg, progress=False), fit(b, splits, cfg, progress=False)
    assert states_equal(a.state_dict(), b.state_dict())
    assert metrics(ra) == metrics(rb)
    c = make_model(cfg)
    fit(c, splits, cfg.replace(seed=1), progress=False)  # another data seed: other weights
    assert not states_equal(a.state_dict(), c.state_dict())


def test_fit_leaves_the_global_rng_alone(splits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    model = make_model(make_cfg(epochs=1))
    torch.manual_seed(123)
    fit(model, splits, make_cfg(epochs=1), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_fit_uses_per_step_schedule(splits, monkeypatch):
    calls = []
    real = train_mod.lr_at
    monkeypatch.setattr(train_mod, "lr_at", lambda e, c: calls.append(e) or real(e, c))
    cfg = make_cfg(epochs=2, warmup_epochs=1)
    fit(make_model(cfg), splits, cfg, progress=False)
    steps = len(splits.train_labels) // cfg.batch_size
    assert sorted(set(calls)) == [e + i / steps for e in range(2) for i in range(steps)]


def test_progress_bar_and_one_summary_line_per_epoch(splits, capsys):
    cfg = make_cfg(epochs=2)
    fit(make_model(cfg), splits, cfg, progress=True)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch")]
    assert len(lines) == 2
    assert "val top1" in lines[0] and "img/s" in lines[0]


@pytest.mark.parametrize("fast", [dict(precision="bf16"), dict(channels_last=True),
                                  dict(precision="bf16", channels_last=True)])
def test_bf16_and_channels_last_train_like_fp32(splits, fast):
    """One epoch of a 4-bit run: the fast modes give the fp32 epoch loss within a stated
    tolerance. channels_last changes only the order of fp32 sums, bf16 rounds the first conv's
    operands and every quantized conv's output (2^-8); in a 4-bit network such differences flip
    rounding decisions, so the weights drift apart within a few steps (4% in the first conv
    here) and only the loss is compared: 5e-3 for channels_last (measured 6e-4), 1e-2 for bf16
    (measured 1e-3)."""
    base = make_cfg(epochs=1, w_bits=4, a_bits=4)
    ref = fit(make_model(base), splits, base, progress=False)
    got = fit(make_model(base), splits, base.replace(**fast), progress=False)
    tol = 1e-2 if fast.get("precision") == "bf16" else 5e-3
    assert got.history[0]["train_loss"] == pytest.approx(ref.history[0]["train_loss"], rel=tol)
    # the mode did change something
    assert got.history[0]["train_loss"] != ref.history[0]["train_loss"]


def test_batch_larger_than_train_split_is_an_error(splits):
    cfg = make_cfg(batch_size=1000)
    with pytest.raises(ValueError, match="batch_size"):
        fit(make_model(cfg), splits, cfg, progress=False)
    whole = make_cfg(batch_size=len(splits.train_labels), epochs=1)  # one full batch: it trains
    assert fit(make_model(whole), splits, whole, progress=False).history[0]["epoch"] == 1


# ----------------------------------------------------------------------------- teachers
def _teacher(splits, bits=4):
    cfg = make_cfg(w_bits=bits, a_bits=bits, epochs=1)
    teacher = make_model(cfg, seed=7)
    fit(teacher, splits, cfg, progress=False)
    return teacher


def test_hinton_teacher_is_frozen_and_used(splits):
    teacher = _teacher(splits)
    teacher.train()
    teacher.zero_grad(set_to_none=True)
    before = copy.deepcopy(teacher.state_dict())
    with torch.no_grad():
        probe = normalize(splits.val_images[:16])
        teacher.eval()
        out_before = teacher(probe)
        teacher.train()
    cfg = make_cfg(method="direct_kd", w_bits=2, a_bits=2, epochs=1, kd_alpha=0.9)
    student = make_model(cfg)
    init = copy.deepcopy(student.state_dict())
    fit(student, splits, cfg, teacher=teacher, progress=False)
    assert states_equal(before, teacher.state_dict())  # weights and BN buffers untouched
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training  # mode restored
    with torch.no_grad():
        teacher.eval()
        assert torch.equal(teacher(probe), out_before)  # unfrozen: same function as before
    # the KD term changed training: same init, alpha=0 gives other weights
    plain = make_model(cfg)
    plain.load_state_dict(init)
    fit(plain, splits, cfg.replace(kd_alpha=0.0), teacher=teacher, progress=False)
    assert not states_equal(plain.state_dict(), student.state_dict())


def test_hinton_teacher_runs_in_eval_under_inference_mode(splits):
    seen = set()

    class SpyTeacher(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            seen.add((self.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return self.inner(x)

    cfg = make_cfg(method="ta_chain", epochs=1)
    fit(make_model(cfg), splits, cfg, teacher=SpyTeacher(make_model(cfg, seed=3)), progress=False)
    assert seen == {(False, True, False)}


def test_a_hinton_step_with_kd_alpha_0_never_runs_the_teacher():
    """kd_alpha = 0 weighs the KD term by zero: the step is the student's CE alone, and the
    teacher's forward (as costly as the student's) is not run."""
    from kdlib.losses import ce_loss
    from kdlib.step import batch_loss

    calls = []

    class SpyTeacher(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    cfg = make_cfg(method="direct_kd", w_bits=4, a_bits=4, teacher_id="t", kd_alpha=0.0)
    trainer = make_trainer(make_model(cfg), cfg, teacher=SpyTeacher(make_model(cfg, seed=7)),
                           device="cpu")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % NUM_CLASSES
    with frozen_teacher(trainer):
        loss, _, logits, terms = batch_loss(trainer, x, y)
    assert calls == [] and terms is None
    torch.testing.assert_close(loss, ce_loss(logits, y, cfg.label_smoothing))


@pytest.mark.parametrize("kd_mode", ["hinton", "apprentice"])
def test_frozen_teacher_gives_the_teacher_back_in_the_mode_it_came_in(kd_mode):
    cfg = make_cfg(method="direct_kd", kd_mode=kd_mode, w_bits=4, a_bits=4, teacher_id="t")
    for was_training in (False, True):
        teacher = make_model(cfg, seed=7).train(was_training)
        trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
        with frozen_teacher(trainer):
            assert teacher.training == (kd_mode == "apprentice")
        assert teacher.training == was_training


@pytest.mark.parametrize("teacher_bits", [32, 8])
def test_a_kd_step_distils_each_image_towards_the_teachers_logits_of_that_image(teacher_bits):
    """The step's loss is kd_loss of the student's logits and the teacher's (in eval) for the
    same images, at the run's temperature and alpha: computed here from the two models."""
    from kdlib.losses import kd_loss
    from kdlib.step import batch_loss

    cfg = make_cfg(method="direct_kd", w_bits=4, a_bits=4, teacher_id="t", kd_temperature=3.0,
                   kd_alpha=0.7)
    teacher = make_model(cfg.replace(w_bits=teacher_bits, a_bits=teacher_bits), seed=7)
    trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
    with frozen_teacher(trainer):
        loss, _, logits, _ = batch_loss(trainer, x, y)
    with torch.no_grad():
        student_logits = trainer.model(x)  # train mode: batch statistics, as in the step
        teacher.eval()
        teacher_logits = teacher(x)
    torch.testing.assert_close(logits.detach(), student_logits)
    torch.testing.assert_close(loss.detach(), kd_loss(student_logits, teacher_logits, y, 3.0, 0.7))


def test_an_apprentice_step_computes_apprentice_losses_of_both_models_logits():
    """kdlib.losses.apprentice_losses is the apprentice scheme's definition: the student's loss
    and the sum the step back-propagates are that function's, labels smoothed for both
    models."""
    from kdlib.losses import apprentice_losses
    from kdlib.step import batch_loss

    cfg = make_cfg(method="direct_kd", kd_mode="apprentice", w_bits=4, a_bits=4, teacher_id="t",
                   kd_temperature=3.0, kd_alpha=0.7, label_smoothing=0.1)
    teacher = make_model(cfg.replace(w_bits=32, a_bits=32), seed=7)
    trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
    x, y = _batch()
    with frozen_teacher(trainer):
        loss, total, _, _ = batch_loss(trainer, x, y)
    with torch.no_grad():  # both in train mode (batch statistics), as in the step
        student, taught = apprentice_losses(trainer.model(x), teacher(x), y, 3.0, 0.7, 0.1)
    torch.testing.assert_close(loss.detach(), student)
    torch.testing.assert_close(total.detach(), student + taught)


@pytest.mark.parametrize("kd_mode", ["hinton", "apprentice"])
def test_a_kd_step_reports_the_students_ce_and_kd_terms_apart_and_detached(kd_mode):
    """The (CE, KD) terms a step gives are the student's cross-entropy and KD term, in that
    order (the training curves plot each), detached: they are summed over the epoch, not
    differentiated, and must not keep each step's graph alive."""
    from kdlib.losses import kd_loss_terms
    from kdlib.step import batch_loss

    cfg = make_cfg(method="direct_kd", kd_mode=kd_mode, w_bits=4, a_bits=4, teacher_id="t",
                   kd_temperature=3.0, kd_alpha=0.7, label_smoothing=0.1)
    teacher = make_model(cfg.replace(w_bits=32, a_bits=32), seed=7)
    trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
    x, y = _batch()
    with frozen_teacher(trainer):
        _, _, _, (ce, kd) = batch_loss(trainer, x, y)
        with torch.no_grad():  # the teacher in the mode the step runs it in
            _, want_ce, want_kd = kd_loss_terms(trainer.model(x), teacher(x), y, 3.0, 0.7, 0.1)
    assert not ce.requires_grad and not kd.requires_grad
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(kd, want_kd)


def _batch(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=generator),
            torch.randint(0, NUM_CLASSES, (n,), generator=generator))


def test_a_hinton_teacher_quantizes_its_weights_once_for_the_run_and_afresh_after_it():
    """Inside frozen_teacher the teacher's quantized weights are computed once, not at every
    step; on leaving it they are dropped, so the teacher quantizes afresh (as it must once
    trained again, or compiled, where a stale copy would not be noticed)."""
    from kdlib.quant import quantized_layers
    from kdlib.step import train_step

    cfg = make_cfg(method="direct_kd", w_bits=4, a_bits=4, teacher_id="t", group_weights=False)
    teacher = make_model(cfg, seed=7)  # a 4-bit assistant teacher
    calls = []
    for _, layer in quantized_layers(teacher):
        layer.weight_quantizer.register_forward_hook(lambda *_: calls.append(1))
    trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
    x, y = _batch()
    with frozen_teacher(trainer):
        frozen = len(calls)
        assert frozen > 0  # quantized once, on entering
        for _ in range(2):
            train_step(trainer, x, y, 0.05)
        assert len(calls) == frozen  # and not again at any step
    assert all(layer.frozen_weight is None for _, layer in quantized_layers(teacher))
    with torch.inference_mode():
        teacher(x)
    assert len(calls) > frozen  # its quantized layers quantize their weights again


def test_the_teacher_gets_the_runs_precision_memory_format_and_weight_grouping():
    """A quantized teacher computes as the run says, like the student: bf16 quantized layers,
    channels_last weights, grouped weight quantization as configured."""
    from kdlib.quant import quantized_layers

    cfg = make_cfg(method="direct_kd", w_bits=4, a_bits=4, teacher_id="t", precision="bf16",
                   channels_last=True, group_weights=False)
    teacher = make_model(cfg, seed=7)
    make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
    assert {layer.precision for _, layer in quantized_layers(teacher)} == {"bf16"}
    convs = [m.weight for m in teacher.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert teacher._group_quantized_weights is False


@pytest.mark.parametrize("kd_mode", ["hinton", "apprentice"])
def test_a_bf16_step_runs_the_full_precision_layers_under_bf16_autocast(kd_mode):
    """precision="bf16": the fp32 layers (here the last linear, whose output is the logits) of
    the student and of the teacher compute in bf16; "exact" keeps them in fp32."""
    from kdlib.step import batch_loss

    seen = {}
    for precision in ("exact", "bf16"):
        cfg = make_cfg(method="direct_kd", kd_mode=kd_mode, w_bits=4, a_bits=4,
                       teacher_id="t", precision=precision)
        teacher = make_model(cfg.replace(w_bits=32, a_bits=32), seed=7)
        teacher.register_forward_hook(lambda m, i, out, p=precision: seen.update({
            (p, "teacher"): out.dtype}))
        trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
        with frozen_teacher(trainer):
            loss, _, logits, _ = batch_loss(trainer, *_batch())
        seen[precision, "student"] = logits.dtype
        assert loss.dtype == torch.float32  # the losses cast the logits up
    assert seen == {("exact", "student"): torch.float32, ("exact", "teacher"): torch.float32,
                    ("bf16", "student"): torch.bfloat16, ("bf16", "teacher"): torch.bfloat16}


@pytest.mark.parametrize("kd_mode", [None, "apprentice"])
def test_a_step_updates_the_weights_at_the_learning_rate_it_is_given(kd_mode):
    """The step's own learning rate, not the optimizer's previous one: a step at lr 0 moves no
    parameter (weight decay and momentum enter SGD's update through lr), of the student nor of
    an apprentice teacher; the next step, at lr 0.05, moves them."""
    from kdlib.step import train_step

    kw = dict(method="direct_kd", kd_mode=kd_mode, teacher_id="t") if kd_mode else {}
    cfg = make_cfg(w_bits=4, a_bits=4, lr=0.05, **kw)
    teacher = make_model(cfg, seed=7) if kd_mode else None
    trainer = make_trainer(make_model(cfg), cfg, teacher=teacher, device="cpu")
    nets = [trainer.model] + ([teacher] if kd_mode else [])

    def parameters():
        return [p.detach().clone() for net in nets for p in net.parameters()]

    x, y = _batch()
    start = parameters()
    with frozen_teacher(trainer):
        train_step(trainer, x, y, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(parameters(), start))
        train_step(trainer, x, y, 0.05)
    moved = [not torch.equal(a, b) for a, b in zip(parameters(), start)]
    assert sum(moved) > len(moved) // 2


def test_method_and_teacher_must_agree(splits):
    cfg = make_cfg(method="direct_kd", epochs=1)
    with pytest.raises(ValueError, match="teacher"):
        fit(make_model(cfg), splits, cfg, progress=False)
    with pytest.raises(ValueError, match="method='individual'"):
        fit(make_model(cfg), splits, make_cfg(epochs=1), teacher=make_model(cfg), progress=False)


def test_apprentice_trains_teacher_and_student_jointly(splits, tmp_path):
    cfg = make_cfg(method="direct_kd", kd_mode="apprentice", epochs=2, w_bits=2, a_bits=2)
    teacher = make_model(make_cfg(), seed=5)
    t_before = copy.deepcopy(teacher.state_dict())
    student = make_model(cfg)
    result = fit(student, splits, cfg, teacher=teacher, progress=False,
                 checkpoint_path=tmp_path / "ck.pt")
    assert not states_equal(t_before, teacher.state_dict())  # the teacher learned
    assert all("teacher_val_top1" in row for row in result.history)
    assert result.history[-1]["teacher_val_top1"] > 20
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert states_equal(ckpt["teacher"], teacher.state_dict())
    assert ckpt["teacher_optimizer"]["state"]  # momentum buffers stored


def test_apprentice_is_resumable(splits, tmp_path, monkeypatch):
    cfg = make_cfg(method="direct_kd", kd_mode="apprentice", epochs=2)
    ref_s, ref_t = make_model(cfg), make_model(cfg, seed=5)
    ref = fit(ref_s, splits, cfg, teacher=ref_t, progress=False)
    s, t = make_model(cfg), make_model(cfg, seed=5)
    _interrupt_after_epochs(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        fit(s, splits, cfg, teacher=t, checkpoint_path=tmp_path / "a.pt", progress=False)
    monkeypatch.undo()
    s, t = make_model(cfg, seed=99), make_model(cfg, seed=98)  # fresh objects, other init
    res = fit(s, splits, cfg, teacher=t, checkpoint_path=tmp_path / "a.pt", progress=False)
    assert states_equal(s.state_dict(), ref_s.state_dict())
    assert states_equal(t.state_dict(), ref_t.state_dict())
    assert metrics(res) == metrics(ref)


# ----------------------------------------------------------------------------- checkpoints
def _interrupt_after_epochs(monkeypatch, n):
    """Make train_batches raise KeyboardInterrupt when epoch index n starts (after n epochs)."""
    # fit() looks train_batches up in kdlib.train, where it was imported

    real = train_mod.train_batches

    def interrupting(*args, epoch, **kw):
        if epoch >= n:
            raise KeyboardInterrupt(f"simulated kill at epoch {epoch}")
        return real(*args, epoch=epoch, **kw)

    monkeypatch.setattr(train_mod, "train_batches", interrupting)


def test_checkpoint_contents_load_with_weights_only(trained, splits, tmp_path):
    cfg = make_cfg(epochs=2)
    path = tmp_path / "sub" / "run.pt"
    model = make_model(cfg)
    result = fit(model, splits, cfg, checkpoint_path=path, progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"] == cfg.to_dict()
    assert len(ckpt["history"]) == 2 and ckpt["best"]["epoch"] == result.best_epoch
    assert states_equal(ckpt["best"]["state"], model.state_dict())
    assert ckpt["optimizer"]["state"]
    assert ckpt["result"]["test_top1"] == result.test_top1
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]  # no temp files left


def test_resume_after_interruption_matches_uninterrupted_run(splits, tmp_path, monkeypatch, capsys):
    cfg = make_cfg(epochs=3, warmup_epochs=1)
    ref_model = make_model(cfg)
    ref = fit(ref_model, splits, cfg, progress=False)
    path = tmp_path / "run.pt"
    _interrupt_after_epochs(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    capsys.readouterr()
    model = make_model(cfg, seed=42)  # a differently initialised object: state comes from disk
    res = fit(model, splits, cfg, checkpoint_path=path, progress=False)
    assert "resuming" in capsys.readouterr().out
    assert states_equal(model.state_dict(), ref_model.state_dict())
    assert metrics(res) == metrics(ref)


def test_a_run_paused_at_its_deadline_resumes_to_the_uninterrupted_result(splits, tmp_path):
    """A deadline that leaves no room for the last epoch's test pass: fit stops after epoch 2
    of 3 with its checkpoint written and nothing else, and a second call finishes the run to
    the weights and metrics of a run never paused. Before the first epoch, the deadline uses
    the estimate: one that does not fit stops the run before any training."""
    from kdlib.budget import Deadline
    from kdlib.train import RunSuspended

    cfg = make_cfg(epochs=3, warmup_epochs=1)
    ref_model = make_model(cfg)
    ref = fit(ref_model, splits, cfg, progress=False)
    path = tmp_path / "run.pt"
    late = Deadline(stop_at=time.time() + 3600, epoch_s=0.01, tail_s=1e6)
    with pytest.raises(RunSuspended) as paused:
        fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False, deadline=late)
    assert (paused.value.epochs_done, paused.value.epochs) == (2, 3)
    assert "after epoch 2/3 (its checkpoint is kept)" in str(paused.value)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    too_soon = Deadline(stop_at=time.time() + 60, epoch_s=3600)
    with pytest.raises(RunSuspended):  # epoch 3 would end past it: nothing trained
        fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False, deadline=too_soon)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    model = make_model(cfg, seed=42)
    res = fit(model, splits, cfg, checkpoint_path=path, progress=False,
              deadline=Deadline(stop_at=time.time() + 3600, epoch_s=0.01))
    assert states_equal(model.state_dict(), ref_model.state_dict())
    assert metrics(res) == metrics(ref)
    with pytest.raises(ValueError, match="checkpoint_path"):
        fit(make_model(cfg), splits, cfg, progress=False, deadline=late)


def test_finished_checkpoint_returns_without_training(splits, tmp_path, monkeypatch):
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    model = make_model(cfg)
    first = fit(model, splits, cfg, checkpoint_path=path, progress=False)
    mtime = path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("trained or evaluated again")


    monkeypatch.setattr(train_mod, "train_batches", boom)
    monkeypatch.setattr(train_mod, "evaluate", boom)
    again = make_model(cfg, seed=9)
    second = fit(again, splits, cfg.replace(eval_batch_size=7), checkpoint_path=path,
                 progress=False)
    assert second == first
    assert states_equal(again.state_dict(), model.state_dict())
    assert path.stat().st_mtime_ns == mtime


def test_checkpoint_with_other_config_is_refused(splits, tmp_path):
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    data = path.read_bytes()
    with pytest.raises(ValueError, match=r"different config.*'lr'.*'weight_decay'"):
        fit(make_model(cfg), splits, cfg.replace(lr=0.2, weight_decay=0.0), checkpoint_path=path,
            progress=False)
    assert path.read_bytes() == data


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_checkpoint", "other_format"])
def test_corrupted_checkpoint_is_a_clear_error_and_kept(splits, tmp_path, damage):
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a zip file at all" * 10)
    elif damage == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    else:  # a kdlib checkpoint of a format this kdlib does not read
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, "format": ckpt["format"] + 1}, path)
    data = path.read_bytes()
    with pytest.raises(ValueError, match=str(path)):
        fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    assert path.read_bytes() == data


class NaNAfter(nn.Module):
    """Wraps a model; its training forward returns nan from call number ``after + 1`` on."""

    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_checkpoint(splits, tmp_path):
    cfg = make_cfg(epochs=3)
    steps = len(splits.train_labels) // cfg.batch_size  # 10
    path = tmp_path / "run.pt"
    model = NaNAfter(make_model(cfg), after=steps + 2)  # first bad: epoch 2, step 3
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 of 10") as err:
        fit(model, splits, cfg, checkpoint_path=path, progress=False)
    assert isinstance(err.value, FloatingPointError)
    assert str(path) in str(err.value)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())


def test_nonfinite_loss_is_found_between_periodic_checks(splits, monkeypatch, tmp_path):
    """Found at the first check after it; in the first epoch there is no checkpoint yet, and
    the message does not point to one."""
    monkeypatch.setattr(train_mod, "NONFINITE_CHECK_EVERY", 4)
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 2 of") as err:
        fit(NaNAfter(make_model(cfg), after=1), splits, cfg, checkpoint_path=path,
            progress=False)
    assert "checkpoint" not in str(err.value) and not path.exists()


class HostTraffic(TorchDispatchMode):
    """Counts the reads of a tensor's value back to the host (``_local_scalar_dense``: item,
    float, bool; not the integer indexing of train_batches, which reads nothing on CUDA) and
    the tensors built from host data (graph_emulator.HOST_DATA: on CUDA, a copy to the device)."""

    def __init__(self):
        super().__init__()
        self.reads = self.host_data = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        self.host_data += func in HOST_DATA
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [dict(w_bits=4, a_bits=4),
                                dict(method="direct_kd", w_bits=2, a_bits=2)])
@pytest.mark.slow
def test_an_epoch_reads_back_only_every_check_and_at_its_end(splits, monkeypatch, kw):
    """No host sync per step: the only reads are the non-finite flag every
    NONFINITE_CHECK_EVERY steps and the epoch's metrics, whatever the step count."""
    monkeypatch.setattr(train_mod, "NONFINITE_CHECK_EVERY", 8)
    cfg = make_cfg(**kw)
    teacher = (make_model(cfg.replace(w_bits=32, a_bits=32, method="individual"), seed=7)
               if cfg.method == "direct_kd" else None)
    counts = {}
    for batch_size in (32, 8):  # 10 and 40 steps
        trainer = make_trainer(make_model(cfg), cfg.replace(batch_size=batch_size),
                               teacher=teacher, device="cpu")
        train_mod.train_epoch(trainer, splits, 0, progress=False)  # first-use caches filled
        with frozen_teacher(trainer), HostTraffic() as traffic:
            train_mod.train_epoch(trainer, splits, 1, progress=False)
        counts[batch_size] = traffic
    ends = 3  # the flag, the loss and accuracy sums (the KD terms' tolist dispatches nothing)
    for batch_size, steps in ((32, 10), (8, 40)):
        assert counts[batch_size].reads == steps // 8 + ends, batch_size
    assert counts[8].host_data == counts[32].host_data  # none per step


KILL_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
{splits_source}
from kdlib.config import RunConfig
from kdlib.models import create_model
from kdlib.train import fit
cfg = RunConfig(**{cfg!r})
torch.manual_seed(cfg.seed)
model = create_model(cfg.model, num_classes=cfg.num_classes, w_bits=cfg.w_bits, a_bits=cfg.a_bits)
result = fit(model, make_splits(), cfg, checkpoint_path=sys.argv[1], progress=False)
torch.save({{"state": model.state_dict(), "result": result.to_dict()}}, sys.argv[2])
'''


@pytest.mark.slow
def test_sigkill_and_rerun_resumes_to_the_same_weights(tmp_path):
    """A run SIGKILLed after its first checkpoint, started again with the same arguments,
    ends with exactly the weights and metrics of an uninterrupted run (in another folder)."""
    cfg = make_cfg(epochs=4, w_bits=4, a_bits=4, warmup_epochs=1)
    fields = {**cfg.to_dict(), "milestones": tuple(cfg.milestones)}
    script = tmp_path / "run_fit.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), cfg=fields,
                                         splits_source=inspect.getsource(make_splits)))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    folder = tmp_path / "killed"
    folder.mkdir()
    command = [sys.executable, str(script), str(folder / "ck.pt"), str(folder / "out.pt")]

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (folder / "ck.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    epoch_at_kill = torch.load(folder / "ck.pt", weights_only=True)["epoch"]
    assert 1 <= epoch_at_kill < cfg.epochs and not (folder / "out.pt").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {folder / 'ck.pt'} after epoch {epoch_at_kill}/" in rerun.stdout
    resumed = torch.load(folder / "out.pt", weights_only=True)

    # the uninterrupted reference, in this process (same thread count: one)
    model = make_model(cfg)
    reference = fit(model, make_splits(), cfg, checkpoint_path=tmp_path / "straight" / "ck.pt",
                    progress=False)
    assert states_equal(resumed["state"], model.state_dict())
    assert metrics(FitResult.from_dict(resumed["result"])) == metrics(reference)


def test_a_student_handed_over_in_eval_mode_trains_in_train_mode_and_train_top1_counts_its_steps(
        splits, monkeypatch):
    """train_top1 is the student's hits over the images of the epoch's full batches (320 // 48
    = 6 batches, 288 images, not 320), every step in train mode whatever mode fit got."""
    cfg = make_cfg(epochs=1, batch_size=48)
    model = make_model(cfg).eval()
    modes, hits = [], []
    real = train_mod.run_step

    def spy(trainer, x, y, lr, **kw):
        modes.append(trainer.model.training)
        loss, total, logits = real(trainer, x, y, lr, **kw)
        hits.append(int((logits.argmax(dim=1) == y).sum()))
        return loss, total, logits

    monkeypatch.setattr(train_mod, "run_step", spy)
    result = fit(model, splits, cfg, progress=False)
    assert modes == [True] * 6 and sum(hits) > 0
    assert result.history[0]["train_top1"] == pytest.approx(100.0 * sum(hits) / 288)


def test_fit_leaves_no_gradients_behind(splits):
    cfg = make_cfg(epochs=1)
    model = make_model(cfg)
    fit(model, splits, cfg, progress=False)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_gives_the_model_back_in_the_mode_it_came_in(splits, training):
    model = make_model(make_cfg()).train(training)
    evaluate(model, splits.val_images[:8], splits.val_labels[:8])
    assert all(m.training == training for m in model.modules())


def test_each_epoch_reseeds_the_global_rng_differently(splits, monkeypatch):
    """Dropout draws from the global RNG, reseeded from (seed, epoch): epoch 2 must not replay
    epoch 1's random numbers (its dropout masks)."""
    cfg = make_cfg(epochs=2)
    states = []
    real = train_mod.run_step

    def spy(*args, **kw):
        states.append(torch.random.get_rng_state())
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "run_step", spy)
    fit(make_model(cfg), splits, cfg, progress=False)
    steps = len(splits.train_labels) // cfg.batch_size
    assert len(states) == 2 * steps
    assert not torch.equal(states[0], states[steps])


def test_a_finished_checkpoint_gives_back_the_best_not_the_final_weights(
        splits, tmp_path, monkeypatch):
    """Validation scripted to peak at epoch 1 of 2: rerunning the finished run returns epoch
    1's weights (those fit returned), though the checkpoint's model is the final one."""
    cfg = make_cfg(epochs=2)
    path = tmp_path / "run.pt"
    model = make_model(cfg)
    calls = spy_on_evaluate(monkeypatch, splits, model, [80.0, 50.0])
    first = fit(model, splits, cfg, checkpoint_path=path, progress=False)
    monkeypatch.undo()
    assert first.best_epoch == 1 and states_equal(model.state_dict(), calls[0][1])
    again = make_model(cfg, seed=9)
    assert fit(again, splits, cfg, checkpoint_path=path, progress=False) == first
    assert states_equal(again.state_dict(), model.state_dict())


def test_a_checkpoint_past_the_configs_last_epoch_is_refused(splits, tmp_path):
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["epoch"] = 2
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"at epoch 2 > epochs=1"):
        fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)


def test_a_resumed_run_keeps_its_best_epoch_and_counts_the_earlier_session(
        splits, tmp_path, monkeypatch):
    """Validation peaks at epoch 1 of 3 and the run is killed after epoch 2: the resumed
    session still returns epoch 1's weights, tested, and its record adds up both sessions'
    training images, training seconds and wall time (the first session's set large here)."""
    cfg = make_cfg(epochs=3)
    path = tmp_path / "run.pt"
    model = make_model(cfg)
    first = spy_on_evaluate(monkeypatch, splits, model, [80.0, 50.0])
    _interrupt_after_epochs(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(model, splits, cfg, checkpoint_path=path, progress=False)
    monkeypatch.undo()
    epoch1_state = first[0][1]
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "train_seconds": 900.0, "wall_time_s": 1000.0}, path)
    model = make_model(cfg, seed=42)
    calls = spy_on_evaluate(monkeypatch, splits, model, [60.0])
    result = fit(model, splits, cfg, checkpoint_path=path, progress=False)
    assert (result.best_epoch, result.best_val_top1) == (1, 80.0)
    assert states_equal(model.state_dict(), epoch1_state)
    assert states_equal(calls[-1][1], epoch1_state)  # the test pass at the best weights
    assert (result.test_top1, result.test_top5) == (calls[-1][2]["top1"], calls[-1][2]["top5"])
    done = torch.load(path, weights_only=True)
    images = 3 * (len(splits.train_labels) // cfg.batch_size) * cfg.batch_size
    assert done["train_images"] == images and done["train_seconds"] > 900.0
    assert result.train_images_per_s == pytest.approx(images / done["train_seconds"])
    assert result.wall_time_s > 1000.0 and done["wall_time_s"] > 1000.0


def test_images_per_s_counts_the_training_seconds_only(splits, monkeypatch):
    """An epoch's images_per_s and the run's train_images_per_s are training images over
    training seconds, evaluation excluded (what the benchmark measures): each epoch's
    train_seconds set to 2 s here makes them exact."""
    real = train_mod.train_epoch
    monkeypatch.setattr(train_mod, "train_epoch",
                        lambda *a, **k: {**real(*a, **k), "train_seconds": 2.0})
    cfg = make_cfg(epochs=2)
    result = fit(make_model(cfg), splits, cfg, progress=False)
    images = (len(splits.train_labels) // cfg.batch_size) * cfg.batch_size
    assert [row["images_per_s"] for row in result.history] == [images / 2.0] * 2
    assert result.train_images_per_s == 2 * images / 4.0


def test_the_deadline_judges_each_epoch_by_the_epochs_this_session_timed(splits, tmp_path):
    """Before each epoch the deadline gets its index, the epoch count and the seconds of the
    epochs trained so far in this session (they replace the estimate once there are some)."""
    from kdlib.budget import Deadline

    asked = []

    class Spy(Deadline):
        def allows(self, epoch, epochs, measured=(), now=None):
            asked.append((epoch, epochs, list(measured)))
            return True

    cfg = make_cfg(epochs=3)
    result = fit(make_model(cfg), splits, cfg, checkpoint_path=tmp_path / "run.pt",
                 progress=False, deadline=Spy(stop_at=time.time() + 3600, epoch_s=1.0))
    seconds = [row["seconds"] for row in result.history]
    assert asked == [(0, 3, []), (1, 3, seconds[:1]), (2, 3, seconds[:2])]


def test_an_epoch_short_of_its_batches_is_an_error_not_a_smaller_mean(splits, monkeypatch):
    """train_loss and train_top1 divide by the step count the split implies: batches that stop
    short (9 of 10 here) stop the run instead of recording means over steps never taken."""
    real = train_mod.train_batches
    monkeypatch.setattr(train_mod, "train_batches",
                        lambda *a, **k: itertools.islice(real(*a, **k), 9))
    cfg = make_cfg(epochs=1)
    with pytest.raises(RuntimeError, match="yielded 9 batches, expected 10"):
        fit(make_model(cfg), splits, cfg, progress=False)


def test_a_diverging_apprentice_teacher_stops_the_run_at_its_first_bad_step(splits, monkeypatch):
    """The non-finite check watches the loss the step differentiates: an apprentice teacher
    whose own loss turns nan (here from the first step) stops the run at that step, before its
    nan gradients reach the student through the next step's logits."""
    import kdlib.step as step_mod

    real = step_mod.apprentice_loss_terms

    def nan_teacher_loss(*args, **kw):
        loss, t_loss, ce, kd = real(*args, **kw)
        return loss, t_loss * float("nan"), ce, kd

    monkeypatch.setattr(step_mod, "apprentice_loss_terms", nan_teacher_loss)
    cfg = make_cfg(method="direct_kd", kd_mode="apprentice", epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 of 10"):
        fit(make_model(cfg), splits, cfg, teacher=make_model(cfg, seed=5), progress=False)


def test_a_checkpoint_missing_any_part_is_refused_by_name_and_kept(splits, tmp_path):
    """A checkpoint without one of the parts a resume reads (a foreign or hand-edited file) is
    a ValueError naming the file and the part, never a KeyError half-way through the resume."""
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    ckpt = torch.load(path, weights_only=True)
    for part in ("format", "config", "epoch", "model", "optimizer", "history", "best",
                 "train_seconds", "train_images", "wall_time_s"):
        torch.save({k: v for k, v in ckpt.items() if k != part}, path)
        data = path.read_bytes()
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*missing \['{part}'\]"):
            fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
        assert path.read_bytes() == data


def test_a_checkpoint_config_missing_a_field_or_with_an_unknown_one_is_refused(splits, tmp_path):
    """A config field the checkpoint lacks (an older kdlib; its value then unknown, even where
    today's is None) or one this kdlib does not know differs from the run's: refused."""
    cfg = make_cfg(epochs=1)
    path = tmp_path / "run.pt"
    fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["teacher_id"] is None
    for field, config in [
            ("label_smoothing",
             {k: v for k, v in ckpt["config"].items() if k != "label_smoothing"}),
            ("teacher_id", {k: v for k, v in ckpt["config"].items() if k != "teacher_id"}),
            ("kd_beta", {**ckpt["config"], "kd_beta": 1.0})]:
        torch.save({**ckpt, "config": config}, path)
        with pytest.raises(ValueError, match=rf"different config \(fields \['{field}'\]"):
            fit(make_model(cfg), splits, cfg, checkpoint_path=path, progress=False)


def test_a_missing_checkpoint_is_reported_missing_not_corrupt(tmp_path):
    """load_checkpoint (exported by kdlib.train) on a path with no file raises
    FileNotFoundError, not the corrupt-file ValueError that advises deleting it."""
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")
