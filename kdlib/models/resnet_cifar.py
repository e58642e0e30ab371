"""CIFAR ResNets of He et al. 2016 (sec. 4.2): depth 6n+2, three stages of n BasicBlocks.

Channels 16/32/64, stride 2 at the first block of stages 2 and 3, global average pool, one
linear classifier. Shortcuts are **option A** (parameter-free: subsample by 2 and zero-pad the
new channels), as in the paper's CIFAR experiments; ResNet-20 then has 0.27 M parameters
(275,572 with 100 classes).

Quantization: every 3x3 conv of the residual blocks is a :class:`~kdlib.quant.QConv2d` at
``w_bits``/``a_bits`` whose input quantizer sees the block's input or the ReLU output inside the
block, i.e. always a non-negative post-ReLU tensor (what DoReFa's [0, 1] clip assumes). The
ReLU inside the block feeds only the second conv: where that conv's input quantizer absorbs it
(DoReFa's clip, ``input_absorbs_relu``) it is left out, two passes over the activation fewer
and the same bits forward and backward (``tests/test_models.py``). The
shortcut carries the full-precision block input, as in the DoReFa / PACT / LSQ ResNets. The
first conv and the classifier are full precision unless ``quantize_first_last``: then the
first conv's weights are quantized but never its input (the normalised image, signed), and
the classifier's weights *and* its input (the pooled post-ReLU features) are quantized.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.models import register_model
from kdlib.quant import QConv2d, QLinear, weights_quantized_together

STAGE_WIDTHS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Option-A shortcut: x[:, :, ::s, ::s] zero-padded to ``out_planes`` channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, **qkw: Any):
        super().__init__()
        self.conv1 = QConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False, **qkw)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = QConv2d(planes, planes, 3, stride=1, padding=1, bias=False, **qkw)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (ShortcutA(in_planes, planes, stride)
                                    if stride != 1 or in_planes != planes else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = self.bn1(self.conv1(x))
        # DoReFa's clip to [0, 1] is this ReLU and more; a layer without the property (the ONNX
        # export's plain conv) keeps it
        if not getattr(self.conv2, "input_absorbs_relu", False):
            out = F.relu(out, inplace=True)
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out, inplace=True)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images; see the module docstring for what is quantized."""

    def __init__(self, depth: int, num_classes: int = 100, w_bits: int = 32, a_bits: int = 32,
                 quantizer: str = "dorefa", quantize_first_last: bool = False):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth={depth!r} is invalid; expected 6n+2 with n >= 1 "
                             "(8, 14, 20, ...)")
        blocks = (depth - 2) // 6
        qkw = dict(w_bits=w_bits, a_bits=a_bits, quantizer=quantizer)
        edge_w_bits = w_bits if quantize_first_last else 32
        self.depth = depth
        self.conv1 = QConv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False, w_bits=edge_w_bits,
                             quantizer=quantizer, quantize_input=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_planes = STAGE_WIDTHS[0]
        stages = []
        for i, planes in enumerate(STAGE_WIDTHS):
            layers = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, **qkw))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = QLinear(in_planes, num_classes, w_bits=edge_w_bits,
                          a_bits=a_bits if quantize_first_last else 32, quantizer=quantizer,
                          quantize_input=quantize_first_last)
        self._init_weights()

    def _init_weights(self) -> None:
        # He (fan-in) normal init for the convs, as in the paper; BN starts as the identity.
        # No random numbers depend on the bit width: same seed -> same initial weights at
        # every precision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @weights_quantized_together  # the same values as layer by layer, a fraction of the kernels
    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(depth: int, **kw: Any) -> CifarResNet:
    return CifarResNet(depth, **kw)


@register_model
def resnet8(**kw: Any) -> CifarResNet:
    """ResNet-8 (n=1)."""
    return _resnet(8, **kw)


@register_model
def resnet14(**kw: Any) -> CifarResNet:
    """ResNet-14 (n=2)."""
    return _resnet(14, **kw)


@register_model
def resnet20(**kw: Any) -> CifarResNet:
    """ResNet-20 (n=3): the workbook's model, 0.27 M parameters."""
    return _resnet(20, **kw)


@register_model
def resnet32(**kw: Any) -> CifarResNet:
    """ResNet-32 (n=5)."""
    return _resnet(32, **kw)


@register_model
def resnet56(**kw: Any) -> CifarResNet:
    """ResNet-56 (n=9)."""
    return _resnet(56, **kw)


@register_model
def resnet110(**kw: Any) -> CifarResNet:
    """ResNet-110 (n=18)."""
    return _resnet(110, **kw)
