"""``load_backbone(spec)``: one factory for every backbone.

Specs: ``toy`` (bundled ToyCLIP; ``toy:small`` its smaller sibling, a distillation student),
``openclip:<arch>@<tag or weights file>`` (``openclip:<arch>`` = random init), ``hf:<repo id or folder>``,
``local:<folder with a ToyCLIP-format model>``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmtune.backbones.base import Backbone, Capability, FeatureEncoder
from vlmtune.errors import UnknownName, VlmtuneError, WeightsNotAvailable

FAMILIES = ("toy", "openclip", "hf", "local")
EXAMPLE_SPECS = ("toy", "openclip:ViT-B-32@openai", "openclip:RN50@openai", "hf:openai/clip-vit-base-patch16")

_CACHE: dict[tuple[str, str], Backbone] = {}


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``"openclip:ViT-B-32@openai"`` -> ``("openclip", "ViT-B-32", "openai")``."""
    family, _, rest = spec.partition(":")
    if family not in FAMILIES:
        raise UnknownName("backbone family", family, list(FAMILIES))
    if family == "toy":
        return family, rest or "toy", None
    if not rest:
        raise ValueError(f"backbone spec {spec!r} needs a name after '{family}:'")
    if family == "openclip":
        arch, _, tag = rest.partition("@")
        return family, arch, tag or None
    return family, rest, None


def resolve_device(device: str) -> str:
    """``"auto"`` -> cuda, mps or cpu (what is there); any other name is checked to exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise VlmtuneError(f"unknown device {device!r} (use cpu, cuda, cuda:N, mps or auto)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise VlmtuneError(f"device {device!r}: no CUDA device is available to this torch ({torch.__version__})")
    return device


def load_backbone(spec: str = "toy", device: str = "cpu", cache: bool = True) -> Backbone:
    """Load a backbone from its spec string (see module docstring); loaded backbones are memoised."""
    device = resolve_device(device)
    key = (spec, device)
    if cache and key in _CACHE:
        return _CACHE[key]
    family, name, tag = parse_spec(spec)
    backbone: Backbone
    if family == "toy":
        from vlmtune.backbones.toy import ToyBackbone, bundled_weights_dir

        backbone = ToyBackbone.from_dir(bundled_weights_dir(name), spec, device)
    elif family == "local":
        from vlmtune.backbones.toy import ToyBackbone

        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise WeightsNotAvailable(spec, [str(folder)], "folder does not exist")
        backbone = ToyBackbone.from_dir(folder, spec, device)
    elif family == "openclip":
        from vlmtune.backbones.openclip import OpenClipBackbone

        backbone = OpenClipBackbone.load(spec, name, tag, device)
    else:
        from vlmtune.backbones.hf import HFClipBackbone

        backbone = HFClipBackbone.load(spec, name, device)
    if cache:
        _CACHE[key] = backbone
    return backbone


__all__ = [
    "EXAMPLE_SPECS",
    "Backbone",
    "Capability",
    "FeatureEncoder",
    "load_backbone",
    "parse_spec",
    "resolve_device",
]
