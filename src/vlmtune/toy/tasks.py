"""Downstream toy tasks: generated, labelled image classification datasets with real distribution shifts.

Each task fixes which scene attributes define the classes (shape, colour x shape, shape x texture), the
rendering style and its strength, and the class names and prompt templates a user would write. Splits are pure
functions of (task, split): the same images on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch

from vlmtune.toy.render import StyleParams, render
from vlmtune.toy.world import COLOURS, NONCE_WORDS, SHAPES, STYLES, TEXTURES, SceneBatch, SceneDistribution

SPLIT_SIZES = {"train": 32, "val": 16, "test": 50}  # images per class


@dataclass(frozen=True)
class ToyClass:
    """A class = constraints on scene attributes (indices; None = free) + the name users call it."""

    name: str
    shape: int | None = None
    colour: int | None = None
    texture: int | None = None


@dataclass(frozen=True)
class ToyTask:
    name: str
    description: str
    classes: tuple[ToyClass, ...]
    templates: tuple[str, ...]
    style: str = "photo"
    params: StyleParams = field(default_factory=StyleParams)
    scenes: SceneDistribution = field(default_factory=lambda: SceneDistribution(exclude_pairs=()))
    role: str = "in-domain"
    seed_name: str | None = None  # the name the images are drawn under (default: ``name``)

    @property
    def classnames(self) -> list[str]:
        return [c.name for c in self.classes]

    def seed(self, split: str) -> int:
        digest = hashlib.sha256(f"vlmtune-toy/{self.seed_name or self.name}/{split}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF

    def generate(self, split: str, n_per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, S, S) uint8 and labels (N,) of one split, class-major order."""
        n = n_per_class or SPLIT_SIZES[split]
        gen = torch.Generator().manual_seed(self.seed(split))
        k = len(self.classes)
        labels = torch.arange(k).repeat_interleave(n)  # (N,)
        base = self.scenes.sample(k * n, gen)

        def fix(values: torch.Tensor, attr: str) -> torch.Tensor:
            forced = torch.tensor([-1 if getattr(c, attr) is None else getattr(c, attr) for c in self.classes])[labels]
            return torch.where(forced >= 0, forced, values)

        scene = SceneBatch(
            shape=fix(base.shape, "shape"),
            colour=fix(base.colour, "colour"),
            size=base.size,
            texture=fix(base.texture, "texture"),
            background=base.background,
            style=torch.full_like(labels, STYLES.index(self.style)),
        )
        images = render(scene, gen, params=self.params)
        return (images * 255).round().to(torch.uint8), labels


def _shape_classes(names: tuple[str, ...] = SHAPES) -> tuple[ToyClass, ...]:
    return tuple(ToyClass(name, shape=i) for i, name in enumerate(names))


_SHAPE_TEMPLATES = ("a photo of a {}.", "a {} shape.", "a photo of the {}.", "a picture of a {} object.")
_FINE_SHAPES = ("circle", "triangle", "square", "star", "ring", "hexagon")
_TOYNET_TEXTURES = ("solid", "striped")


def _toynet(name: str, style: str, params: StyleParams, description: str, role: str, **scene: object) -> ToyTask:
    classes = tuple(
        ToyClass(f"{tex} {shape}", shape=SHAPES.index(shape), texture=TEXTURES.index(tex))
        for shape in SHAPES
        for tex in _TOYNET_TEXTURES
    )
    prefix = "a photo of a" if style == "photo" else f"a {style} image of a"
    return ToyTask(
        name=name,
        description=description,
        classes=classes,
        templates=(f"{prefix} {{}}.", "a {} shape.", "a picture of a {} object."),
        style=style,
        params=params,
        scenes=SceneDistribution(exclude_pairs=(), **scene),  # type: ignore[arg-type]
        role=role,
    )


def _shifted_shapes(style: str, description: str, templates: tuple[str, ...], params: StyleParams) -> ToyTask:
    return ToyTask(f"shapes-{style}", description, _shape_classes(), templates, style, params, role="shifted")


def _build() -> dict[str, ToyTask]:
    tasks = [
        ToyTask("shapes", "10 shapes, photo renders as in pretraining", _shape_classes(), _SHAPE_TEMPLATES),
        _shifted_shapes(
            "sketch",
            "10 shapes drawn as pencil outlines (rare in pretraining, captioned in the sketch dialect)",
            ("a sketch of a {}.", "a {} shape.", "a drawing of a {}."),
            StyleParams(sketch_width=0.06, sketch_jitter=0.06),
        ),
        _shifted_shapes(
            "noisy",
            "10 shapes under heavy sensor noise",
            ("a noisy photo of a {}.", "a {} shape.", "a photo of a {}."),
            StyleParams(noise_std=0.25),
        ),
        _shifted_shapes(
            "pixel",
            "10 shapes as coarse pixel art",
            ("a pixel art of a {}.", "a {} shape.", "a photo of a {}."),
            StyleParams(pixel_factor=2),
        ),
        ToyTask(
            "colour-shapes",
            "48 colour x shape compositions, 6 of them never rendered in pretraining",
            tuple(
                ToyClass(f"{c} {s}", shape=SHAPES.index(s), colour=COLOURS.index(c))
                for c in COLOURS
                for s in _FINE_SHAPES
            ),
            ("a photo of a {}.", "a {} shape.", "a picture of a {} object."),
            role="fine-grained",
        ),
        ToyTask(
            "nonce-shapes",
            "10 shapes whose class names are made-up words",
            _shape_classes(NONCE_WORDS),
            _SHAPE_TEMPLATES,
            role="uninformative-names",
        ),
        _toynet("toynet", "photo", StyleParams(), "ImageNet-like source: 20 shape x texture classes", "source"),
        _toynet(
            "toynet-v2",
            "photo",
            StyleParams(),
            "ToyNet re-collected: mostly small shapes on busy backgrounds (like ImageNet-V2)",
            "target",
            size=(0.8, 0.2),
            background=(0.1, 0.1, 0.4, 0.4),
        ),
        _toynet(
            "toynet-sketch",
            "sketch",
            StyleParams(sketch_jitter=0.06),
            "ToyNet as sketches (like ImageNet-Sketch)",
            "target",
        ),
        _toynet(
            "toynet-pixel", "pixel", StyleParams(pixel_factor=2), "ToyNet as pixel art (like ImageNet-R)", "target"
        ),
        _toynet(
            "toynet-noisy", "noisy", StyleParams(noise_std=0.25), "ToyNet under heavy noise (like ImageNet-A)", "target"
        ),
        # the label-free benchmark's tasks (docs/label_free.md: chosen by criteria fixed first, from the candidates of
        # benchmarks/label_free_selection.py, whose images they draw: ``seed_name``)
        replace(
            _shifted_shapes(
                "blurry",
                "10 shapes out of focus (Gaussian blur, sigma 1.5 px)",
                ("a blurry photo of a {}.", "a {} shape.", "a photo of a {}."),
                StyleParams(blur_sigma=1.5),
            ),
            seed_name="shapes-blurry1.5",
        ),
        replace(
            _toynet(
                "toynet-blurry", "blurry", StyleParams(blur_sigma=0.75), "ToyNet out of focus (blur 0.75 px)", "target"
            ),
            seed_name="toynet-blurry0.75",
        ),
    ]
    return {t.name: t for t in tasks}


TOY_TASKS: dict[str, ToyTask] = _build()
TOYNET_VARIANTS = ("toynet-v2", "toynet-sketch", "toynet-pixel", "toynet-noisy")


def get_task(name: str) -> ToyTask:
    try:
        return TOY_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown toy task {name!r}; known: {', '.join(TOY_TASKS)}") from None


def with_params(task: ToyTask, **params: float) -> ToyTask:
    """A copy of ``task`` with a different shift strength (used to calibrate the world)."""
    return replace(task, params=replace(task.params, **params))
