"""VGG16 (configuration D) in plain torch.nn, key for key torchvision's ``vgg16``, returning fc7 features.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015.
MARN (Li et al., WWW 2020, 3.1.1) embeds an item image as "the output of pre-trained VGG16 with the last two
layers for classification purpose removed": the 4096-d fc7 activation (after its ReLU), before fc8 and
softmax.

Module tree (= torchvision's, so its state dicts load unchanged):
    features     13 conv3x3+ReLU with channel plan 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M
                 (convs at indices 0,2,5,7,10,12,14,17,19,21,24,26,28; M = 2x2 max pool)
    avgpool      adaptive average pool to 7x7, so any input of at least 32x32 works
    classifier   0 fc6 25088->4096, 1 ReLU, 2 Dropout, 3 fc7 4096->4096, 4 ReLU, 5 Dropout, [6 fc8 4096->1000]
The ImageNet head ``classifier.6`` exists only with ``with_head=True``; a headless VGG16 drops the
``classifier.6.weight`` and ``classifier.6.bias`` of a full torchvision file when loading. 138M parameters
with the head (528 MB in float32), 134M without.
"""

from __future__ import annotations

import torch
from torch import nn

from marn.encoders.weights import ImageBackbone

# torchvision's cfgs["D"]: output channels per 3x3 conv, "M" for a 2x2 max pool
VGG16_PLAN: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
MIN_SIZE = 32  # five 2x2 pools halve the input five times


class VGG16(ImageBackbone):
    """VGG16: (B, 3, H, W) ImageNet-normalised images -> (B, 4096) fc7 features."""

    out_dim = 4096
    head_prefix = "classifier.6."

    def __init__(self, with_head: bool = False, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for step in VGG16_PLAN:
            if step == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(step), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(step)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        head = [nn.Linear(4096, num_classes)] if with_head else []
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            *head,  # fc8, the ImageNet classifier
        )
        if not self.features[0].weight.is_meta:  # built on the meta device for loading: nothing to fill
            self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so random-weight runs behave like an untrained torchvision VGG16
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] < MIN_SIZE or images.shape[-2] < MIN_SIZE:
            raise ValueError(
                f"VGG16 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(images.shape)}"
            )
        x = self.features(images)  # (B, 3, H, W) -> (B, 512, H/32, W/32)
        x = self.avgpool(x)  # (B, 512, 7, 7)
        x = torch.flatten(x, 1)  # (B, 25088)
        return self.classifier[:6](x)  # (B, 4096) fc7 after ReLU (and dropout, identity in eval mode)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_head:
            raise RuntimeError(
                "this VGG16 was built without its classifier head; build it with with_head=True"
            )
        return self.classifier[6](self.forward(images))  # (B, 4096) -> (B, 1000)
