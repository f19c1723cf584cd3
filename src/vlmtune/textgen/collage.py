"""Group images collaged into one picture, as LatteCLIP feeds a group of images to LLaVA.

Facts from the LatteCLIP code (docs/fidelity.md): a square grid of side max(2, ceil(sqrt(n))) on a 672 x 672 black
canvas with 20-pixel gaps, each image resized with its aspect ratio kept (Lanczos) and centred in its cell. Here the
gaps surround the cells too (the code's exact margin arithmetic is not reproduced: a few pixels of border).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

CANVAS, GAP = 672, 20


def collage(images: Sequence[Image.Image], canvas: int = CANVAS, gap: int = GAP) -> Image.Image:
    """n images -> one RGB ``canvas`` x ``canvas`` picture: a max(2, ceil(sqrt n)) grid on black."""
    if not images:
        raise ValueError("a collage needs at least one image")
    side = max(2, math.ceil(math.sqrt(len(images))))
    cell = (canvas - (side + 1) * gap) // side
    out = Image.new("RGB", (canvas, canvas))
    for k, image in enumerate(images):
        r, c = divmod(k, side)
        scale = cell / max(image.size)
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        tile = image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
        x = gap + c * (cell + gap) + (cell - w) // 2
        y = gap + r * (cell + gap) + (cell - h) // 2
        out.paste(tile, (x, y))
    return out
