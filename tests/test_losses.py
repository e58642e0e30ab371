"""KD losses against an independent float64 numpy computation (explicit sums, no torch)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlib.losses import (apprentice_loss_terms, apprentice_losses, ce_loss, kd_loss,
                          kd_loss_terms, kd_term)


def _np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _np_kd_term(s, t, temperature):
    """T^2 * (1/B) * sum_b sum_c p_t log(p_t / p_s): KL summed over classes, mean over batch."""
    p_s = _np_softmax(s / temperature)
    p_t = _np_softmax(t / temperature)
    total = 0.0
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            total += p_t[b, c] * (np.log(p_t[b, c]) - np.log(p_s[b, c]))
    return temperature**2 * total / s.shape[0]


def _np_ce(s, y, eps=0.0):
    logp = np.log(_np_softmax(s))
    k = s.shape[1]
    total = 0.0
    for b in range(s.shape[0]):
        target = np.full(k, eps / k)
        target[y[b]] += 1.0 - eps
        total -= (target * logp[b]).sum()
    return total / s.shape[0]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g) * 3
    t = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    return s, t, y


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_term_matches_explicit_sum(logits, temperature):
    s, t, _ = logits
    got = kd_term(s, t, temperature).item()
    want = _np_kd_term(s.double().numpy(), t.double().numpy(), temperature)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kd_term_is_batchmean_not_elementwise_mean(logits):
    """The public-code trap: reduction='mean' divides by B*C instead of B."""
    s, t, _ = logits
    log_ps, log_pt = F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1)
    trap = (log_pt.exp() * (log_pt - log_ps)).mean() * 16  # what reduction="mean" computes
    good = kd_term(s, t, 4.0)
    assert good.item() == pytest.approx(trap.item() * s.shape[1], rel=1e-5)
    assert good.item() != pytest.approx(trap.item(), rel=1e-2)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_kd_loss_matches_explicit_formula(logits, alpha, eps):
    s, t, y = logits
    T = 4.0
    got = kd_loss(s, t, y, T, alpha, label_smoothing=eps).item()
    sn, tn, yn = s.double().numpy(), t.double().numpy(), y.numpy()
    want = (1 - alpha) * _np_ce(sn, yn, eps) + alpha * _np_kd_term(sn, tn, T)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_alpha_zero_is_plain_cross_entropy(logits):
    s, t, y = logits
    assert torch.equal(kd_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))
    assert ce_loss(s, y).item() == pytest.approx(_np_ce(s.double().numpy(), y.numpy()), rel=1e-6)
    # the teacher logits are not even looked at: a run without a teacher can pass None
    assert torch.equal(kd_loss(s, None, y, 4.0, 0.0), F.cross_entropy(s, y))


def test_alpha_one_is_pure_soft_targets_and_ignores_the_labels(logits):
    """alpha = 1 distils without labels: a batch whose labels are all ``ignore_index`` (an
    unlabelled batch; its CE is 0/0 = NaN) still gives the KD term, not NaN."""
    s, t, _ = logits
    unlabelled = torch.full((s.shape[0],), -100)
    want = _np_kd_term(s.double().numpy(), t.double().numpy(), 4.0)
    assert kd_loss(s, t, unlabelled, 4.0, 1.0).item() == pytest.approx(want, rel=1e-5)
    total, _, kd = kd_loss_terms(s, t, unlabelled, 4.0, 1.0)
    assert torch.equal(total, kd)


def test_identical_logits_give_zero_kd_term(logits):
    s, _, y = logits
    assert kd_term(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    # and the KD term is positive when the distributions differ
    assert kd_term(s, -s, 4.0).item() > 0.1


def test_gradient_flows_to_student_only(logits):
    s, t, y = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    kd_loss(s, t, y, 4.0, 0.9).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_gradient_matches_analytic_form(logits):
    """d(T^2 KL)/ds = T/B * (softmax(s/T) - softmax(t/T))."""
    s, t, _ = logits
    T = 3.0
    s = s.clone().double().requires_grad_(True)
    kd_term(s, t.double(), T).backward()
    sn, tn = s.detach().numpy(), t.double().numpy()
    want = T / s.shape[0] * (_np_softmax(sn / T) - _np_softmax(tn / T))
    np.testing.assert_allclose(s.grad.double().numpy(), want, rtol=1e-4, atol=1e-7)


def test_teacher_logits_from_inference_mode_can_be_used(logits):
    s, t, y = logits
    teacher = torch.nn.Linear(10, 10)
    with torch.inference_mode():
        t_inf = teacher(t)
    s = s.clone().requires_grad_(True)
    kd_loss(s, t_inf, y, 4.0, 0.5).backward()
    assert torch.isfinite(s.grad).all()


def test_bf16_logits_are_computed_in_float32(logits):
    s, t, y = logits
    loss = kd_loss(s.bfloat16(), t.bfloat16(), y, 4.0, 0.9)
    assert loss.dtype == torch.float32
    ref = kd_loss(s.bfloat16().float(), t.bfloat16().float(), y, 4.0, 0.9)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_apprentice_losses_split_gradients(logits):
    s, t, y = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    student_loss, teacher_loss = apprentice_losses(s, t, y, 4.0, 0.5)
    assert student_loss.item() == pytest.approx(kd_loss(s, t, y, 4.0, 0.5).item())
    assert teacher_loss.item() == pytest.approx(F.cross_entropy(t, y).item())
    (student_loss + teacher_loss).backward()
    # the teacher's gradient is that of its own CE only, untouched by the KD term
    t2 = t.detach().clone().requires_grad_(True)
    F.cross_entropy(t2, y).backward()
    torch.testing.assert_close(t.grad, t2.grad)
    s2 = s.detach().clone().requires_grad_(True)
    kd_loss(s2, t.detach(), y, 4.0, 0.5).backward()
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize("loss", [kd_loss, kd_loss_terms, apprentice_losses,
                                  apprentice_loss_terms])
@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_bad_arguments_raise(logits, bad, loss):
    """Every entry point refuses them: the training step calls the ``*_terms`` functions, where
    an alpha outside [0, 1] would otherwise mix the terms with a negative weight."""
    s, t, y = logits
    kw = {"temperature": 4.0, "alpha": 0.5, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        loss(s, t, y, **kw)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_apprentice_losses_smooth_both_the_students_and_the_teachers_labels(logits, alpha):
    s, t, y = logits
    student_loss, teacher_loss = apprentice_losses(s, t, y, 4.0, alpha, label_smoothing=0.1)
    assert teacher_loss.item() == pytest.approx(_np_ce(t.double().numpy(), y.numpy(), 0.1))
    assert student_loss.item() == pytest.approx(kd_loss(s, t, y, 4.0, alpha, 0.1).item())
    assert teacher_loss.item() != pytest.approx(_np_ce(t.double().numpy(), y.numpy()))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_apprentice_loss_terms_are_the_two_losses_and_the_students_terms(logits, alpha):
    """The terms the apprentice step reports: the two losses bit for bit apprentice_losses', the
    student's CE and KD term kd_loss_terms' (the KD term even at alpha = 0)."""
    s, t, y = logits
    student, teacher, ce, kd = apprentice_loss_terms(s, t, y, 4.0, alpha, 0.1)
    assert torch.equal(torch.stack([student, teacher]),
                       torch.stack(apprentice_losses(s, t, y, 4.0, alpha, 0.1)))
    _, want_ce, want_kd = kd_loss_terms(s, t, y, 4.0, alpha, 0.1)
    assert torch.equal(ce, want_ce) and torch.equal(kd, want_kd)
    assert torch.equal(ce, ce_loss(s, y, 0.1)) and torch.equal(kd, kd_term(s, t, 4.0))


@pytest.mark.parametrize("alpha", [0.3, 0.9])
def test_kd_loss_gradient_mixes_the_ce_and_kd_gradients(logits, alpha):
    """d/ds [(1-a) CE + a T^2 KL] = (1-a)/B (softmax(s) - onehot) + a T/B (softmax(s/T) -
    softmax(t/T)): both terms pass their gradient to the student."""
    s, t, y = logits
    T = 3.0
    s = s.clone().double().requires_grad_(True)
    kd_loss(s, t.double(), y, T, alpha).backward()
    sn, tn, B = s.detach().numpy(), t.double().numpy(), s.shape[0]
    onehot = np.eye(s.shape[1])[y.numpy()]
    want = ((1 - alpha) / B * (_np_softmax(sn) - onehot)
            + alpha * T / B * (_np_softmax(sn / T) - _np_softmax(tn / T)))
    np.testing.assert_allclose(s.grad.double().numpy(), want, rtol=1e-4, atol=1e-7)


def test_kd_term_of_a_single_image_is_its_kl_summed_over_classes(logits):
    s, t, _ = logits
    got = kd_term(s[:1], t[:1], 4.0).item()
    want = _np_kd_term(s[:1].double().numpy(), t[:1].double().numpy(), 4.0)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
