"""Augmented views of a PIL image, then the backbone's own preprocessing (torchvision.transforms.v2).

Recipes (``view(recipe, backbone)``), at the model's input size S:

- ``none``: the backbone's preprocessing only (resize, centre crop, normalise);
- ``flip-crop``: random resized crop (scale 0.5-1) + horizontal flip (a standard fine-tuning view);
- ``mocov2``: MoCo v2's "aug-plus": RRC (0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
  Gaussian blur sigma in [0.1, 2] p 0.5, flip (also LaFTer's strong view);
- ``latteclip``: LatteCLIP's: RRC (0.9-1, bicubic), colour jitter (0.5, 0.5, 0.5, 0.1) p 0.8, grayscale p 0.2;
- ``fixmatch-weak``: flip + translation by up to 12.5% (reflect padding, random crop);
- ``fixmatch-strong``: the weak view + RandAugment (2 ops, magnitude 10) + a cutout of up to half the side.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from PIL import Image

from vlmtune.backbones.base import Backbone
from vlmtune.errors import UnknownName, require

RECIPES = ("none", "flip-crop", "mocov2", "latteclip", "fixmatch-weak", "fixmatch-strong")
View = Callable[[Image.Image], torch.Tensor]


def input_size(backbone: Backbone) -> int:
    """Side S of the images the backbone's preprocessing produces."""
    return int(backbone.preprocess(Image.new("RGB", (2 * 224, 2 * 224)))[0].shape[-1])


@lru_cache(maxsize=32)
def _pil_transform(recipe: str, size: int) -> Callable[[Image.Image], Image.Image] | None:
    if recipe == "none":
        return None
    v2 = require("torchvision.transforms.v2", "pixels", f"augmentation {recipe!r}")
    bicubic = v2.InterpolationMode.BICUBIC
    blur = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel of about 10% of the side (MoCo's PIL blur radius)
    if recipe == "flip-crop":
        steps = [v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=bicubic), v2.RandomHorizontalFlip()]
    elif recipe == "mocov2":
        steps = [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=bicubic),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
        ]
    elif recipe == "latteclip":
        steps = [
            v2.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic),
            v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    elif recipe in ("fixmatch-weak", "fixmatch-strong"):
        steps = [
            v2.Resize(size, interpolation=bicubic),
            v2.CenterCrop(size),
            v2.RandomHorizontalFlip(),
            v2.RandomCrop(size, padding=int(0.125 * size), padding_mode="reflect"),
        ]
        if recipe == "fixmatch-strong":
            steps.append(v2.RandAugment(num_ops=2, magnitude=10))
    else:
        raise UnknownName("augmentation", recipe, list(RECIPES))
    return v2.Compose(steps)


@lru_cache(maxsize=8)
def _cutout() -> Callable[[torch.Tensor], torch.Tensor]:
    v2 = require("torchvision.transforms.v2", "pixels", "augmentation 'fixmatch-strong'")
    return v2.RandomErasing(p=1.0, scale=(0.0, 0.25), ratio=(1.0, 1.0), value=0.0)  # 0 = the mean colour


class _View:
    """A picklable view (DataLoader workers): PIL augmentation at size S, then the backbone's preprocessing."""

    def __init__(self, recipe: str, size: int, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        if recipe not in RECIPES:
            raise UnknownName("augmentation", recipe, list(RECIPES))
        self.recipe, self.size, self.preprocess = recipe, size, preprocess
        _pil_transform(recipe, size)  # fail now (missing torchvision), not in a worker

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pil = _pil_transform(self.recipe, self.size)
        x = self.preprocess(pil(image) if pil is not None else image)  # (3, S, S)
        return _cutout()(x) if self.recipe == "fixmatch-strong" else x


def view(recipe: str, backbone: Backbone) -> View:
    """The augmentation ``recipe`` (see the module docstring) feeding ``backbone``'s preprocessing."""
    return _View(recipe, input_size(backbone), backbone.preprocess)
