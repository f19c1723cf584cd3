"""Text-side helpers shared by methods: class weights from prompt templates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlmtune.backbones.base import FeatureEncoder


@torch.no_grad()
def class_text_weights(encoder: FeatureEncoder, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """CLIP's zero-shot weights: per class, the normalised mean of the normalised template features -> (K, D)."""
    k, t = len(classnames), len(templates)
    texts = [tpl.format(name) for name in classnames for tpl in templates]
    feats = encoder.encode_texts(texts).float().cpu().view(k, t, -1)  # (K, T, D)
    return F.normalize(F.normalize(feats, dim=-1).mean(dim=1), dim=-1)  # (K, D)
