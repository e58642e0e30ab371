"""Live curves: fit() writes each epoch's history row as TensorBoard scalars, and KD runs
report their CE and KD terms apart (kd_loss_terms, bit-identical to kd_loss).

CPU, one thread, resnet8 on a tiny synthetic data set (16x16 colour patterns): seconds.
"""
import numpy as np
import pytest
import torch

import kdlib.train as train_mod
from kdlib.config import RunConfig
from kdlib.data import DataSplits
from kdlib.losses import ce_loss, kd_loss, kd_loss_terms, kd_term
from kdlib.models import create_model
from kdlib.tblog import TENSORBOARD_ENV, TENSORBOARD_TAGS
from kdlib.train import fit

pytest.importorskip("tensorboard", reason="the [tb] extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PLAIN_KEYS = {"train_loss", "train_top1", "val_top1", "val_top5", "val_loss", "lr", "images_per_s"}
KD_KEYS = PLAIN_KEYS | {"train_ce", "train_kd"}


def make_splits(n_train=128, n_val=64, n_test=64, seed=0) -> DataSplits:
    """10 classes, each a fixed colour pattern plus noise, 16x16 pixels."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (10, 3, 4, 4), generator=g).float()

    def part(n):
        labels = torch.arange(n) % 10
        base = torch.nn.functional.interpolate(protos[labels], size=16, mode="nearest")
        return ((base + torch.randn(n, 3, 16, 16, generator=g) * 40).clamp(0, 255).to(torch.uint8),
                labels)

    (a, b), (c, d), (e, f) = part(n_train), part(n_val), part(n_test)
    return DataSplits(a, b, c, d, e, f)


def make_cfg(**kw) -> RunConfig:
    base = dict(model="resnet8", num_classes=10, epochs=2, batch_size=32, lr=0.05,
                eval_batch_size=64, method="individual", seed=0, schedule="cosine")
    return RunConfig(**{**base, **kw})


def make_model(cfg: RunConfig, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(cfg.model, num_classes=cfg.num_classes, w_bits=cfg.w_bits,
                        a_bits=cfg.a_bits, quantizer=cfg.quantizer)


def kd_fit(splits, **fit_kwargs):
    cfg = make_cfg(method="direct_kd", w_bits=4, a_bits=4, kd_alpha=0.7, kd_temperature=4.0)
    teacher = make_model(make_cfg(), seed=1)
    return cfg, fit(make_model(cfg), splits, cfg, teacher=teacher, progress=False, **fit_kwargs)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_scalars(history, keys) -> dict[str, list[tuple[int, float]]]:
    """What the history rows become in TensorBoard: float32 values at step = epoch."""
    return {TENSORBOARD_TAGS[k]: [(row["epoch"], float(np.float32(row[k]))) for row in history]
            for k in keys}


@pytest.fixture(scope="module")
def splits():
    return make_splits()


def test_kd_fit_writes_every_history_row_as_scalars(splits, tmp_path):
    cfg, result = kd_fit(splits, tensorboard=tmp_path / "tb")
    assert all(set(row) == KD_KEYS | {"epoch", "seconds"} for row in result.history)
    assert scalars(tmp_path / "tb") == as_scalars(result.history, KD_KEYS)
    # the two terms are the parts of the optimised loss (means of a linear combination)
    for row in result.history:
        assert row["train_loss"] == pytest.approx(
            (1 - cfg.kd_alpha) * row["train_ce"] + cfg.kd_alpha * row["train_kd"], rel=1e-5)
        assert row["train_kd"] > 0


def test_plain_fit_has_no_kd_terms(splits, tmp_path):
    cfg = make_cfg(epochs=1)
    result = fit(make_model(cfg), splits, cfg, progress=False, tensorboard=tmp_path / "tb")
    assert "train_ce" not in result.history[0] and "train_kd" not in result.history[0]
    assert scalars(tmp_path / "tb") == as_scalars(result.history, PLAIN_KEYS)


def test_default_folder_is_results_tb_run_id_and_can_be_turned_off(splits, tmp_path, monkeypatch):
    cfg = make_cfg(epochs=1)
    monkeypatch.delenv(TENSORBOARD_ENV, raising=False)
    result = fit(make_model(cfg), splits, cfg, progress=False,
                 checkpoint_path=tmp_path / "on" / "checkpoints" / "run-a.pt")
    assert scalars(tmp_path / "on" / "tb" / "run-a") == as_scalars(result.history, PLAIN_KEYS)
    # off: by argument, by environment (what --no-tensorboard sets), or outside a results folder
    fit(make_model(cfg), splits, cfg, progress=False, tensorboard=False,
        checkpoint_path=tmp_path / "arg" / "checkpoints" / "run-a.pt")
    fit(make_model(cfg), splits, cfg, progress=False,
        checkpoint_path=tmp_path / "elsewhere" / "run-a.pt")
    monkeypatch.setenv(TENSORBOARD_ENV, "0")
    fit(make_model(cfg), splits, cfg, progress=False,
        checkpoint_path=tmp_path / "env" / "checkpoints" / "run-a.pt")
    assert not [p for p in tmp_path.rglob("tb") if "on" not in p.parts]
    with pytest.raises(ValueError, match="tensorboard=True"):
        fit(make_model(cfg), splits, cfg, progress=False, tensorboard=True)


def test_resumed_run_replaces_the_scalars_of_the_lost_epoch(splits, tmp_path, monkeypatch):
    """Killed after epoch 2's scalars but before its checkpoint: the resumed session writes
    epoch 2 again and TensorBoard shows it once, with the final history's values."""
    real_save = train_mod._save_checkpoint

    def crash_before_second_checkpoint(path, trainer, progress, wall, model_state=None):
        if progress.epochs_done == 2 and progress.result is None:
            raise KeyboardInterrupt
        real_save(path, trainer, progress, wall, model_state)

    ckpt = tmp_path / "checkpoints" / "run.pt"
    monkeypatch.setattr(train_mod, "_save_checkpoint", crash_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        kd_fit(splits, checkpoint_path=ckpt, tensorboard=True)
    assert [s for s, _ in scalars(tmp_path / "tb" / "run")["val/top1"]] == [1, 2]
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    _, resumed = kd_fit(splits, checkpoint_path=ckpt, tensorboard=True)
    _, clean = kd_fit(splits, tensorboard=False)
    assert [r["val_top1"] for r in resumed.history] == [r["val_top1"] for r in clean.history]
    assert scalars(tmp_path / "tb" / "run") == as_scalars(resumed.history, KD_KEYS)


def test_each_epochs_scalars_are_on_disk_before_the_writer_closes(tmp_path):
    """The curves are live: an epoch's row can be read back while the run goes on (the
    writer's own queue would hold it for minutes)."""
    from kdlib.tblog import scalar_writer, write_scalars

    rows = [{"epoch": 1, "train_loss": 2.5, "val_top1": 12.5, "lr": 0.1},
            {"epoch": 2, "train_loss": 2.0, "val_top1": 25.0, "lr": 0.05}]
    with scalar_writer(tmp_path, epochs_done=0) as writer:
        write_scalars(writer, rows[0])
        assert scalars(tmp_path) == as_scalars(rows[:1], ["train_loss", "val_top1", "lr"])
        write_scalars(writer, rows[1])
        assert scalars(tmp_path) == as_scalars(rows, ["train_loss", "val_top1", "lr"])


class RecordingWriter:
    """Stands in for a SummaryWriter: the calls it gets, in order."""

    def __init__(self, *args, **kwargs):
        self.calls = [("init", args, kwargs)]

    def add_scalar(self, tag, value, global_step):
        self.calls.append(("add_scalar", tag, value, global_step))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_each_row_goes_out_whole_at_its_epoch_and_is_flushed_before_the_next():
    """Every numeric key of a row (an apprentice run's teacher accuracy too) is a scalar at step
    = epoch, and each row is flushed at once (the writer's own queue holds rows for minutes,
    so a watched run would show nothing)."""
    from kdlib.tblog import write_scalars

    keys = sorted(KD_KEYS | {"teacher_val_top1"})
    rows = [{"epoch": e, "seconds": 9.0, **{k: float(10 * e + i) for i, k in enumerate(keys)}}
            for e in (1, 2)]
    writer = RecordingWriter()
    for row in rows:
        write_scalars(writer, row)
    calls = writer.calls[1:]
    ends = [i for i, call in enumerate(calls) if call == ("flush",)]
    assert len(ends) == 2 and ends[-1] == len(calls) - 1
    for row, written in zip(rows, (calls[:ends[0]], calls[ends[0] + 1:ends[1]])):
        # each key's value once, under a tag of its own, at the row's epoch
        assert sorted(value for _, _, value, _ in written) == sorted(row[k] for k in keys)
        assert len({tag for _, tag, _, _ in written}) == len(keys)
        assert {step for *_, step in written} == {row["epoch"]}
    write_scalars(None, rows[0])  # no writer (TensorBoard off): nothing to do


def test_the_writer_hides_the_lost_epochs_and_is_closed_even_when_the_run_is_interrupted(
        tmp_path, monkeypatch):
    """A resumed session's writer purges the steps after the last checkpointed epoch (they are
    written again), and the writer is closed (its file and thread released) however the
    session ends."""
    import torch.utils.tensorboard

    from kdlib.tblog import scalar_writer

    made = []
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter",
                        lambda *a, **kw: made.append(RecordingWriter(*a, **kw)) or made[-1])
    with pytest.raises(KeyboardInterrupt):
        with scalar_writer(tmp_path / "tb", epochs_done=3):
            raise KeyboardInterrupt
    with scalar_writer(tmp_path / "tb", epochs_done=0):
        pass
    assert [w.calls for w in made] == [
        [("init", (str(tmp_path / "tb"),), {"purge_step": 4}), ("close",)],
        [("init", (str(tmp_path / "tb"),), {"purge_step": 1}), ("close",)]]
    with scalar_writer(None, epochs_done=3) as writer:
        assert writer is None and len(made) == 2


def test_an_explicit_setting_wins_over_the_environment_and_a_missing_package(tmp_path,
                                                                            monkeypatch):
    """$KDLIB_TENSORBOARD=0 and a missing tensorboard package turn off only the default:
    tensorboard=True still writes to tb/<run_id> (and asks for the package if it lacks)."""
    import kdlib.tblog as tblog

    ckpt = tmp_path / "checkpoints" / "run-a.pt"
    monkeypatch.delenv(TENSORBOARD_ENV, raising=False)
    assert tblog.tensorboard_dir(None, ckpt) == tmp_path / "tb" / "run-a"
    monkeypatch.setenv(TENSORBOARD_ENV, "0")
    assert tblog.tensorboard_dir(None, ckpt) is None
    assert tblog.tensorboard_dir(True, ckpt) == tmp_path / "tb" / "run-a"
    monkeypatch.setenv(TENSORBOARD_ENV, "1")
    monkeypatch.setattr(tblog, "tensorboard_available", lambda: False)
    assert tblog.tensorboard_dir(None, ckpt) is None  # training goes on without curves
    assert tblog.tensorboard_dir(True, ckpt) == tmp_path / "tb" / "run-a"
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tb\]'"):
        with tblog.scalar_writer(tmp_path / "tb" / "run-a", epochs_done=0):
            pass


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_kd_loss_terms_total_is_kd_loss_bit_for_bit(alpha):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(16, 10, generator=g, requires_grad=True)
    t, y = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    total, ce, kd = kd_loss_terms(s, t, y, 4.0, alpha, label_smoothing=0.1)
    reference = kd_loss(s, t, y, 4.0, alpha, label_smoothing=0.1)
    assert torch.equal(total, reference)
    assert torch.equal(ce, ce_loss(s, y, 0.1)) and torch.equal(kd, kd_term(s, t, 4.0))
    grad, = torch.autograd.grad(total, s)
    reference_grad, = torch.autograd.grad(reference, s)
    assert torch.equal(grad, reference_grad)
    with pytest.raises(ValueError, match="alpha=1.5"):
        kd_loss_terms(s, t, y, 4.0, 1.5)
