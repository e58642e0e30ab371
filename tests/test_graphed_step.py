"""fit()'s step replayed as a CUDA graph (kdlib.step.GraphedStep): the same training as eager.

On a CPU there are no CUDA graphs, so these tests capture with tests/graph_emulator.py, which
records the step's operators as a capture records its kernels (nothing runs, Python values are
frozen, the tensors are fixed, reads back to the host and host data are refused) and replays
them. A run trained that way must equal the eager run bit for bit: the warm-up steps, the
captured step (replayed, not skipped or run twice), the learning rate of every step, the eager
SGD update, the metrics and the KD terms. On a CUDA device the real graph is compared with
eager steps by kdlib.bench.graphs.check_graph_step.
"""
import time

import pytest
import torch

import kdlib.step as step_mod
from kdlib.step import GRAPH_WARMUP_STEPS as WARMUP_STEPS, GraphedStep, capture_for
from kdlib.train import fit
from graph_emulator import emulated_capture
from test_train import make_cfg, make_model, make_splits, metrics, states_equal, untimed


class EmulatedCapture:
    """The emulated capture (graph_emulator.emulated_capture), counting captures and replays."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def __call__(self, fn, stream):
        self.captures += 1
        replay = emulated_capture(fn, stream)

        def counted():
            self.replays += 1
            replay()

        return counted


@pytest.fixture(scope="module")
def splits():
    return make_splits()


def _fit(splits, cfg, capture=None, monkeypatch=None):
    if capture is not None:
        monkeypatch.setattr(step_mod, "capture_for", lambda device: capture)
    teacher = None
    if cfg.method == "direct_kd":
        teacher = make_model(cfg.replace(w_bits=32, a_bits=32, method="individual"), seed=7)
    model = make_model(cfg)
    result = fit(model, splits, cfg, teacher=teacher, device="cpu", progress=False,
                 tensorboard=False)
    return result, model, teacher


@pytest.mark.parametrize("kw", [
    dict(w_bits=4, a_bits=4),
    dict(method="direct_kd", w_bits=2, a_bits=2),
    dict(method="direct_kd", kd_mode="apprentice", w_bits=4, a_bits=4),
    dict(model="squeezenet", w_bits=4, a_bits=4),  # dropout: random numbers drawn by replays
    dict(w_bits=1, a_bits=1, precision="bf16"),  # bf16 autocast: its casts inside the graph
], ids=["plain-w4", "hinton-w2", "apprentice-w4", "squeezenet-w4", "bf16-w1"])
@pytest.mark.slow
def test_a_replayed_run_equals_the_eager_run_bit_for_bit(splits, monkeypatch, kw):
    cfg = make_cfg(epochs=2, channels_last=True, **kw)
    eager, eager_model, eager_teacher = _fit(splits, cfg)
    capture = EmulatedCapture()
    graphed, graphed_model, graphed_teacher = _fit(splits, cfg.replace(cuda_graphs=True),
                                                   capture, monkeypatch)
    steps = 2 * (320 // cfg.batch_size)
    assert capture.captures == 1 and capture.replays == steps - WARMUP_STEPS
    assert untimed(graphed.history) == untimed(eager.history)
    assert (graphed.test_top1, graphed.final_test_top1) == (eager.test_top1, eager.final_test_top1)
    assert states_equal(graphed_model.state_dict(), eager_model.state_dict())
    if cfg.kd_mode == "apprentice":  # the teacher's own SGD steps after the replay too
        assert states_equal(graphed_teacher.state_dict(), eager_teacher.state_dict())
    assert "train_kd" in graphed.history[0] or cfg.method != "direct_kd"


@pytest.mark.parametrize("first_replayed", [False, True], ids=["eager-then-replayed",
                                                                 "replayed-then-eager"])
@pytest.mark.slow
def test_a_run_paused_one_way_and_resumed_the_other_equals_the_eager_run(
        splits, monkeypatch, tmp_path, first_replayed):
    """cuda_graphs is not in the run id, so a paused run may resume with the other setting:
    its momentum, weights and BN statistics carry over whichever steps trained them."""
    from kdlib.budget import Deadline
    from kdlib.train import RunSuspended

    monkeypatch.setattr(step_mod, "capture_for", lambda device: EmulatedCapture())
    cfg = make_cfg(epochs=3, warmup_epochs=1, method="direct_kd", w_bits=2, a_bits=2)
    teacher = make_model(cfg.replace(w_bits=32, a_bits=32, method="individual"), seed=7)
    ref_model = make_model(cfg)
    ref = fit(ref_model, splits, cfg, teacher=teacher, progress=False, tensorboard=False)
    path = tmp_path / "run.pt"
    first, second = ((cfg.replace(cuda_graphs=True), cfg) if first_replayed
                     else (cfg, cfg.replace(cuda_graphs=True)))
    late = Deadline(stop_at=time.time() + 3600, epoch_s=0.01, tail_s=1e6)  # pauses after 2
    with pytest.raises(RunSuspended):
        fit(make_model(cfg), splits, first, teacher=teacher, checkpoint_path=path,
            progress=False, tensorboard=False, deadline=late)
    model = make_model(cfg, seed=42)
    res = fit(model, splits, second, teacher=teacher, checkpoint_path=path, progress=False,
              tensorboard=False)
    assert states_equal(model.state_dict(), ref_model.state_dict())
    assert metrics(res) == metrics(ref)


def test_cuda_graphs_is_not_part_of_the_run_id_and_a_no_op_on_a_cpu(splits):
    cfg = make_cfg()
    assert cfg.replace(cuda_graphs=True).run_id() == cfg.run_id()
    assert capture_for(torch.device("cpu")) is None
    trainer = step_mod.make_trainer(make_model(cfg), cfg.replace(cuda_graphs=True), device="cpu")
    assert trainer.graphed is None  # eager steps: nothing to capture on a CPU


def test_cuda_graphs_refuses_compile():
    with pytest.raises(ValueError, match="cuda_graphs.*compile"):
        step_mod.make_trainer(make_model(make_cfg()), make_cfg(cuda_graphs=True, compile=True),
                              device="cpu")


def test_the_capture_sees_no_warm_up_gradients(splits, monkeypatch):
    """The capture comes after eager warm-up steps (on CUDA the first steps allocate library
    workspaces and kdlib's caches, which a capture may not do). Gradients left by the warm-up
    are freed before the capture, whose backward then allocates the graph's own (a graph that
    accumulated into them would double every step)."""
    cfg = make_cfg(w_bits=4, a_bits=4)
    seen, taken = [], []

    def capture(fn, stream):
        seen.append([p.grad for p in trainer.model.parameters()])
        taken.append(len(steps))
        return fn

    trainer = step_mod.make_trainer(make_model(cfg), cfg, device="cpu")
    trainer.graphed = GraphedStep(trainer, capture)
    x, y = splits.train_images[:32].float() / 255, splits.train_labels[:32]
    steps = []
    for _ in range(WARMUP_STEPS + 2):
        step_mod.run_step(trainer, x, y, 0.05)
        steps.append(1)
    assert len(seen) == 1 and all(g is None for g in seen[0])
    assert taken == [WARMUP_STEPS] and WARMUP_STEPS >= 1  # eager steps first, then the capture
    assert all(p.grad is not None for p in trainer.model.parameters())


def test_a_step_the_capture_refuses_stays_eager_and_the_run_is_the_eager_run(
        splits, monkeypatch, capsys):
    """A real capture refuses some operations (a sync, a host copy) that the emulator may not
    know: the run then takes eager steps, which compute the same, instead of failing."""
    attempts = []

    def refusing(fn, stream):
        attempts.append(1)
        emulated_capture(fn, stream)  # records the step without running it, as a capture does
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                           "more lines")

    cfg = make_cfg(method="direct_kd", epochs=2, w_bits=4, a_bits=4)
    eager, eager_model, _ = _fit(splits, cfg)
    graphed, graphed_model, _ = _fit(splits, cfg.replace(cuda_graphs=True),
                                     refusing, monkeypatch)
    assert len(attempts) == 1  # tried once, not at every step
    assert untimed(graphed.history) == untimed(eager.history)
    assert (graphed.test_top1, graphed.final_test_top1) == (eager.test_top1, eager.final_test_top1)
    assert states_equal(graphed_model.state_dict(), eager_model.state_dict())
    out = capsys.readouterr().out
    assert out.count("could not be captured") == 1
    assert "operation not permitted when stream is capturing); this run's steps stay eager" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_graph_replays_the_eager_steps_bit_for_bit():
    from kdlib.bench.graphs import check_graph_step

    report = check_graph_step("cuda", steps=WARMUP_STEPS + 5)
    assert report["eager_repeatable"], report
    assert report["equal"], report
