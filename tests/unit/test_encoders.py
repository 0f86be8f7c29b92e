"""Image backbones: torchvision key layouts, strict weight loading, real MobileNetV2 weights, preprocessing.

VGG16 runs with random weights only (no ImageNet weights can be had here) and is built once for the module;
the MobileNetV2 tests use the real torchvision file in the shared folder and skip, naming it, when absent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marn.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG16,
    ImageLoadError,
    MobileNetV2,
    StateDictMismatchError,
    build_backbone,
    load_image,
    load_images,
    load_state_dict_strict,
    load_weights_file,
    preprocess,
)
from marn.encoders.weights import sha256_of_file, sha256_prefix_in_name

MOBILENET_FILE = "models/mobilenet_v2-b0353104.pth"
POSTERS = "datasets/movielens-100k-media/posters"
COMIC_BOOK = 917  # ImageNet class index of "comic book"

# torchvision's vgg16 state dict, written out from the architecture (Simonyan & Zisserman, configuration D):
# 13 conv3x3 with plan 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M (ReLU and pool layers hold no weights, so the
# conv indices skip them), then classifier 25088 -> 4096 -> 4096 -> 1000 at indices 0, 3, 6.
VGG16_CONVS = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
]
VGG16_LINEARS = [(0, 25088, 4096), (3, 4096, 4096), (6, 4096, 1000)]
TORCHVISION_VGG16 = [
    *[
        entry
        for i, c_in, c_out in VGG16_CONVS
        for entry in ((f"features.{i}.weight", (c_out, c_in, 3, 3)), (f"features.{i}.bias", (c_out,)))
    ],
    *[
        entry
        for i, d_in, d_out in VGG16_LINEARS
        for entry in ((f"classifier.{i}.weight", (d_out, d_in)), (f"classifier.{i}.bias", (d_out,)))
    ],
]


def layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def vgg() -> VGG16:
    """One random-weight VGG16 with its ImageNet head (138M parameters, about 2 s to build)."""
    torch.manual_seed(0)
    return build_backbone("vgg16", None, with_head=True)


@pytest.fixture(scope="module")
def mobilenet_weights(shared_dir: Path) -> Path:
    path = shared_dir / MOBILENET_FILE
    if not path.is_file():
        pytest.skip(f"torchvision MobileNetV2 weights not found at {path}")
    return path


@pytest.fixture(scope="module")
def mobilenet(mobilenet_weights: Path) -> MobileNetV2:
    return build_backbone("mobilenet_v2", mobilenet_weights, with_head=True)


@pytest.fixture(scope="module")
def posters(shared_dir: Path) -> Path:
    path = shared_dir / POSTERS
    if not (path / "1.jpg").is_file() or not (path / "2.jpg").is_file():
        pytest.skip(f"MovieLens posters 1.jpg and 2.jpg not found in {path}")
    return path


# --- VGG16 (random weights) ---------------------------------------------------------------------------------


def test_vgg16_matches_torchvision_layout(vgg):
    assert layout(vgg) == TORCHVISION_VGG16
    assert n_params(vgg) == 138_357_544  # torchvision's published count for vgg16
    assert vgg.out_dim == 4096 and vgg.has_head and not vgg.training
    assert not any(p.requires_grad for p in vgg.parameters())
    with torch.device("meta"):  # the headless tree without allocating 134M more parameters
        headless = VGG16()
    assert layout(headless) == [e for e in TORCHVISION_VGG16 if not e[0].startswith("classifier.6.")]


def test_vgg16_returns_fc7_features_for_small_inputs(vgg):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        features = vgg(x)
        logits = vgg.forward_logits(x)
        fc7 = vgg.classifier[:5](torch.flatten(vgg.avgpool(vgg.features(x)), 1))  # fc6, ReLU, drop, fc7, ReLU
    assert features.shape == (2, 4096) and logits.shape == (2, 1000)
    assert torch.equal(features, fc7) and (features >= 0).all()
    with pytest.raises(ValueError, match="at least 32x32"):
        vgg(torch.randn(1, 3, 16, 16))


def test_vgg16_state_dict_round_trips_through_a_file_and_drops_only_the_head(vgg, tmp_path):
    path = tmp_path / "vgg16-random.pth"
    torch.save(vgg.state_dict(), path)
    headless = build_backbone("vgg16", path)  # full torchvision-layout file into a headless backbone
    assert not headless.has_head and not headless.training
    dropped = load_state_dict_strict(headless, vgg.state_dict(), ignore_prefixes=("classifier.6.",))
    assert dropped == ["classifier.6.bias", "classifier.6.weight"]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(headless(x), vgg(x))
    with pytest.raises(RuntimeError, match="with_head=True"):
        headless.forward_logits(x)


def test_strict_loading_names_missing_unexpected_and_misshapen_keys(vgg):
    full = vgg.state_dict()

    missing = {k: v for k, v in full.items() if k != "features.28.bias"}
    with pytest.raises(StateDictMismatchError, match=r"1 missing keys: features\.28\.bias") as err:
        load_state_dict_strict(vgg, missing)
    assert err.value.missing == ["features.28.bias"] and isinstance(err.value, ValueError)

    extra = {**full, "features.99.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"1 unexpected keys: features\.99\.weight"):
        load_state_dict_strict(vgg, extra, ignore_prefixes=("classifier.6.",))  # forgives only its own keys

    misshapen = {**full, "classifier.0.weight": torch.zeros(4096, 100)}
    with pytest.raises(ValueError, match=r"classifier\.0\.weight: \(4096, 25088\) vs \(4096, 100\)"):
        load_state_dict_strict(vgg, misshapen)

    headless = {k: v for k, v in full.items() if not k.startswith("classifier.6.")}
    with pytest.raises(ValueError, match=r"2 missing keys: classifier\.6\.weight, classifier\.6\.bias"):
        load_state_dict_strict(vgg, headless, ignore_prefixes=("classifier.6.",))  # the model's head is due

    wrapped = {f"module.{k}": v for k, v in full.items()}
    with pytest.raises(ValueError, match="DataParallel"):
        load_state_dict_strict(vgg, wrapped)


# --- weight files -------------------------------------------------------------------------------------------


def test_weights_file_must_exist_and_match_the_sha256_in_its_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope-12345678\.pth"):
        load_weights_file(tmp_path / "nope-12345678.pth")

    state = torch.nn.Linear(3, 2).state_dict()
    plain = tmp_path / "linear.pth"
    torch.save(state, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    assert sha256_of_file(plain) == digest and sha256_prefix_in_name(plain) is None

    good = plain.rename(tmp_path / f"linear-{digest[:8]}.pth")
    assert sha256_prefix_in_name(good) == digest[:8]
    assert load_weights_file(good).keys() == state.keys()

    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    bad = good.rename(tmp_path / f"linear-{wrong}.pth")
    with pytest.raises(ValueError, match=rf"linear-{wrong}\.pth"):
        load_weights_file(bad)
    assert load_weights_file(bad, verify_hash=False).keys() == state.keys()

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), not_a_dict)
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights_file(not_a_dict)


def test_build_backbone_rejects_unknown_names():
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet50", None)  # type: ignore[arg-type]


# --- MobileNetV2 --------------------------------------------------------------------------------------------


def test_mobilenet_v2_random_weights_give_pooled_features():
    model = build_backbone("mobilenet_v2", None)
    assert model.out_dim == 1280 and not model.training and not model.has_head
    assert n_params(MobileNetV2(with_head=True)) == 3_504_872  # torchvision's published count
    assert len(MobileNetV2(with_head=True).state_dict()) == 314
    with torch.inference_mode():
        assert model(torch.randn(3, 3, 64, 64)).shape == (3, 1280)
    with pytest.raises(RuntimeError, match="with_head=True"):
        model.forward_logits(torch.randn(1, 3, 64, 64))


def test_mobilenet_v2_loads_the_torchvision_file_strictly(mobilenet_weights, mobilenet):
    assert sha256_of_file(mobilenet_weights).startswith("b0353104")  # the digest its file name promises
    state = load_weights_file(mobilenet_weights)
    assert layout(mobilenet) == [(k, tuple(v.shape)) for k, v in state.items()]
    assert all(torch.equal(v, state[k]) for k, v in mobilenet.state_dict().items())
    assert MobileNetV2().load_weights(mobilenet_weights) == ["classifier.1.bias", "classifier.1.weight"]
    synthetic = torch.linspace(-2, 2, 3 * 224 * 224).reshape(1, 3, 224, 224)
    with torch.inference_mode():
        logits = mobilenet.forward_logits(synthetic)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_mobilenet_v2_pretrained_features_are_meaningful(mobilenet, posters):
    paths = [posters / "1.jpg", posters / "2.jpg"]
    with torch.inference_mode():
        features = mobilenet(load_images(paths))  # (2, 1280)
        again = mobilenet(load_images(paths))
        alone = mobilenet(load_images(paths[:1]))
        probs = mobilenet.forward_logits(load_images(paths[:1])).softmax(-1)  # (1, 1000)
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert ((features >= 0) & (features <= 6)).all()  # averages of ReLU6 outputs
    assert not torch.allclose(features[0], features[1], atol=1e-3)
    assert torch.equal(again, features)  # deterministic for the same batch
    assert torch.allclose(alone[0], features[0], atol=1e-5)  # other batch sizes may take other kernels
    # A random network spreads ~0.001 over each class; the real one calls the Toy Story poster a comic book.
    assert probs.argmax().item() == COMIC_BOOK and probs.max().item() > 0.5


# --- image loading and preprocessing ------------------------------------------------------------------------


def denormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_greyscale_and_transparent_images_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.tile(np.arange(0, 250, 2, dtype=np.uint8), (60, 1))).save(grey)  # (60, 125) mode "L"
    x = denormalise(load_images([grey])[0])  # (3, 224, 224)
    assert torch.allclose(x[0], x[1], atol=1e-6) and torch.allclose(x[1], x[2], atol=1e-6)

    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    pixels = np.asarray(load_image(tmp_path / "rgba.png"))
    assert pixels.shape == (40, 40, 3)
    assert (pixels[:, :20] == (255, 0, 0)).all() and (pixels[:, 20:] == 255).all()  # onto white, not black

    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.paste(1, (0, 0, 15, 30))
    palette.save(tmp_path / "palette.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "palette.png"))
    assert (pixels[:, :15] == (0, 255, 0)).all() and (pixels[:, 15:] == 255).all()

    deep = np.full((20, 20), 65535, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "grey16.png")
    assert (np.asarray(load_image(tmp_path / "grey16.png")) == 255).all()


def test_unreadable_images_raise_errors_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        load_images([tmp_path / "missing.jpg"])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    with pytest.raises(ImageLoadError, match=r"corrupt\.jpg"):
        load_images([corrupt])
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(OSError, match=r"truncated\.jpg"):
        load_image(truncated)
    with pytest.raises(ValueError, match="at least one path"):
        load_images([])


def test_preprocess_resizes_crops_and_normalises_like_torchvision():
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    x = preprocess(Image.new("RGB", (300, 200), mean_colour))
    assert x.shape == (3, 224, 224) and x.abs().max() < 0.01  # the ImageNet mean maps to about 0

    # 300x200 -> shorter side 256 -> 384x256 -> centre crop from column 80: the red/blue seam moves to 112
    halves = np.zeros((200, 300, 3), dtype=np.uint8)
    halves[:, :150] = (255, 0, 0)
    halves[:, 150:] = (0, 0, 255)
    x = denormalise(preprocess(Image.fromarray(halves)))
    assert x[0, :, 100].min() > 0.99 and x[2, :, 124].min() > 0.99

    squashed = denormalise(preprocess(Image.fromarray(halves), resize=None))  # whole image, seam at 112
    assert squashed.shape == (3, 224, 224)
    assert squashed[0, :, 100].min() > 0.99 and squashed[2, :, 124].min() > 0.99
    assert preprocess(Image.new("L", (50, 80)), size=64, resize=None).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="at least the crop size"):
        preprocess(Image.new("RGB", (50, 50)), size=224, resize=200)
