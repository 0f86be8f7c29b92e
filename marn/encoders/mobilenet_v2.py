"""MobileNetV2 (width 1.0) in plain torch.nn, key for key torchvision's ``mobilenet_v2``; pooled features.

Sandler, Howard, Zhu, Zhmoginov & Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
The local stand-in for the paper's VGG16 (MARN, WWW 2020, 3.1.1): real ImageNet weights can be had here for
it, and it runs on two CPU cores. Like VGG16's fc7, the feature is the layer before the classifier: the 1280-d
global average of the last 1x1 conv.

Module tree (= torchvision's, so ``mobilenet_v2-b0353104.pth`` loads unchanged):
    features.0       conv3x3 stride 2, 3->32, as (0 conv, 1 BatchNorm, 2 ReLU6)
    features.1..17   inverted residual blocks; block.conv = [expand 1x1 (conv, BN, ReLU6) when t > 1,]
                     depthwise 3x3 (conv, BN, ReLU6), project 1x1 conv, BN (linear bottleneck, no activation)
    features.18      conv1x1 320->1280 (conv, BN, ReLU6)
    classifier       0 Dropout(0.2), [1 Linear 1280->1000]
The ImageNet head ``classifier.1`` exists only with ``with_head=True``; a headless MobileNetV2 drops the
``classifier.1.weight`` and ``classifier.1.bias`` of a full torchvision file when loading. 3.5M parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from marn.encoders.weights import ImageBackbone

# Table 2 of the paper: expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_PLAN = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6: torchvision's Conv2dNormActivation, keys ``0.*``, ``1.*``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(
                in_ch, out_ch, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection, plus a skip when shapes allow (paper 3.3)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_residual = stride == 1 and in_ch == out_ch
        expand = [ConvBNReLU6(in_ch, hidden, kernel_size=1)] if expand_ratio != 1 else []
        self.conv = nn.Sequential(
            *expand,
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_ch, 1, bias=False),  # linear bottleneck: no activation after it
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        return x + out if self.use_residual else out


class MobileNetV2(ImageBackbone):
    """MobileNetV2: (B, 3, H, W) ImageNet-normalised images -> (B, 1280) pooled features."""

    out_dim = LAST_CHANNELS
    head_prefix = "classifier.1."

    def __init__(self, with_head: bool = False, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        # width multiplier 1.0: every channel count is already a multiple of 8, so no rounding is needed
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        channels = 32
        for t, c, n, s in INVERTED_RESIDUAL_PLAN:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, stride=s if i == 0 else 1, expand_ratio=t))
                channels = c
        layers.append(ConvBNReLU6(channels, LAST_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*layers)
        head = [nn.Linear(LAST_CHANNELS, num_classes)] if with_head else []
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), *head)
        if not self.features[0][0].weight.is_meta:  # built on the meta device for loading: nothing to fill
            self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so random-weight runs behave like an untrained torchvision MobileNetV2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (B, 3, H, W) -> (B, 1280, H/32, W/32)
        x = F.adaptive_avg_pool2d(x, 1)  # (B, 1280, 1, 1)
        return torch.flatten(x, 1)  # (B, 1280)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            raise RuntimeError(
                "this MobileNetV2 was built without its classifier head; build it with with_head=True"
            )
        return self.classifier(self.forward(images))  # (B, 1280) -> (B, 1000), dropout is identity in eval
