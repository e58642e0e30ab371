"""One flat, validated configuration for one training run.

Every hyperparameter of a run lives here so that a run record can store it whole and a run
id can be derived from it. Presets (``kdlib.presets``) fill it; papermill / CLI overrides are
applied on top; ``validate`` runs once before anything is trained or written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from dataclasses import dataclass
from typing import Any

from kdlib.checks import PRECISIONS, QUANTIZERS, check_bits, check_num_classes
from kdlib.models import list_models

# What a run is called; what it trains is its config (init, teacher, epochs). See kdlib.experiments.
METHODS = ("teacher", "individual", "finetune", "direct_kd", "ta_chain", "progressive",
           "progressive_kd32", "direct_kd_matched")
SCHEDULES = ("cosine", "multistep")
KD_MODES = ("hinton", "apprentice")
# The version of the training recipe: bump it whenever a change to kdlib changes what a given
# config computes, so that records made by older code get other run ids and are never reused
# (tests/test_recipe.py compares a tiny grid's numbers with those stored for this version).
# 1: the code of the first quick records (no `recipe` field); 2: exact quantized layers, precision;
# 3: PACT's clip level and LSQ's step learn at their gradient (it was doubled: `positive`).
RECIPE_VERSION = 3
# The last version that changed each quantizer's numbers: a config is made at its quantizer's
# (recipe_for), so a bump that leaves DoReFa's numbers alone leaves its run ids and records too.
RECIPE_OF_QUANTIZER = {"dorefa": 2, "pact": 3, "lsq": 3}
KD_METHODS = ("direct_kd", "ta_chain", "progressive_kd32", "direct_kd_matched")  # distil
# start from a trained model's weights (the teacher's, or the chain's link above)
INIT_METHODS = ("finetune", "direct_kd", "ta_chain", "progressive", "progressive_kd32",
                "direct_kd_matched")
# Fields that change how fast a run goes, never what it computes: left out of the run id, and
# a checkpoint written with other values resumes.
EXECUTION_ONLY_FIELDS = ("eval_batch_size", "preset", "cuda_graphs", "group_weights")


def recipe_for(quantizer: str) -> int:
    """Today's recipe version of a config quantized by ``quantizer`` (see RECIPE_OF_QUANTIZER;
    an unknown quantizer gets RECIPE_VERSION and is refused by :func:`validate`)."""
    return RECIPE_OF_QUANTIZER.get(quantizer, RECIPE_VERSION)


@dataclass
class RunConfig:
    # --- what is trained
    model: str = "resnet20"  # registry name, see kdlib.models.list_models()
    num_classes: int = 100  # CIFAR-100
    w_bits: int = 32  # weight bit width
    a_bits: int = 32  # activation bit width
    quantizer: str = "dorefa"  # dorefa | pact | lsq
    quantize_first_last: bool = False  # first conv / last linear stay fp32 by default
    method: str = "individual"  # one of METHODS (see kdlib.experiments)
    teacher_id: str | None = None  # run id of the teacher (KD methods)
    init_id: str | None = None  # run id whose weights initialise this run (not teacher, individual)
    seed: int = 0  # initial weights, data order and augmentation of this run
    # --- data
    split_seed: int = 0  # seed of the stratified train/val split (fixed across run seeds)
    train_size: int | None = None  # images of the 45k train split used (None: all), stratified
    val_size: int = 5000  # held out of the 50k training images for model selection
    test_size: int | None = None  # None: the full 10k test set
    # --- optimisation
    epochs: int = 200  # training epochs of this run
    batch_size: int = 128  # training batch (the last partial batch of an epoch is dropped)
    lr: float = 0.1  # peak learning rate of SGD
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum (when momentum > 0)
    weight_decay: float = 5e-4  # L2 on every parameter, BatchNorm and biases included
    schedule: str = "cosine"  # cosine | multistep
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of `epochs`
    lr_gamma: float = 0.1  # multistep decay factor
    warmup_epochs: int = 0  # linear warm-up from lr/10 ... lr
    label_smoothing: float = 0.0  # of the cross-entropy term
    # --- distillation
    kd_temperature: float = 4.0  # T of the KD term T^2 KL(softmax(t/T) || softmax(s/T))
    kd_alpha: float = 0.9  # weight of the KD term; 1-alpha on the CE term
    kd_mode: str = "hinton"  # hinton | apprentice (teacher trained jointly)
    # --- execution
    eval_batch_size: int = 1000  # evaluation batch (speed only: not in the run id)
    precision: str = "exact"  # exact (fp32, TF32 on <= 8-bit layers' integer codes on CUDA) | bf16
    channels_last: bool = False  # NHWC memory format (faster convolutions on most devices)
    compile: bool = False  # torch.compile the model
    cuda_graphs: bool = False  # on CUDA, replay each step as a graph (eager kernels: speed only)
    group_weights: bool = True  # quantize all DoReFa weights in one go (same bits: speed only)
    preset: str = "custom"  # name of the preset the config came from (recorded)
    recipe: int = 0  # training-code version, part of the run id (0: today's for the quantizer)

    def __post_init__(self) -> None:
        if self.recipe == 0:  # today's code: the version that last changed this quantizer
            self.recipe = recipe_for(self.quantizer)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = _upgrade_legacy(d)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; accepted: {sorted(names)}")
        d = dict(d)
        if "milestones" in d and d["milestones"] is not None:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def replace(self, **changes: Any) -> "RunConfig":
        if "quantizer" in changes and "recipe" not in changes:
            changes["recipe"] = 0  # another quantizer: today's recipe of that one
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def run_id(self) -> str:
        """Stable id derived from every field that changes what is trained.

        Execution-only fields (:data:`EXECUTION_ONLY_FIELDS`) are left out; precision, compile,
        channels_last and the recipe version are kept because they change the numbers.
        """
        d = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_ONLY_FIELDS}
        digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model}-{self.method}-w{self.w_bits}a{self.a_bits}-s{self.seed}-{digest}"


def describe_fields() -> list[dict[str, str]]:
    """Every RunConfig field with its default and the comment beside it in this file.

    The comments are the fields' documentation; the README's field list is rendered from here
    (``python -m kdlib readme``), so it cannot drift from the code.
    """
    source = inspect.getsource(RunConfig)
    comments = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.M))
    return [{"field": f.name, "default": repr(f.default), "meaning": comments.get(f.name, "")}
            for f in dataclasses.fields(RunConfig)]


def _upgrade_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """A recipe-1 config (records written before `precision` and `recipe` existed) in today's
    fields; its run id then differs from the stored one, as it should: the code differs too."""
    if "bf16" not in d:
        return d
    d = dict(d)
    d["precision"] = "bf16" if d.pop("bf16") else "exact"
    d.setdefault("recipe", 1)
    return d


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(choices)}")


def _check_number(value: Any, name: str, *, low: float, high: float | None = None,
                  low_inclusive: bool = True, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok:
        ok = value >= low if low_inclusive else value > low
        if ok and high is not None:
            ok = value <= high
    if not ok:
        lo = "[" if low_inclusive else "("
        rng = f"{lo}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}={value!r} is invalid; expected {kind} in {rng}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field once; raise ValueError naming the bad field, value and what is accepted."""
    if cfg.model not in list_models():
        raise ValueError(f"model={cfg.model!r} is unknown; accepted: {', '.join(list_models())}")
    check_bits(cfg.w_bits, "w_bits")
    check_bits(cfg.a_bits, "a_bits")
    _check_choice(cfg.quantizer, "quantizer", QUANTIZERS)
    _check_choice(cfg.method, "method", METHODS)
    _check_choice(cfg.schedule, "schedule", SCHEDULES)
    _check_choice(cfg.kd_mode, "kd_mode", KD_MODES)
    _check_choice(cfg.precision, "precision", PRECISIONS)
    _check_number(cfg.recipe, "recipe", low=1, integer=True)
    check_num_classes(cfg.num_classes)
    _check_number(cfg.seed, "seed", low=0, integer=True)
    _check_number(cfg.split_seed, "split_seed", low=0, integer=True)
    _check_number(cfg.epochs, "epochs", low=1, integer=True)
    _check_number(cfg.batch_size, "batch_size", low=1, integer=True)
    _check_number(cfg.eval_batch_size, "eval_batch_size", low=1, integer=True)
    _check_number(cfg.val_size, "val_size", low=100, high=10000, integer=True)
    if cfg.train_size is not None:
        _check_number(cfg.train_size, "train_size", low=100, high=50000 - cfg.val_size,
                      integer=True)
    if cfg.test_size is not None:
        _check_number(cfg.test_size, "test_size", low=100, high=10000, integer=True)
    _check_number(cfg.lr, "lr", low=0.0, low_inclusive=False)
    _check_number(cfg.momentum, "momentum", low=0.0, high=1.0)
    _check_number(cfg.weight_decay, "weight_decay", low=0.0)
    _check_number(cfg.lr_gamma, "lr_gamma", low=0.0, high=1.0, low_inclusive=False)
    _check_number(cfg.warmup_epochs, "warmup_epochs", low=0, high=cfg.epochs, integer=True)
    _check_number(cfg.label_smoothing, "label_smoothing", low=0.0, high=1.0)
    _check_number(cfg.kd_temperature, "kd_temperature", low=0.0, low_inclusive=False)
    _check_number(cfg.kd_alpha, "kd_alpha", low=0.0, high=1.0)
    for m in cfg.milestones:
        _check_number(m, "milestones", low=0.0, high=1.0, low_inclusive=False)
    for name in ("channels_last", "compile", "cuda_graphs", "group_weights"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name}={getattr(cfg, name)!r} is invalid; expected True or False")
    if cfg.cuda_graphs and cfg.compile:
        raise ValueError("cuda_graphs=True replays the eager step's kernels; it does not combine "
                         "with compile=True (set one of them False)")
    # a starting point the method does not take: `train --method individual --init-id T` trained
    # a fine-tune recorded as `individual`, and a teacher was refused only once training began
    if cfg.teacher_id is not None and cfg.method not in KD_METHODS:
        raise ValueError(f"teacher_id is set but method={cfg.method!r} distils from no teacher; "
                         f"methods that do: {', '.join(KD_METHODS)} "
                         "(KD_METHODS in kdlib/config.py)")
    if cfg.init_id is not None and cfg.method not in INIT_METHODS:
        raise ValueError(f"init_id is set but method={cfg.method!r} starts from random weights; "
                         f"methods that start from a trained model: {', '.join(INIT_METHODS)} "
                         "(INIT_METHODS in kdlib/config.py)")
    if list(cfg.milestones) != sorted(cfg.milestones):
        raise ValueError(f"milestones={list(cfg.milestones)!r} must be increasing fractions "
                         "of epochs")
    return cfg
