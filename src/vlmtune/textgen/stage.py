"""The text-generation stage: prompts + a backend (loaded only on a cache miss) + the text cache.

``TextStage`` generates what is missing and returns every text from the cache; ``DatasetTexts`` binds a stage to
one dataset's images (labels removed: label-free methods get it through ``Task.texts``) and knows the kinds of
text the papers use: per-image descriptions, group descriptions (collages of images sharing a pseudo-label),
class descriptions and class-slot templates.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vlmtune.data.base import DatasetSplit
from vlmtune.data.sealed import ImageSource, sample_id
from vlmtune.textgen.backends import load_generator, model_name
from vlmtune.textgen.base import GenRequest, GenSettings, TextGenerator
from vlmtune.textgen.cache import Entry, TextCache, text_key
from vlmtune.textgen.collage import CANVAS, GAP, collage
from vlmtune.textgen.prompts import Prompts

log = logging.getLogger(__name__)
CHUNK = 64  # generations per backend call; each chunk is stored before the next (a stop loses one chunk)


@dataclass
class Item:
    """One text to have: its prompt, the hash of its image (None: text only), how to build the request."""

    prompt: str
    image_hash: str | None
    request: Callable[[], GenRequest]
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextStage:
    """A backend by name (``toy``, ``openai``, ``transformers``), its options, a cache, default settings.

    The backend is built on the first cache miss only: with a cache filled elsewhere (``vlmtune textgen`` on a GPU
    box), nothing is loaded. ``generated`` counts the texts this stage had the backend write.
    """

    backend: str = "toy"
    model: str | None = None
    cache: TextCache = field(default_factory=lambda: TextCache(None))
    settings: GenSettings = field(default_factory=GenSettings)
    endpoint: str | None = None
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    generated: int = 0
    _generator: TextGenerator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.model_id = model_name(self.backend, self.model)  # validates the name before any work

    @property
    def generator(self) -> TextGenerator:
        if self._generator is None:
            self._generator = load_generator(self.backend, self.model, self.endpoint, self.device, **self.options)
        return self._generator

    def texts(self, items: Sequence[Item], settings: GenSettings | None = None, desc: str = "generating") -> list[str]:
        """The text of every item: from the cache, or generated in chunks (stored as each chunk ends)."""
        settings = settings or self.settings
        keys = [text_key(self.backend, self.model_id, it.prompt, it.image_hash, settings) for it in items]
        found = self.cache.get_many(keys)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one generation per distinct key
        todo = [i for k, i in first.items() if k not in found]
        todo.sort()
        if todo:
            log.info("%s: %d of %d texts to generate (%s %s)", desc, len(todo), len(items), self.backend, self.model_id)
        bar = tqdm(total=len(todo), desc=f"{desc} ({self.backend})", unit="text", disable=not self.progress or not todo)
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            gen = self.generator
            outs = gen.generate([items[i].request() for i in chunk], settings)
            entries = [
                Entry(
                    keys[i],
                    text,
                    {
                        "backend": self.backend,
                        "model": self.model_id,
                        "revision": gen.revision,
                        "settings": settings.to_json(),
                        "prompt": items[i].prompt,
                        "image": items[i].image_hash,
                        **items[i].provenance,
                    },
                )
                for i, text in zip(chunk, outs, strict=True)
            ]
            self.cache.put_many(entries)
            found.update({e.key: e.text for e in entries})
            self.generated += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return [found[k] for k in keys]


def group_members(
    labels: np.ndarray, size: int = 4, seed: int = 0, keys: Sequence[str] | None = None
) -> list[list[int]]:
    """For each image, ``size`` images with its pseudo-label drawn at random (without replacement where the class
    has enough; the image itself is not guaranteed to be among them: the LatteCLIP code's rule). With ``keys`` (the
    images' content hashes) each image's draw depends on its key and its class's keys alone, not on the order of the
    images: a run's seed-shuffled order and ``vlmtune textgen --kind group`` draw the same groups."""
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    if keys is not None:  # each class's pool in key order, each image's generator from its key
        by_class = {c: pool[np.argsort([keys[j] for j in pool], kind="stable")] for c, pool in by_class.items()}
    out = []
    for i, c in enumerate(labels):
        pool = by_class[int(c)]
        rng = np.random.default_rng([seed, i] if keys is None else [seed, int(keys[i][:15], 16)])
        out.append([int(j) for j in rng.choice(pool, size, replace=len(pool) < size)])
    return out


_SLOT = re.compile(r"\{\}")


def usable_template(text: str) -> str | None:
    """A generated template with exactly one ``{}`` slot (other braces escaped), or None."""
    text = text.strip().strip('"').strip()
    if len(_SLOT.findall(text)) != 1:
        return None
    head, tail = text.split("{}")
    return head.replace("{", "{{").replace("}", "}}") + "{}" + tail.replace("{", "{{").replace("}", "}}")


class DatasetTexts:
    """A stage bound to one dataset split's images and that dataset's prompts. The images are held as an opaque
    ``ImageSource`` (no labels, paths or sample ids in reach of a label-free method, which gets this object)."""

    def __init__(self, stage: TextStage, split: DatasetSplit, prompts: Prompts | None = None) -> None:
        self.stage = stage
        self.images = ImageSource(split)
        self.prompts = prompts or Prompts.for_dataset(split.dataset)
        self._hashes: list[str] | None = None

    @property
    def dataset(self) -> str:
        return self.images.dataset

    def image_hashes(self) -> list[str]:
        if self._hashes is None:
            n = len(self.images)
            reading = tqdm(range(n), desc="hashing images", disable=not self.stage.progress, leave=False)
            self._hashes = [self.images.content_hash(i) for i in reading]
        return self._hashes

    def _provenance(self, kind: str, i: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": kind, "dataset": self.dataset}
        if i is not None:
            out["id"] = sample_id(self.images, i)
        return out

    def image_descriptions(self, labels: Sequence[str] | None = None) -> list[str]:
        """T^image for every image (``labels``: class names of zero-shot pseudo-labels, for prompts with
        ``{label}``: the LatteCLIP code's Flowers / Food prompts)."""
        hashes = self.image_hashes()
        items = []
        for i, h in enumerate(hashes):
            prompt = self.prompts.image.replace("{label}", labels[i]) if labels is not None else self.prompts.image
            items.append(
                Item(prompt, h, lambda i=i, p=prompt: GenRequest(p, self.images.image(i)), self._provenance("image", i))
            )
        return self.stage.texts(items, desc="describing images")

    def group_descriptions(self, pseudo_labels: np.ndarray, size: int = 4, seed: int = 0) -> list[str]:
        """T^group for every image: ``size`` images sharing its pseudo-label, collaged (LatteCLIP's 2 x 2 for 4)."""
        hashes = self.image_hashes()
        groups = group_members(np.asarray(pseudo_labels), size, seed, hashes)
        items = []
        for i, members in enumerate(groups):
            digest = hashlib.sha256(f"collage/{CANVAS}/{GAP}/".encode() + "/".join(hashes[j] for j in members).encode())
            items.append(
                Item(
                    self.prompts.group,
                    digest.hexdigest(),
                    lambda m=members: GenRequest(self.prompts.group, collage([self.images.image(j) for j in m])),
                    {**self._provenance("group", i), "members": [sample_id(self.images, j) for j in members]},
                )
            )
        return self.stage.texts(items, desc="describing groups")

    def class_descriptions(self, classnames: Sequence[str], n: int = 5) -> dict[str, list[str]]:
        """n sampled one-sentence descriptions per class (text only)."""
        items = []
        for c in classnames:
            prompt = self.prompts.class_.replace("{classname}", c)
            items += [Item(prompt, None, lambda p=prompt: GenRequest(p), self._provenance("class")) for _ in range(n)]
        texts = self._sampled(items, n)
        return {c: texts[k * n : (k + 1) * n] for k, c in enumerate(classnames)}

    def templates(self, n: int = 8) -> list[str]:
        """Up to n distinct templates with one ``{}`` class slot, sampled (text only); an empty list if the
        backend wrote none that qualifies."""
        prompt = self.prompts.templates
        items = [Item(prompt, None, lambda: GenRequest(prompt), self._provenance("templates")) for _ in range(n)]
        usable = [usable_template(t) for t in self._sampled(items, n)]
        return list(dict.fromkeys(t for t in usable if t is not None))

    def _sampled(self, items: list[Item], n: int) -> list[str]:
        """Item k % n is sampled with seed k % n (distinct cache keys, reproducible), at temperature >= 0.7."""
        base = self.stage.settings
        temperature = max(base.temperature, 0.7)
        out: list[str] = [""] * len(items)
        for s in range(n):
            idx = list(range(s, len(items), n))
            settings = GenSettings(base.max_new_tokens, temperature, base.top_p, seed=s)
            for i, text in zip(idx, self.stage.texts([items[i] for i in idx], settings, "writing texts"), strict=True):
                out[i] = text
        return out
