"""The runner's side of text generation: the stage a run hands its method, and ``vlmtune textgen`` pre-generation.

Texts live in ``<cache dir>/textgen/texts.sqlite`` beside the feature cache (in memory with ``--no-cache``).
``pregenerate`` fills it for one dataset and kind (a GPU box with a real LMM, say) and writes a JSONL copy of what
it produced; copy the ``textgen`` folder to another machine and methods read the same texts there without loading
the generator.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmtune._io import atomic_write
from vlmtune.backbones import load_backbone
from vlmtune.data import DatasetSplit, load_dataset
from vlmtune.errors import UnknownName, VlmtuneError
from vlmtune.features import FeatureCache, extract_features
from vlmtune.methods.common.text import class_text_weights
from vlmtune.textgen import DatasetTexts, Prompts, TextCache, TextStage

TEXTGEN_KINDS = ("image", "group", "class", "templates")


_MEMORY: list[TextCache] = []


def text_cache_for(cache: FeatureCache | None) -> TextCache:
    """The text cache beside a feature cache (``<root>/textgen``), or, when caching is off, one in-memory cache
    shared by the runs of this process (a second run in the same process generates nothing again)."""
    if cache is None or cache.root is None:
        if not _MEMORY:
            _MEMORY.append(TextCache(None))
        return _MEMORY[0]
    return TextCache(cache.root.parent / "textgen")


@torch.no_grad()
def zero_shot_labels(backbone: Any, split: DatasetSplit, cache: FeatureCache | None, progress: bool) -> np.ndarray:
    """The frozen model's top-1 classes under the dataset's own template (LatteCLIP's c_zs for the groups)."""
    feats = extract_features(backbone, split, cache, progress=progress)
    weights = class_text_weights(backbone, split.classnames, split.templates[:1]).to(feats.features.dtype)
    return (feats.features @ weights.T).argmax(-1).numpy()


@dataclass
class PregenSummary:
    dataset: str
    split: str
    kind: str
    texts: int
    generated: int
    seconds: float
    jsonl: Path

    def line(self) -> str:
        rate = f", {self.generated / self.seconds:.1f} texts/s" if self.generated and self.seconds > 0 else ""
        return (
            f"{self.dataset}/{self.split} {self.kind}: {self.texts} texts ({self.generated} generated, "
            f"{self.texts - self.generated} from the cache) in {self.seconds:.1f} s{rate}; copy: {self.jsonl}"
        )


def pregenerate(
    stage: TextStage,
    dataset: str,
    kind: str,
    split: str = "train",
    data_root: str | None = None,
    backbone: str = "toy",
    device: str = "cpu",
    variant: str = "paper",
    prompt_overrides: dict[str, str] | None = None,
    n: int = 8,
    group_size: int = 4,
    limit: int | None = None,
    feature_cache: FeatureCache | None = None,
) -> PregenSummary:
    """Generate (or find cached) texts of one ``kind`` for a dataset split; write ``<cache>/<dataset>-<split>-<kind>
    .jsonl`` next to the cache (the in-memory cache writes it in the working folder)."""
    if kind not in TEXTGEN_KINDS:
        raise UnknownName("text kind", kind, list(TEXTGEN_KINDS))
    splits = load_dataset(dataset, data_root)
    if split not in splits:
        raise VlmtuneError(f"{dataset} has no {split!r} split (it has: {', '.join(sorted(splits))})")
    data = splits[split]
    if limit is not None:
        data = data.subset(range(min(limit, len(data))))
    prompts = Prompts.for_dataset(dataset, variant).with_overrides(prompt_overrides or {})
    texts = DatasetTexts(stage, data, prompts)
    start, before = time.perf_counter(), stage.generated
    rows: list[dict[str, Any]]
    if kind == "image":
        rows = [{"id": i, "text": t} for i, t in zip(data.ids, texts.image_descriptions(), strict=True)]
    elif kind == "group":
        labels = zero_shot_labels(load_backbone(backbone, device), data, feature_cache, stage.progress)
        out = texts.group_descriptions(labels, group_size)
        rows = [
            {"id": i, "pseudo_label": data.classnames[int(c)], "text": t}
            for i, c, t in zip(data.ids, labels, out, strict=True)
        ]
    elif kind == "class":
        rows = [{"class": c, "texts": ts} for c, ts in texts.class_descriptions(data.classnames, n).items()]
    else:
        rows = [{"template": t} for t in texts.templates(n)]
    seconds = time.perf_counter() - start
    root = stage.cache.root or Path(".")
    safe = dataset.replace(":", "_").replace("/", "_")
    jsonl = root / f"{safe}-{split}-{kind}.jsonl"
    atomic_write(jsonl, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return PregenSummary(dataset, split, kind, len(rows), stage.generated - before, seconds, jsonl)
