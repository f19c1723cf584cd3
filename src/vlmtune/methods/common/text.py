"""Text-side helpers shared by methods: class weights from prompt templates or from free sentences per class."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import FeatureEncoder
from vlmtune.errors import VlmtuneError


@torch.no_grad()
def class_text_weights(encoder: FeatureEncoder, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """CLIP's zero-shot weights: per class, the normalised mean of the normalised template features -> (K, D)."""
    k, t = len(classnames), len(templates)
    texts = [tpl.format(name) for name in classnames for tpl in templates]
    feats = encoder.encode_texts(texts).float().cpu().view(k, t, -1)  # (K, T, D)
    return F.normalize(F.normalize(feats, dim=-1).mean(dim=1), dim=-1)  # (K, D)


@torch.no_grad()
def class_description_weights(
    encoder: FeatureEncoder, classnames: Sequence[str], descriptions: Mapping[str, Sequence[str]]
) -> torch.Tensor:
    """Class weights from free sentences per class (LLM-written descriptions, CoFT+ / LaFTer): per class, the
    normalised mean of its sentences' normalised features -> (K, D). Every class needs at least one sentence."""
    missing = [c for c in classnames if not descriptions.get(c)]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise VlmtuneError(f"the descriptions have no sentence for {len(missing)} class(es): {shown}")
    rows = []
    for name in classnames:
        feats = F.normalize(encoder.encode_texts(list(descriptions[name])).float().cpu(), dim=-1)  # (S, D)
        rows.append(feats.mean(0))
    return F.normalize(torch.stack(rows), dim=-1)  # (K, D)


def read_descriptions(path: str | Path) -> dict[str, list[str]]:
    """A JSON file ``{class name: [sentence, ...]}`` (LaFTer's descriptions/*.json layout), checked."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        raise VlmtuneError(f"descriptions file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise VlmtuneError(f"descriptions file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v) for v in data.values()
    ):
        raise VlmtuneError(f"descriptions file {path}: expected {{class name: [non-empty sentences]}}")
    return data
