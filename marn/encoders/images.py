"""Image files -> ImageNet-normalised tensors, with Pillow and torch only (torchvision cannot be imported).

The default reproduces the evaluation transform both backbones' ImageNet weights were measured with
(torchvision's ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize(mean, std)``): bilinear
resize of the shorter side to 256, centre crop 224x224, scale to [0, 1], normalise per channel.
``resize=None`` instead squashes the whole image to 224x224, keeping the edges a centre crop would cut
(a 2:3 movie poster loses 1/4 of its height to the crop).

Every image becomes 8-bit RGB first: greyscale and palette images are expanded, images with transparency
(RGBA, LA, palette with a transparent colour) are composited onto a white background (product photos with
cut-out backgrounds would otherwise turn black), 16-bit greyscale is scaled down, EXIF orientation is applied.
A missing file raises FileNotFoundError; an unreadable one raises ImageLoadError; both name the path and both
are OSErrors, so a caller that skips bad images catches OSError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per RGB channel, of ImageNet training images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)


class ImageLoadError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


def load_image(path: Path | str, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Read an image file as an 8-bit RGB Pillow image, fully decoded (truncation shows here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, background)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {path}: {e}") from e


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto ``background``."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit greyscale: 0..65535 -> 0..255
        grey = (np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8)
        img = Image.fromarray(grey)  # (H, W) uint8 -> mode "L"
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (*background, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def preprocess(img: Image.Image, size: int = 224, resize: int | None = 256) -> torch.Tensor:
    """RGB image -> (3, size, size) float tensor, ImageNet-normalised.

    ``resize`` set: shorter side to ``resize`` (aspect kept), then a centre ``size`` crop (torchvision's
    rounding). ``resize=None``: the whole image squashed to ``size`` x ``size``.
    """
    return torch.from_numpy(_normalise(_fit(img, size, resize)))  # (3, size, size)


def load_images(paths: Sequence[Path | str], size: int = 224, resize: int | None = 256) -> torch.Tensor:
    """Image files -> (B, 3, size, size) float tensor, ready for an ImageNet backbone."""
    if len(paths) == 0:
        raise ValueError("load_images needs at least one path")
    batch = np.stack([_normalise(_fit(load_image(p), size, resize)) for p in paths])  # (B, 3, size, size)
    return torch.from_numpy(batch)


def _fit(img: Image.Image, size: int, resize: int | None) -> Image.Image:
    """Any image -> RGB ``size`` x ``size``: torchvision's Resize(resize) + CenterCrop(size), or a squash."""
    if img.mode != "RGB":
        img = to_rgb(img)
    if resize is None:
        return img.resize((size, size), Image.Resampling.BILINEAR)
    if resize < size:
        raise ValueError(f"resize ({resize}) must be at least the crop size ({size})")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def _normalise(img: Image.Image) -> np.ndarray:
    # numpy, not torch: on one small image torch's thread pool costs more than the arithmetic (5x slower
    # measured on 2 busy cores)
    pixels = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    x = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)  # (H, W, 3)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)
