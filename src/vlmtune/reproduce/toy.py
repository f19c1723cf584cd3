"""``--toy``: a recipe on the toy world: each paper dataset stands as one toy task, every backbone as the toy model.

The toy tasks play the datasets' roles where the roles match (ImageNet -> ToyNet and its variants as ImageNet's;
the fine-grained sets -> colour-shapes; textures -> sketches in another vocabulary; satellite images -> sensor
noise); the rest are spread over the remaining tasks so a recipe exercises different shifts. Label-free protocols
take a task's ``-pool`` variant where there is one (4,000 unlabelled images). The numbers are toy numbers: the paper's
columns stand beside them for the shape of the table, not as a target.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlmtune.data.datasets.toy import POOL_TASKS

TOY_DATASETS: dict[str, str] = {
    "imagenet": "toy:toynet",
    "imagenet_v2": "toy:toynet-v2",
    "imagenet_sketch": "toy:toynet-sketch",
    "imagenet_a": "toy:toynet-noisy",
    "imagenet_r": "toy:toynet-pixel",
    "caltech101": "toy:shapes",
    "dtd": "toy:shapes-sketch",
    "eurosat": "toy:shapes-noisy",
    "fgvc_aircraft": "toy:colour-shapes",
    "oxford_pets": "toy:shapes-pixel",
    "stanford_cars": "toy:toynet-pixel",
    "oxford_flowers": "toy:toynet-sketch",
    "food101": "toy:toynet-noisy",
    "sun397": "toy:toynet-v2",
    "ucf101": "toy:nonce-shapes",
    "cifar100": "toy:toynet",
}
TOY_BACKBONE = "toy"
TOY_STUDENT = "toy:small"  # a distillation recipe's student (its teacher: the toy model)
TOY_NOISE = {"cifar100n": "pairflip-0.4"}  # CIFAR-100N's human labels (~40% wrong) -> the same rate, pair-flipped


TOY_MAX_CTX = 8  # the toy text tower has 20 token positions: 16 context vectors leave too few for ToyNet's names


TOY_CLIENT_ENCODER = "toy:small"  # BlackVIP's client-side encoder on the toy world (the bundled smaller model)


def toy_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A row's options for the toy model: a prompt longer than ``TOY_MAX_CTX`` (given or the method's default) is
    capped (the run's settings.json records the options used)."""
    from vlmtune.methods.registry import get_method, make_config

    out = dict(options)
    n_ctx = getattr(make_config(get_method(method), out), "n_ctx", None)
    if n_ctx is not None and n_ctx > TOY_MAX_CTX:
        out["n_ctx"] = TOY_MAX_CTX
    if method == "blackvip":  # the coordinator's encoder: a model other than the served one, as in the paper
        out.setdefault("encoder", TOY_CLIENT_ENCODER)
    return out


def toy_dataset(name: str, label_free: bool = False) -> str:
    """The toy task standing for dataset ``name`` (its ``-pool`` variant for label-free training when it has one)."""
    task = TOY_DATASETS[name]
    if label_free and task.removeprefix("toy:") in POOL_TASKS:
        return f"{task}-pool"
    return task
