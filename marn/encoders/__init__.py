"""Image backbones in plain torch.nn that load torchvision-layout weights, and the preprocessing they expect.

    backbone = build_backbone("mobilenet_v2", Path("shared/models/mobilenet_v2-b0353104.pth"))
    with torch.inference_mode():
        features = backbone(load_images(paths))  # (B, 3, 224, 224) -> (B, 1280)

``vgg16`` is the paper's extractor (fc7, 4096-d); ``mobilenet_v2`` (1280-d) is the one with real ImageNet
weights here. The title encoder lives elsewhere; this package holds only what turns pixels into vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from marn.encoders.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    load_image,
    load_images,
    preprocess,
)
from marn.encoders.mobilenet_v2 import MobileNetV2
from marn.encoders.vgg16 import VGG16
from marn.encoders.weights import (
    ImageBackbone,
    StateDictMismatchError,
    load_state_dict_strict,
    load_weights_file,
)

BackboneName = Literal["vgg16", "mobilenet_v2"]
BACKBONES: dict[str, type[ImageBackbone]] = {"vgg16": VGG16, "mobilenet_v2": MobileNetV2}


def build_backbone(
    name: BackboneName, weights: Path | str | None, with_head: bool = False, verify_hash: bool = True
) -> ImageBackbone:
    """A frozen feature extractor in eval mode, channels-last: (B, 3, H, W) -> (B, out_dim).

    ``weights``: a torchvision-layout ``.pth`` state dict, loaded strictly (every key and shape must match;
    the ImageNet head's keys are dropped when ``with_head`` is False); None keeps torchvision's random
    initialisation (tests, and VGG16 where no weights can be had). ``with_head=True`` keeps the 1000-way
    ImageNet classifier for ``forward_logits``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown image backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if weights is None:
        backbone = BACKBONES[name](with_head=with_head)
    else:
        with torch.device("meta"):  # no random init that the weights would overwrite at once
            backbone = BACKBONES[name](with_head=with_head)
        backbone.load_weights(weights, verify_hash=verify_hash)
    backbone.requires_grad_(False)
    # NHWC conv weights take oneDNN's faster kernels: 1.65x images/s for MobileNetV2 (depthwise convs), 1.45x
    # for VGG16 on 2 CPU cores; features are unchanged up to float rounding, and callers may pass NCHW images
    backbone.to(memory_format=torch.channels_last)
    return backbone.eval()


__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG16",
    "BackboneName",
    "ImageBackbone",
    "ImageLoadError",
    "MobileNetV2",
    "StateDictMismatchError",
    "build_backbone",
    "load_image",
    "load_images",
    "load_state_dict_strict",
    "load_weights_file",
    "preprocess",
]
