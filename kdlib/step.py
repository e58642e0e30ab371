"""One training step, the thing both ``fit()`` and the benchmark run.

:func:`make_trainer` builds everything a step needs once (device placement, memory format,
optimizers, compiled forwards, the CUDA-graph replay); :func:`train_step` sets the learning
rate, computes :func:`batch_loss` and updates the weights; :func:`run_step` is the step a run
takes, :func:`train_step` or its replay as a CUDA graph (``cuda_graphs``, :class:`GraphedStep`).
The benchmark times :func:`run_step` itself, so a change here is measured the moment it is made.

Losses by mode:

* ``plain`` (no teacher): cross-entropy.
* ``hinton``: the teacher runs in ``eval()`` under ``torch.inference_mode()`` with its quantized
  weights computed once (:func:`frozen_teacher`) and never receives gradients;
  :func:`kdlib.losses.kd_loss`.
* ``apprentice``: teacher and student train together (:func:`kdlib.losses.apprentice_losses`),
  the teacher with its own SGD on the same hyperparameters and schedule.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdlib.compile_check import require_exact_levels
from kdlib.config import KD_METHODS, RunConfig, validate
from kdlib.device import pick_device
from kdlib.losses import apprentice_loss_terms, ce_loss, kd_loss_terms
from kdlib.quant import (freeze_quantized_weights, set_precision, set_weight_grouping,
                         unfreeze_quantized_weights)


@dataclass
class Trainer:
    """What one training step needs, built once per run by :func:`make_trainer`."""

    cfg: RunConfig
    mode: str  # plain | hinton | apprentice
    device: torch.device
    model: nn.Module
    forward: Callable[[Tensor], Tensor]  # the model, or its compiled version
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None = None
    teacher_forward: Callable[[Tensor], Tensor] | None = None
    teacher_optimizer: torch.optim.Optimizer | None = None
    graphed: GraphedStep | None = None  # the step replayed as a CUDA graph (cuda_graphs on CUDA)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.teacher_optimizer) if o is not None]

    @property
    def uses_teacher_logits(self) -> bool:
        """False for a hinton run with kd_alpha = 0: the teacher is then never run."""
        return self.mode == "apprentice" or (self.mode == "hinton" and self.cfg.kd_alpha > 0)


def kd_mode(cfg: RunConfig, teacher: nn.Module | None) -> str:
    """'plain', 'hinton' or 'apprentice'; ValueError on a method/teacher mismatch."""
    if cfg.method in KD_METHODS and teacher is None:
        raise ValueError(f"method={cfg.method!r} distils from a teacher but got teacher=None; "
                         "pass the teacher model")
    if teacher is not None and cfg.method not in KD_METHODS:
        raise ValueError(f"got a teacher but method={cfg.method!r} does not use one; "
                         f"teacher-using methods: {', '.join(KD_METHODS)}")
    return "plain" if teacher is None else cfg.kd_mode  # kd_mode checked by validate()


def make_optimizer(module: nn.Module, cfg: RunConfig) -> torch.optim.SGD:
    """SGD with momentum (Nesterov if asked) and weight decay on all parameters."""
    return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=bool(cfg.nesterov and cfg.momentum > 0),
                           weight_decay=cfg.weight_decay)


def make_trainer(model: nn.Module, cfg: RunConfig, *, teacher: nn.Module | None = None,
                 device: str | torch.device | None = None) -> Trainer:
    """Validate ``cfg``, move the models to the device and memory format, build optimizers
    (and, for ``cuda_graphs`` on CUDA, the step's :class:`GraphedStep`). A compiled run
    (``compile``) first checks that its quantizers' compiled levels are exact on the device
    (:func:`kdlib.compile_check.require_exact_levels`)."""
    validate(cfg)
    mode = kd_mode(cfg, teacher)
    device = pick_device(device)
    nets = (model, teacher) if teacher is not None else (model,)
    if cfg.compile:  # never a compiled run whose low-bit levels are not exact on this device
        require_exact_levels(nets, device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for net in nets:
        set_precision(net.to(device=device, memory_format=fmt), cfg.precision)
        set_weight_grouping(net, cfg.group_weights)  # a quantized assistant teaches too
    compile_ = torch.compile if cfg.compile else (lambda m: m)
    trainer = Trainer(
        cfg=cfg, mode=mode, device=device, model=model, forward=compile_(model),
        optimizer=make_optimizer(model, cfg), teacher=teacher,
        teacher_forward=compile_(teacher) if teacher is not None else None,
        teacher_optimizer=make_optimizer(teacher, cfg) if mode == "apprentice" else None)
    capture = capture_for(device) if cfg.cuda_graphs else None
    if capture is not None:
        trainer.graphed = GraphedStep(trainer, capture)
    return trainer


@contextlib.contextmanager
def frozen_teacher(trainer: Trainer) -> Iterator[None]:
    """For the duration of training: a hinton teacher in eval() with its quantized weights
    computed once; an apprentice teacher in train(). Restores the teacher's mode afterwards."""
    teacher = trainer.teacher
    if teacher is None:
        yield
        return
    was_training = teacher.training
    frozen = trainer.mode == "hinton"
    try:
        if frozen:
            teacher.eval()
            freeze_quantized_weights(teacher)
        else:
            teacher.train()
        yield
    finally:
        if frozen:
            unfreeze_quantized_weights(teacher)
        teacher.train(was_training)


def autocast(device: torch.device, precision: str, *, cache: bool = True):
    """bf16 autocast for ``precision="bf16"`` (full-precision layers and the losses' inputs;
    quantized layers follow their own precision), else a no-op context. ``cache=False`` casts
    the weights at every use instead of once per context: the same values, as a captured CUDA
    graph needs (its casts must be replayed)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16", cache_enabled=cache)


def batch_loss(trainer: Trainer, x: Tensor, y: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """(student loss, loss to differentiate, student logits, the student's detached (CE, KD)
    terms or None when the step uses no teacher logits). The two losses differ only for
    apprentice runs, where the teacher's own CE is added."""
    cfg = trainer.cfg
    t_logits = None
    cache = trainer.graphed is None
    if trainer.mode == "hinton" and trainer.uses_teacher_logits:
        with torch.inference_mode(), autocast(trainer.device, cfg.precision, cache=cache):
            t_logits = trainer.teacher_forward(x)
    with autocast(trainer.device, cfg.precision, cache=cache):
        logits = trainer.forward(x)
        if trainer.mode == "apprentice":
            t_logits = trainer.teacher_forward(x)
    if t_logits is None:
        loss = ce_loss(logits, y, cfg.label_smoothing)
        return loss, loss, logits, None
    if trainer.mode == "hinton":
        loss, ce, kd = kd_loss_terms(logits, t_logits, y, cfg.kd_temperature, cfg.kd_alpha,
                                     cfg.label_smoothing)
        return loss, loss, logits, (ce.detach(), kd.detach())
    # the teacher learns from its own CE, the student from kd_loss against its detached logits
    loss, t_loss, ce, kd = apprentice_loss_terms(logits, t_logits, y, cfg.kd_temperature,
                                                 cfg.kd_alpha, cfg.label_smoothing)
    return loss, loss + t_loss, logits, (ce.detach(), kd.detach())


def set_lr(trainer: Trainer, lr: float) -> None:
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def forward_backward(trainer: Trainer, x: Tensor, y: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """A step before its update: fresh gradients of :func:`batch_loss`; returns the detached
    (student loss, total loss, logits, (CE, KD) terms or None). What a replayed step captures."""
    for opt in trainer.optimizers:
        opt.zero_grad(set_to_none=True)
    loss, total, logits, terms = batch_loss(trainer, x, y)
    total.backward()
    return loss.detach(), total.detach(), logits.detach(), terms


def update(trainer: Trainer, lr: float, terms: tuple[Tensor, Tensor] | None,
           terms_sum: Tensor | None) -> None:
    """A step's SGD update at learning rate ``lr``, and its (CE, KD) ``terms`` added to
    ``terms_sum`` in place when both are given."""
    set_lr(trainer, lr)
    for opt in trainer.optimizers:
        opt.step()
    if terms_sum is not None and terms is not None:
        terms_sum += torch.stack(terms)


def train_step(trainer: Trainer, x: Tensor, y: Tensor, lr: float, *,
               terms_sum: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One optimizer update at learning rate ``lr``; returns the detached (student loss,
    total loss, logits). Reads nothing back to the host. ``terms_sum`` (2 floats on the
    device): the step's (CE, KD) terms are added to it in place when it uses a teacher."""
    loss, total, logits, terms = forward_backward(trainer, x, y)
    update(trainer, lr, terms, terms_sum)
    return loss, total, logits


# ----------------------------------------------------------------------------- replayed step
# fit()'s training step replayed as a CUDA graph (``cuda_graphs=True`` on a CUDA device).
#
# On the H200 the eager KD step is bound by the host, not the GPU: 1,134 kernel launches a
# step, the GPU busy 10% of it (``results/bench/NVIDIA_H200.json``, its profile). A CUDA graph
# launches a step's kernels at once. What is captured: the batch loss (student and teacher
# forward, the losses) and its backward, which writes the gradients into the graph's memory.
# What stays eager: copying each batch into the graph's input, the learning rate and the SGD
# update (torch's SGD takes its learning rate as a Python number, which a graph would freeze,
# and the schedule changes it every step; the update is a few multi-tensor kernels), and the
# epoch's metrics. So a replayed step runs the kernels an eager step runs, in the same order,
# on the same values: eager's arithmetic (unlike a compiled graph's, see
# :mod:`kdlib.bench.compiled`). :func:`kdlib.bench.graphs.check_graph_step` compares the two
# bit for bit on the device.
#
# The first GRAPH_WARMUP_STEPS steps of each GraphedStep run eagerly, on the stream the graph
# is then captured on (cuDNN and cuBLAS handles, kdlib's cached divisors and segment
# indices, the optimizer's momentum buffers exist before the capture); the next step is
# captured and replayed, as every later one is. What the step may not do, and does not: change
# shapes (``train_batches`` drops the last partial batch), read values back to the host, build
# tensors from host data, or replace a parameter instead of updating it in place (checked on a
# CPU by tests/test_graphed_step.py under the capture emulated in tests/graph_emulator.py).

GRAPH_WARMUP_STEPS = 3  # eager steps before the capture (the documented recipe warms up a few)

# (the step's forward and backward, the stream to capture on) -> a function that replays it
Capture = Callable[[Callable[[], None], "torch.cuda.Stream | None"], Callable[[], None]]


def cuda_capture(fn: Callable[[], None], stream: torch.cuda.Stream | None) -> Callable[[], None]:
    """``fn`` captured into one CUDA graph (its kernels recorded, not run); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def capture_for(device: torch.device) -> Capture | None:
    """How ``device`` captures a step: CUDA graphs on CUDA; None elsewhere (the step then runs
    eagerly, so ``cuda_graphs=True`` changes nothing on a CPU)."""
    return cuda_capture if device.type == "cuda" else None


class GraphedStep:
    """:func:`train_step`'s signature and results, the forward and backward replayed from one
    captured graph after :data:`GRAPH_WARMUP_STEPS` eager steps. The tensors it returns are the
    graph's outputs: the next step overwrites them, as it does the gradients."""

    def __init__(self, trainer: Trainer, capture: Capture):
        self.trainer, self.capture = trainer, capture
        self.stream = torch.cuda.Stream(trainer.device) if trainer.device.type == "cuda" else None
        self.eager_steps = 0
        self.replay: Callable[[], None] | None = None
        self.static_x: Tensor | None = None
        self.static_y: Tensor | None = None
        self.outputs: tuple | None = None
        self.refused: str | None = None  # why the capture failed, when it did (steps stay eager)

    def __call__(self, x: Tensor, y: Tensor, lr: float, *,
                 terms_sum: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        trainer = self.trainer
        if self.replay is None:
            if self.eager_steps < GRAPH_WARMUP_STEPS:
                self.eager_steps += 1
                with self._on_capture_stream():
                    return train_step(trainer, x, y, lr, terms_sum=terms_sum)
            try:
                self._capture(x, y)
            except RuntimeError as err:  # an operation the device's capture refuses
                return self._stay_eager(err, x, y, lr, terms_sum)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.replay()
        loss, total, logits, terms = self.outputs
        update(trainer, lr, terms, terms_sum)
        return loss, total, logits

    def _capture(self, x: Tensor, y: Tensor) -> None:
        trainer = self.trainer
        self.static_x, self.static_y = x.clone(), y.clone()  # clone keeps channels_last
        for opt in trainer.optimizers:  # the warm-up's gradients are freed before the capture
            opt.zero_grad(set_to_none=True)

        def captured() -> None:
            # the gradients it allocates are the graph's, rewritten at every replay: nothing
            # sets them to None between steps (its own zero_grad runs at the capture only)
            self.outputs = forward_backward(trainer, self.static_x, self.static_y)

        self.replay = self.capture(captured, self.stream)

    def _stay_eager(self, err: RuntimeError, x: Tensor, y: Tensor, lr: float,
                    terms_sum: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """A capture that failed ran none of its kernels (the weights, statistics and momentum
        are as the last eager step left them): the run goes on with eager steps, which compute
        what a replay would, and says so rather than lose its epochs."""
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        self.refused = f"{type(err).__name__}: {first_line}"
        print(f"cuda_graphs: the step could not be captured ({self.refused}); this run's steps "
              "stay eager (the same arithmetic, slower)", flush=True)
        self.replay = self.outputs = None
        self.trainer.graphed = None  # run_step takes eager steps from now on
        return train_step(self.trainer, x, y, lr, terms_sum=terms_sum)

    def check_replayed(self) -> None:
        """Raise if the capture was refused: what measures replayed steps must not time or
        compare the eager steps taken in their place."""
        if self.refused:
            raise RuntimeError(f"the step could not be captured: {self.refused}")

    @contextlib.contextmanager
    def _on_capture_stream(self) -> Iterator[None]:
        """Run on the capture stream, after and before the current stream's work (a no-op
        off CUDA)."""
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)


def run_step(trainer: Trainer, x: Tensor, y: Tensor, lr: float, *,
             terms_sum: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The step a run takes: :func:`train_step`, or its CUDA-graph replay when the trainer has
    one (the same results; the returned tensors are then overwritten by the next step)."""
    if trainer.graphed is not None:
        return trainer.graphed(x, y, lr, terms_sum=terms_sum)
    return train_step(trainer, x, y, lr, terms_sum=terms_sum)
