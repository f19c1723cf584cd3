"""Text-side helpers shared by methods: class weights from prompt templates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
