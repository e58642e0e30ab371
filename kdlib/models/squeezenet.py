"""SqueezeNet 1.1 (Iandola et al. 2016) adapted to 32x32 CIFAR images.

Kept from 1.1: the eight Fire modules (squeeze 16/16/32/32/48/48/64/64, expand 64..256 as 1x1
and 3x3 halves), max pools after fire 3 and fire 5, dropout 0.5, a 1x1 classifier conv and
global average pooling. Changed for 32x32 inputs and low precision (each change says why):

* stem: 3x3 conv, stride 1, 64 channels (1.1: 3x3 stride 2) and no max pool after it, so the
  feature maps are 32 -> 16 -> 8 instead of collapsing to 2x2;
* BatchNorm after every conv (``batch_norm=True``, convs then have no bias): DoReFa weights
  live in [-1, 1] and activations are clipped to [0, 1], so without a per-channel rescale the
  pre-activations of a quantized fire module would saturate the next clip;
* no ReLU after the classifier conv: logits must be free to be negative for softmax / KD.

Quantization as in the ResNets: fire convs are :class:`~kdlib.quant.QConv2d` whose inputs are
post-ReLU; stem and classifier conv stay full precision unless ``quantize_first_last`` (stem:
weights only; classifier: weights and input).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.models import register_model
from kdlib.quant import QConv2d, weights_quantized_together

# (in_planes, squeeze, expand1x1, expand3x3) of fire2..fire9; "M" marks a 3x3/2 max pool.
FIRE_CONFIG_V11 = (
    (64, 16, 64, 64), (128, 16, 64, 64), "M",
    (128, 32, 128, 128), (256, 32, 128, 128), "M",
    (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256), (512, 64, 256, 256),
)


class ConvBNReLU(nn.Module):
    """QConv2d (+ BatchNorm) + ReLU."""

    def __init__(self, in_planes: int, planes: int, kernel_size: int, batch_norm: bool, **qkw: Any):
        super().__init__()
        self.conv = QConv2d(in_planes, planes, kernel_size, padding=kernel_size // 2,
                            bias=not batch_norm, **qkw)
        self.bn = nn.BatchNorm2d(planes) if batch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Fire(nn.Module):
    """Squeeze 1x1, then expand 1x1 and 3x3 side by side, concatenated."""

    def __init__(self, in_planes: int, squeeze: int, expand1x1: int, expand3x3: int,
                 batch_norm: bool, **qkw: Any):
        super().__init__()
        self.squeeze = ConvBNReLU(in_planes, squeeze, 1, batch_norm, **qkw)
        self.expand1x1 = ConvBNReLU(squeeze, expand1x1, 1, batch_norm, **qkw)
        self.expand3x3 = ConvBNReLU(squeeze, expand3x3, 3, batch_norm, **qkw)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        s = self.squeeze(x)
        return torch.cat([self.expand1x1(s), self.expand3x3(s)], 1)


class SqueezeNetCifar(nn.Module):
    """SqueezeNet 1.1 for 32x32 inputs; see the module docstring."""

    def __init__(self, num_classes: int = 100, w_bits: int = 32, a_bits: int = 32,
                 quantizer: str = "dorefa", quantize_first_last: bool = False,
                 batch_norm: bool = True, dropout: float = 0.5):
        super().__init__()
        qkw = dict(w_bits=w_bits, a_bits=a_bits, quantizer=quantizer)
        edge_w_bits = w_bits if quantize_first_last else 32
        self.stem = ConvBNReLU(3, 64, 3, batch_norm, w_bits=edge_w_bits, quantizer=quantizer,
                               quantize_input=False)
        layers: list[nn.Module] = []
        for spec in FIRE_CONFIG_V11:
            if spec == "M":
                layers.append(nn.MaxPool2d(3, stride=2, ceil_mode=True))
            else:
                layers.append(Fire(*spec, batch_norm=batch_norm, **qkw))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = QConv2d(512, num_classes, 1, w_bits=edge_w_bits,
                                  a_bits=a_bits if quantize_first_last else 32,
                                  quantizer=quantizer, quantize_input=quantize_first_last)
        self._init_weights()

    def _init_weights(self) -> None:
        # As torchvision's SqueezeNet: Kaiming-uniform convs, small normal classifier, zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.classifier:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @weights_quantized_together  # the same values as layer by layer, a fraction of the kernels
    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.features(self.stem(x))
        x = self.classifier(self.dropout(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@register_model
def squeezenet(**kw: Any) -> SqueezeNetCifar:
    """SqueezeNet 1.1 adapted to 32x32 (extra kwargs: ``batch_norm=True, dropout=0.5``)."""
    return SqueezeNetCifar(**kw)
