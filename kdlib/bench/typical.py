"""(d): a KD training step written the way typical public research code (TAKD-style) writes it.

Independent of kdlib's models and quantizers on purpose (it imports neither ``kdlib.quant`` nor
``kdlib.models``), so that (d) costs what the code it stands for costs:

* **model**: its own CIFAR ResNet-20, the same architecture as kdlib's ``resnet20`` (option-A
  shortcuts, full-precision first conv and classifier, the 3x3 convs of the blocks quantized),
  written the plain way: ``nn.Conv2d`` subclasses whose forward quantizes the weight on every
  call, and the activation quantizer as a separate module applied to each conv's input;
* **DoReFa** as public code writes it: separate ``tanh`` / ``max`` / ``round`` ops and one
  ``torch.autograd.Function`` per quantizer (straight-through), weights re-quantized every step;
* **data**: a ``DataLoader`` (2 workers) over PIL images with torchvision transforms; NCHW
  float32, eager;
* **step**: teacher in ``eval()`` *without* ``no_grad`` (its logits ``.detach()``-ed), KL as
  ``kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T^2``, ``optimizer.zero_grad()``,
  and a ``loss.item()`` per step for the running-loss meter.

The arithmetic is kdlib's (the tests check the quantizers and the whole network against
kdlib's), so (c)/(d) compares speed, not different computations.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from kdlib.data import CIFAR100_MEAN, CIFAR100_STD

TYPICAL_WORKERS = 2


# ----------------------------------------------------------------------------- DoReFa
class WeightQuantizeFn(torch.autograd.Function):
    """k-bit weight rounding (``sign`` at 1 bit); the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:  # noqa: D102
        if bits == 1:
            return torch.sign(x)
        n = 2**bits - 1
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        return grad_output, None


class ActivationQuantizeFn(torch.autograd.Function):
    """k-bit rounding of an activation in [0, 1]; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:  # noqa: D102
        n = 2**bits - 1
        return torch.round(x * n) / n

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        return grad_output, None


def quantize_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights: ``2 q(tanh w / (2 max|tanh w|) + 1/2) - 1``; 1 bit: ``sign(w/E) E``,
    ``E = mean|w|`` held constant (so the gradient is the identity)."""
    if bits == 32:
        return w
    if bits == 1:
        e = torch.mean(torch.abs(w)).detach()
        return WeightQuantizeFn.apply(w / e, 1) * e
    t = torch.tanh(w)
    max_t = torch.max(torch.abs(t))
    return 2 * WeightQuantizeFn.apply(t / (2 * max_t) + 0.5, bits) - 1


class ActivationQuantizer(nn.Module):
    """DoReFa activations: clip to [0, 1], then k-bit rounding (32 bits: the identity)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if self.bits == 32:
            return x
        return ActivationQuantizeFn.apply(torch.clamp(x, 0, 1), self.bits)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is DoReFa-quantized in every forward."""

    def __init__(self, *args: Any, bits: int = 32, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        w = quantize_weight(self.weight, self.bits)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ----------------------------------------------------------------------------- ResNet-20
class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fn(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, bits: int):
        super().__init__()
        self.act_q = ActivationQuantizer(bits)
        self.conv1 = QuantConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False,
                                 bits=bits)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = QuantConv2d(planes, planes, 3, stride=1, padding=1, bias=False, bits=bits)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:  # option A: subsample, zero-pad the channels
            pad = (planes - in_planes) // 2
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::stride, ::stride],
                                (0, 0, 0, 0, pad, planes - in_planes - pad)))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = F.relu(self.bn1(self.conv1(self.act_q(x))))
        out = self.bn2(self.conv2(self.act_q(out)))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 16/32/64 channels, three blocks per stage."""

    def __init__(self, num_classes: int = 100, bits: int = 32):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 3, 1, bits)
        self.layer2 = self._make_layer(32, 3, 2, bits)
        self.layer3 = self._make_layer(64, 3, 2, bits)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int, bits: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, bits))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size(3))
        return self.fc(out.view(out.size(0), -1))


# ----------------------------------------------------------------------------- data
def typical_transform():
    """The torchvision transform of typical CIFAR training code, with CIFAR-100's mean/std."""
    from torchvision import transforms as T  # lazy: importing torchvision takes seconds

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


class PILImageDataset(torch.utils.data.Dataset):
    """A torchvision-CIFAR-style dataset built in memory from uint8 ``[N,3,32,32]`` images.

    Like ``torchvision.datasets.CIFAR100`` it keeps an ``[N,32,32,3]`` uint8 numpy array and a
    list of int targets, and ``__getitem__`` makes a PIL image and runs ``transform`` on it.
    (``torchvision.datasets.CIFAR100`` itself is not used: its md5 check refuses valid copies
    whose bytes differ from the official archive.)
    """

    def __init__(self, images_u8: Tensor, labels: Tensor, transform=None):
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
            raise ValueError(f"images_u8 must be uint8 [N,3,H,W], got {images_u8.dtype} "
                             f"{tuple(images_u8.shape)}")
        if len(labels) != len(images_u8):
            raise ValueError(f"{len(labels)} labels for {len(images_u8)} images")
        self.data = np.ascontiguousarray(images_u8.cpu().permute(0, 2, 3, 1).numpy())
        self.targets = [int(t) for t in labels.cpu().tolist()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def typical_loader(images_u8: Tensor, labels: Tensor, batch_size: int, *,
                   workers: int = TYPICAL_WORKERS, seed: int = 0,
                   pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """``DataLoader(PILImageDataset(..., typical_transform()), shuffle=True,
    num_workers=workers)``."""
    dataset = PILImageDataset(images_u8, labels, typical_transform())
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def loader_info(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    transform = loader.dataset.transform
    steps = getattr(transform, "transforms", [transform])
    return {"class": f"{type(loader).__module__}.{type(loader).__qualname__}",
            "dataset": type(loader.dataset).__name__, "num_workers": loader.num_workers,
            "batch_size": loader.batch_size, "pin_memory": loader.pin_memory,
            "prefetch_factor": loader.prefetch_factor,
            "persistent_workers": loader.persistent_workers,
            "transforms": [repr(t) for t in steps]}


def endless(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:  # a new epoch (and new workers, as in typical code) whenever one ends
        yield from loader


# ----------------------------------------------------------------------------- the KD step
class TypicalKDStep:
    """One KD update on a batch, as a typical training loop's body writes it."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, lr: float, momentum: float,
                 nesterov: bool, weight_decay: float, temperature: float, alpha: float):
        self.student, self.teacher = student.train(), teacher
        self.teacher.eval()  # eval() yes, but no torch.no_grad(): the forward records a graph
        self.optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum,
                                         nesterov=nesterov, weight_decay=weight_decay)
        self.temperature, self.alpha = temperature, alpha
        self.loss_sum, self.count = 0.0, 0  # the AverageMeter of typical training loops

    def __call__(self, x: Tensor, y: Tensor) -> None:
        t = self.temperature
        t_logits = self.teacher(x).detach()
        logits = self.student(x)
        ce = F.cross_entropy(logits, y)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(t_logits / t, dim=1),
                      reduction="batchmean") * t * t
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.item() * x.size(0)  # one host sync per step
        self.count += x.size(0)
