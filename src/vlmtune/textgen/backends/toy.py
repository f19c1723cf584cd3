"""Backend ``toy``: the bundled toy describer (``vlmtune.toy.describer``), offline and on the CPU.

It reads its mode off the request, as an instruction-following LMM reads the prompt: with an image, ``group`` when
the prompt asks for what the photos have in common (a collage), else ``image``; without an image, ``template``
when the prompt contains the ``{}`` slot, else ``class``. Class mode conditions on the attribute words of the prompt
(the class name: "striped circle"); template mode on a rendering style it names ("sketch").
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmtune._io import file_sha256
from vlmtune.errors import VlmtuneError, WeightsNotAvailable
from vlmtune.textgen.base import GenRequest, GenSettings, clean_text
from vlmtune.toy.describer import (
    ATTRIBUTE_WORDS,
    SLOT,
    TILE,
    DescriberConfig,
    ToyDescriber,
    describer_tokenizer,
    generate,
    load_toy_vision,
    prefix_ids,
    tiles_of,
)
from vlmtune.toy.world import STYLES

WEIGHTS, META = "describer.safetensors", "describer.json"
_GROUP_WORDS = re.compile(r"\b(common|all the|these photos|these images|group)\b", re.IGNORECASE)
BATCH = 64


def bundled_describer_dir() -> Path:
    return Path(str(resources.files("vlmtune.toy") / "weights" / "describer"))


def bundled_clip_dir() -> Path:
    return Path(str(resources.files("vlmtune.toy") / "weights"))


def request_mode(request: GenRequest) -> str:
    if request.image is not None:
        return "group" if _GROUP_WORDS.search(request.prompt) else "image"
    return "template" if SLOT in request.prompt else "class"


def condition_words(request: GenRequest, mode: str) -> list[str]:
    words = re.findall(r"[a-z]+", request.prompt.lower())
    if mode == "class":
        return [w for w in words if w in ATTRIBUTE_WORDS and w != "photo"]
    if mode == "template":
        return [w for w in words if w in STYLES][:1]
    return []


class ToyBackend:
    """The toy describer as a ``TextGenerator`` and a ``LikelihoodScorer`` (it describes; it follows no
    instruction)."""

    name = "toy"
    follows_instructions = False

    def __init__(self, model: str | None = None, device: str = "cpu") -> None:
        folder = Path(model).expanduser() if model else bundled_describer_dir()
        clip = bundled_clip_dir()
        if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
            raise WeightsNotAvailable(f"toy describer {folder}", [str(folder / WEIGHTS)])
        meta = json.loads((folder / META).read_text())
        if meta["image_tower"]["sha256"] != file_sha256(clip / "toy_clip.safetensors"):
            raise VlmtuneError(f"toy describer {folder} was trained on another toy CLIP image tower than {clip}")
        self.model = "toy-describer" if not model else str(folder)
        self.revision = file_sha256(folder / WEIGHTS)[:12]
        self.tokenizer = describer_tokenizer(meta["config"]["context_length"])
        self.net = ToyDescriber(DescriberConfig(**meta["config"]), load_toy_vision(clip))
        self.net.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}, strict=False)
        self.net.eval().to(device)
        self.device = device

    def _tiles(self, images: Sequence[Image.Image], grid: int) -> torch.Tensor:
        """PIL images -> (B, grid^2, 3, 32, 32): the whole image, or a collage's cells (AnyRes-style tiles)."""
        size = (TILE * grid, TILE * grid)
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.Resampling.BILINEAR)) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
        return tiles_of(x, grid).to(self.device)

    def generate(self, requests: Sequence[GenRequest], settings: GenSettings) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[request_mode(req)].append(i)
        out: list[str] = [""] * len(requests)
        gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        for mode, idx in groups.items():
            for start in range(0, len(idx), BATCH):
                chunk = idx[start : start + BATCH]
                prefix = torch.tensor(
                    [
                        prefix_ids(self.tokenizer, mode, condition_words(requests[i], mode), self.net.cfg.cond_length)
                        for i in chunk
                    ],
                    device=self.device,
                )
                images = None
                if mode in ("image", "group"):
                    grid = 2 if mode == "group" else 1
                    images = self._tiles([requests[i].image for i in chunk], grid)  # type: ignore[misc]
                texts = generate(
                    self.net,
                    self.tokenizer,
                    images,
                    prefix,
                    settings.max_new_tokens,
                    settings.temperature,
                    settings.top_p,
                    gen,
                )
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = clean_text(text)
        return out

    @torch.no_grad()
    def score(self, requests: Sequence[GenRequest], continuations: Sequence[str]) -> list[list[float]]:
        """Sum of the log-probabilities of each continuation's tokens and its end token, read in the request's mode
        (an image request: image mode) -> (R, C); requests of one mode are scored together, in chunks."""
        ids = [self.tokenizer.encode(c)[: self.net.cfg.context_length - 2] for c in continuations]
        c, length = len(ids), 2 + max(len(i) for i in ids)
        text = torch.full((c, length), self.tokenizer.pad_id, dtype=torch.long)
        for row, i in enumerate(ids):
            text[row, : len(i) + 2] = torch.tensor([self.tokenizer.sot_id, *i, self.tokenizer.eot_id])
        text = text.to(self.device)
        target, mask = text[:, 1:], text[:, 1:] != self.tokenizer.pad_id  # (C, L-1)
        out: list[list[float]] = [[] for _ in requests]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[request_mode(req)].append(i)
        per_chunk = max(1, BATCH * 8 // c)  # requests per forward pass (each with C continuations)
        for mode, idx in groups.items():
            for start in range(0, len(idx), per_chunk):
                chunk = idx[start : start + per_chunk]
                pre = [prefix_ids(self.tokenizer, mode, condition_words(requests[i], mode), self.net.cfg.cond_length)
                       for i in chunk]  # fmt: skip
                prefix = torch.tensor(pre, device=self.device).repeat_interleave(c, 0)  # (R C, P)
                image = None
                if mode in ("image", "group"):
                    tiles = self._tiles([requests[i].image for i in chunk], 2 if mode == "group" else 1)  # type: ignore[misc]
                    image = self.net.encode_image(tiles).repeat_interleave(c, 0)  # (R C, N, W)
                logits = self.net(image, prefix, text[:, :-1].repeat(len(chunk), 1)).float()  # (R C, L-1, V)
                picked = logits.log_softmax(-1).gather(-1, target.repeat(len(chunk), 1)[..., None])[..., 0]
                sums = (picked * mask.repeat(len(chunk), 1)).sum(1).view(len(chunk), c)  # (R, C)
                for i, row in zip(chunk, sums.tolist(), strict=True):
                    out[i] = row
        return out
