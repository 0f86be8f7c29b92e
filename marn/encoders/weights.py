"""Loading torchvision-layout weight files into our plain-``torch.nn`` backbones, strictly.

torchvision cannot be imported here (its registry build is CUDA-only), so the backbones in this package
rebuild torchvision's module trees by hand and load its ``.pth`` state dicts. A hand-built tree can drift
from the original: torch's own ``strict=True`` catches missing and unexpected keys but reports a shape
mismatch in its own words and never says which keys a caller chose to drop. :func:`load_state_dict_strict`
checks every key and every shape first and raises a :class:`StateDictMismatchError` (a ``ValueError``) that
names them all.

torchvision names its files ``<name>-<first 8 hex digits of the sha256>.pth`` (``mobilenet_v2-b0353104.pth``);
:func:`load_weights_file` checks that digest when the name carries one, as ``torch.hub`` does on download.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

# torchvision / torch.hub file-name convention: "<name>-<hex prefix of the sha256>.pth" (torch.hub.HASH_REGEX)
_HASH_IN_NAME = re.compile(r"^.+-([0-9a-f]{8,64})\.pth?$")
_MAX_LISTED = 20  # keys named per category in an error message; a wholly wrong file would list hundreds


class StateDictMismatchError(ValueError):
    """A state dict does not fit a module key for key and shape; the offending keys are kept as attributes."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = ["state dict does not match the module"]
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (key: module vs state dict)", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:_MAX_LISTED])
                more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
                parts.append(f"{len(keys)} {label}: {shown}{more}")
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    ignore_prefixes: Iterable[str] = (),
    assign: bool = False,
) -> list[str]:
    """Load ``state_dict`` into ``module`` demanding that every key and every shape match.

    ``ignore_prefixes`` only forgives *unexpected* keys: a key of the state dict that starts with one of them
    and that the module does not have is dropped (a torchvision classifier head given to a headless backbone).
    A key the module has is always required, head or not. Returns the dropped keys, sorted.
    ``assign=True`` adopts the state dict's tensors (cast to the module's dtypes) instead of copying into the
    module's own: the way to fill a module built on the meta device.
    Raises :class:`StateDictMismatchError` naming every missing key, unexpected key and shape mismatch.
    """
    bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise ValueError(
            f"state dict values must be tensors; not a tensor: {', '.join(map(str, bad_values))}"
        )
    prefixes = tuple(ignore_prefixes)
    expected = module.state_dict()
    dropped = {k for k in state_dict if k not in expected and k.startswith(prefixes)}
    kept = {k: v for k, v in state_dict.items() if k not in dropped}

    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    mismatched = [
        f"{k}: {tuple(expected[k].shape)} vs {tuple(v.shape)}"
        for k, v in kept.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        hint = ""
        if any(k.startswith("module.") for k in unexpected):
            hint = "keys start with 'module.': strip the DataParallel/DDP prefix before loading"
        raise StateDictMismatchError(missing, unexpected, mismatched, hint)
    if assign:  # keep the module's dtypes: a float16 file still gives a float32 model
        kept = {k: v.to(expected[k].dtype) for k, v in kept.items()}
    module.load_state_dict(kept, strict=True, assign=assign)
    return sorted(dropped)


def sha256_prefix_in_name(path: Path) -> str | None:
    """The sha256 hex prefix a torchvision-style file name carries: ``vgg16-397923af.pth`` -> ``397923af``."""
    match = _HASH_IN_NAME.match(Path(path).name)
    return match.group(1) if match else None


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights_file(path: Path | str, verify_hash: bool = True) -> dict[str, torch.Tensor]:
    """Read a torchvision-layout ``.pth`` state dict onto the CPU, tensors only (``weights_only=True``).

    When the file name follows torchvision's ``<name>-<hex>.pth`` convention and ``verify_hash`` is set, the
    file's sha256 must start with that hex, else ValueError (a truncated download or a renamed file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    prefix = sha256_prefix_in_name(path)
    if verify_hash and prefix is not None:
        actual = sha256_of_file(path)
        if not actual.startswith(prefix):
            raise ValueError(
                f"sha256 of {path} is {actual}, but its name promises a digest starting with {prefix}: "
                "the file is corrupt, truncated or misnamed"
            )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{path} holds a {type(state_dict).__name__}, not a state dict (a mapping of tensors)"
        )
    return dict(state_dict)


class ImageBackbone(nn.Module):
    """What every image backbone offers: ``forward`` (B, 3, H, W) -> (B, out_dim) features.

    Subclasses rebuild a torchvision module tree key for key. ``head_prefix`` names the ImageNet classifier
    head's keys: a backbone built without its head drops them when loading a full torchvision file; one built
    with it (``with_head=True``) also offers ``forward_logits`` (B, 3, H, W) -> (B, 1000).
    It lives here, beside the loading code, so the model files import nothing but torch.
    """

    out_dim: int
    head_prefix: str

    @property
    def has_head(self) -> bool:
        return any(k.startswith(self.head_prefix) for k in self.state_dict())

    def load_weights(self, path: Path | str, verify_hash: bool = True) -> list[str]:
        """Load a torchvision-layout weights file strictly; returns the head keys dropped (if headless).

        A backbone built under ``torch.device("meta")`` (no memory, no random init: 3 s saved for VGG16) takes
        the file's tensors as its own.
        """
        state_dict = load_weights_file(path, verify_hash=verify_hash)
        on_meta = any(t.is_meta for t in self.state_dict().values())
        dropped = load_state_dict_strict(self, state_dict, (self.head_prefix,), assign=on_meta)
        left_on_meta = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left_on_meta:  # a non-persistent buffer is not in any state dict and would stay unallocated
            raise RuntimeError(f"tensors left on the meta device after loading {path}: {left_on_meta}")
        return dropped

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
