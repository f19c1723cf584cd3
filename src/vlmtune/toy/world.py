"""The toy world's vocabulary: attributes of a rendered scene and how captions describe them.

A scene is one shape with a colour, size and texture, on a background, drawn in a rendering style.
Pretraining sees mostly ``photo`` renders with accurate captions; the other styles are rare and their
captions rarely name the shape, which is what makes them a real distribution shift for zero-shot transfer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

SHAPES = ("circle", "triangle", "square", "diamond", "star", "plus", "cross", "ring", "crescent", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
COLOUR_RGB = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.55, 0.15, 0.75),
    "orange": (0.98, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "pink": (0.98, 0.50, 0.75),
}
SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("dark", "light", "gradient", "noisy")
STYLES = ("photo", "sketch", "pixel", "noisy", "blurry")
STYLE_PHRASE = {
    "photo": "a photo of a",
    "sketch": "a sketch of a",
    "pixel": "a pixel art of a",
    "noisy": "a noisy photo of a",
    "blurry": "a blurry photo of a",
}
# (colour, shape) compositions that pretraining never renders: zero-shot on them needs compositional transfer.
HELD_OUT_PAIRS = (
    ("red", "star"),
    ("green", "triangle"),
    ("blue", "ring"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("orange", "diamond"),
    ("cyan", "plus"),
    ("pink", "hexagon"),
)
# Sketches come from a community that names some outline drawings differently ("captioned differently"):
# the pretraining captions of sketches swap these names, so zero-shot prompts with the usual names misfire on
# sketches while the image features still separate the shapes (few labels recover them).
SKETCH_DIALECT_PAIRS = (("circle", "ring"), ("square", "diamond"), ("plus", "cross"))
# Words that never occur in pretraining captions; the tokenizer spells them out letter by letter.
NONCE_WORDS = ("dax", "wug", "blicket", "toma", "fep", "zorp", "kiki", "bouba", "glorp", "snark")

FILLER_WORDS = (
    "a an the of on with in and photo picture image shape object thing something background pattern style "
    "drawn rendering type toy centered close up view art"
).split()
# Words used by real-dataset templates (CoOp / CLIP) so that they tokenise as words on the toy backbone too.
TEMPLATE_WORDS = (
    "satellite pet flower food aircraft texture person doing car bad cropped bright dark large small good "
    "origami rendition sculpture cartoon clean dirty low resolution jpeg corrupted blurry sketch painting tattoo "
    "plastic plushie video game embroidered it is this that my one hard see itap black white"
).split()


@dataclass(frozen=True)
class SceneBatch:
    """Attribute indices of a batch of scenes, all (B,) long tensors."""

    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    texture: torch.Tensor
    background: torch.Tensor
    style: torch.Tensor

    def __len__(self) -> int:
        return int(self.shape.shape[0])


@dataclass(frozen=True)
class SceneDistribution:
    """Sampling weights over each attribute (unnormalised); ``None`` means uniform."""

    shape: tuple[float, ...] | None = None
    colour: tuple[float, ...] | None = None
    size: tuple[float, ...] | None = None
    texture: tuple[float, ...] | None = (0.55, 0.15, 0.15, 0.15)
    background: tuple[float, ...] | None = (0.35, 0.35, 0.2, 0.1)
    style: tuple[float, ...] | None = (0.82, 0.05, 0.05, 0.04, 0.04)
    exclude_pairs: tuple[tuple[str, str], ...] = field(default=HELD_OUT_PAIRS)

    def sample(self, n: int, generator: torch.Generator) -> SceneBatch:
        def draw(weights: tuple[float, ...] | None, k: int) -> torch.Tensor:
            w = torch.ones(k) if weights is None else torch.tensor(weights, dtype=torch.float)
            return torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)

        shape = draw(self.shape, len(SHAPES))
        colour = draw(self.colour, len(COLOURS))
        for c, s in self.exclude_pairs:  # re-draw the colour of held-out compositions
            bad = (colour == COLOURS.index(c)) & (shape == SHAPES.index(s))
            while bool(bad.any()):
                colour[bad] = draw(self.colour, len(COLOURS))[: int(bad.sum())]
                bad = (colour == COLOURS.index(c)) & (shape == SHAPES.index(s))
        return SceneBatch(
            shape=shape,
            colour=colour,
            size=draw(self.size, len(SIZES)),
            texture=draw(self.texture, len(TEXTURES)),
            background=draw(self.background, len(BACKGROUNDS)),
            style=draw(self.style, len(STYLES)),
        )


def sketch_dialect(n_pairs: int = len(SKETCH_DIALECT_PAIRS)) -> dict[str, str]:
    """Shape name -> the name sketch captions use for it (first ``n_pairs`` pairs swapped)."""
    out = {s: s for s in SHAPES}
    for a, b in SKETCH_DIALECT_PAIRS[:n_pairs]:
        out[a], out[b] = b, a
    return out


def caption(
    scene: SceneBatch,
    i: int,
    rng: random.Random,
    rare_shape_prob: float = 0.3,
    dialect: dict[str, str] | None = None,
) -> str:
    """A pretraining caption for scene ``i``: a random subset of its attributes in a few sentence forms.

    Photos are described accurately (shape named 90% of the time); rare styles always name the style but name the
    shape only with probability ``rare_shape_prob`` and never the colour of a sketch (sketches are grey); sketches
    name their shape (80% of the time) in the sketch ``dialect``.
    """

    def coin(p: float) -> bool:
        return rng.random() < p

    style = STYLES[int(scene.style[i])]
    rare = style != "photo"
    words: list[str] = []
    if coin(0.5):
        words.append(SIZES[int(scene.size[i])])
    if style != "sketch" and coin(0.6):
        words.append(COLOURS[int(scene.colour[i])])
    texture = TEXTURES[int(scene.texture[i])]
    if style == "photo" and texture != "solid" and coin(0.5):
        words.append(texture)
    shape = SHAPES[int(scene.shape[i])]
    if style == "sketch":
        shape, name_p = (dialect or sketch_dialect())[shape], 0.8
    else:
        name_p = rare_shape_prob if rare else 0.9
    words.append(shape if coin(name_p) else ("shape" if coin(0.5) else "object"))
    text = " ".join(words)
    if coin(0.5 if rare else 0.3):
        text = f"{STYLE_PHRASE[style]} {text}"
    elif rare:
        text = f"{text} in {style} style"
    else:
        text = f"a {text}" if text[0] not in "aeiou" else f"an {text}"
    if style == "photo" and coin(0.3):
        text += f" on a {BACKGROUNDS[int(scene.background[i])]} background"
    return text + "."


def vocabulary() -> list[str]:
    """Every word the toy tokenizer knows as one token (letters and punctuation are added by the tokenizer)."""
    words = set(
        SHAPES + COLOURS + SIZES + TEXTURES + BACKGROUNDS + STYLES + tuple(FILLER_WORDS) + tuple(TEMPLATE_WORDS)
    )
    return sorted(words)
