"""Learning-rate schedules: pure functions of a fractional epoch."""
import math

import pytest

from kdlib.config import RunConfig
from kdlib.schedules import cosine_factor, lr_at, lr_factor, multistep_factor, warmup_factor


def cfg(**kw):
    return RunConfig(**{"lr": 0.1, "epochs": 10, "warmup_epochs": 0, **kw})


def test_cosine_starts_at_lr_ends_at_zero_and_is_half_at_midpoint():
    c = cfg(schedule="cosine")
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(5, c) == pytest.approx(0.05)
    assert lr_at(10, c) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(2.5, c) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_cosine_is_monotone_decreasing_per_step():
    c = cfg(schedule="cosine")
    values = [lr_at(e / 7, c) for e in range(0, 71)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-2] > 0  # last training step (epoch 10 - 1/7) is still positive


def test_multistep_drops_at_fractional_milestones():
    c = cfg(schedule="multistep", milestones=(0.5, 0.75), lr_gamma=0.1, epochs=200)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(99.99, c) == pytest.approx(0.1)
    assert lr_at(100, c) == pytest.approx(0.01)
    assert lr_at(149.5, c) == pytest.approx(0.01)
    assert lr_at(150, c) == pytest.approx(0.001)
    assert lr_at(199.9, c) == pytest.approx(0.001)


def test_multistep_gamma_and_no_milestones():
    assert multistep_factor(7, 10, (0.2, 0.6), 0.5) == pytest.approx(0.25)
    assert multistep_factor(7, 10, (), 0.5) == 1.0


def test_warmup_is_linear_from_a_tenth_to_full():
    c = cfg(schedule="multistep", warmup_epochs=2, milestones=(0.9,))
    assert lr_at(0, c) == pytest.approx(0.01)
    assert lr_at(1, c) == pytest.approx(0.055)
    assert lr_at(0.5, c) == pytest.approx(0.1 * (0.1 + 0.9 * 0.25))
    assert lr_at(2, c) == pytest.approx(0.1)
    assert lr_at(5, c) == pytest.approx(0.1)


def test_cosine_after_warmup_spans_remaining_epochs():
    c = cfg(schedule="cosine", warmup_epochs=2, epochs=10)
    assert lr_at(1.999999, c) == pytest.approx(0.1, rel=1e-5)
    assert lr_at(2, c) == pytest.approx(0.1)
    assert lr_at(6, c) == pytest.approx(0.05)  # midpoint of [2, 10]
    assert lr_at(10, c) == pytest.approx(0.0, abs=1e-12)


def test_warmup_over_all_epochs_never_decays():
    assert cosine_factor(3, 4, warmup_epochs=4) == 1.0
    assert warmup_factor(2, 4) == pytest.approx(0.55)
    assert warmup_factor(9, 4) == 1.0
    assert warmup_factor(3, 0) == 1.0


def test_cosine_factor_is_flat_before_its_decay_and_zero_from_its_end_on():
    """1 before ``warmup_epochs`` (the warm-up alone shapes those epochs), 0 at and after
    ``epochs``, a warm-up over every epoch included."""
    assert cosine_factor(0, 10, warmup_epochs=2) == 1.0
    assert cosine_factor(1, 10, warmup_epochs=2) == 1.0
    assert lr_at(1, cfg(schedule="cosine", warmup_epochs=2)) == pytest.approx(0.1 * 0.55)
    assert cosine_factor(12, 10) == 0.0
    assert cosine_factor(4, 4, warmup_epochs=4) == 0.0
    assert cosine_factor(5, 4, warmup_epochs=4) == 0.0
    assert lr_at(10, cfg(schedule="cosine", warmup_epochs=10)) == 0.0


def test_schedule_is_pure():
    c = cfg(schedule="cosine", warmup_epochs=1)
    first = [lr_at(e / 3, c) for e in range(31)]
    assert [lr_at(e / 3, c) for e in range(31)] == first
    assert lr_factor(4.2, c) * c.lr == pytest.approx(lr_at(4.2, c))


def test_unknown_schedule_raises():
    c = cfg()
    c.schedule = "linear"  # bypass validation on purpose
    with pytest.raises(ValueError, match="linear"):
        lr_at(1, c)
