"""Image features of a dataset split through a backbone, served from the feature cache when possible."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vlmtune.backbones.base import Backbone
from vlmtune.data.base import DatasetSplit
from vlmtune.features.cache import FeatureCache, FeatureKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSet:
    """L2-normalised image features of a split.

    Attributes:
        features: (N, D) pooled image features.
        labels: (N,) int64 labels.
        patches: (N, P, D) patch / spatial features, when asked for.
    """

    features: torch.Tensor
    labels: torch.Tensor
    patches: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> FeatureSet:
        patches = self.patches[index] if self.patches is not None else None
        return FeatureSet(self.features[index], self.labels[index], patches)

    def without_labels(self) -> UnlabeledFeatures:
        """The same features with the labels gone (what label-free methods receive)."""
        return UnlabeledFeatures(self.features, self.patches)


@dataclass(frozen=True)
class UnlabeledFeatures:
    """L2-normalised image features of unlabelled images: there is no ``labels`` attribute to peek at.

    Attributes:
        features: (N, D) pooled image features.
        patches: (N, P, D) patch / spatial features, when asked for.
    """

    features: torch.Tensor
    patches: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def with_labels(self, index: torch.Tensor, labels: torch.Tensor) -> FeatureSet:
        """The images at ``index`` (M,) as a labelled set with the given (pseudo-)labels (M,)."""
        patches = self.patches[index] if self.patches is not None else None
        return FeatureSet(self.features[index], labels.to(torch.long), patches)


def feature_key(backbone: Backbone, split: DatasetSplit, patches: bool) -> FeatureKey:
    return FeatureKey(
        backbone=backbone.spec,
        fingerprint=backbone.fingerprint(),
        preprocess=backbone.preprocess_id,
        dataset=split.dataset,
        split=split.split,
        samples=split.content_key(),
        kind="pooled+patches16" if patches else "pooled",  # patches held in float16 (PATCH_DTYPE)
    )


# Patch features are unit vectors: float16 keeps them to ~5e-4 and halves the largest tensor a run holds (TMM's test
# split: 50,000 images x 197 tokens x 512 = 10 GB instead of 20 GB at ViT-B/16). Scorers cast a pass at a time.
PATCH_DTYPE = torch.float16


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    split: DatasetSplit,
    cache: FeatureCache | None = None,
    *,
    patches: bool = False,
    batch_size: int = 256,
    workers: int = 4,
    progress: bool = True,
) -> FeatureSet:
    """Encode every image of ``split`` (or read the cache). Labels come from the split, never from the cache."""
    labels = torch.as_tensor(split.labels, dtype=torch.long)
    key = feature_key(backbone, split, patches)
    hit = cache.get(key, len(split), backbone.embed_dim) if cache is not None else None
    if hit is not None:
        log.info("features of %s/%s from cache", split.dataset, split.split)
        return FeatureSet(hit["features"], labels, hit.get("patches"))
    # outputs filled in place (never a list of batches concatenated at the end: that held every feature twice,
    # ~20 GB more at peak for the patch features of a 50,000-image split at ViT-B/16)
    features: torch.Tensor | None = None  # (N, D), allocated once the first batch gives D
    patch_out: torch.Tensor | None = None  # (N, P, D)
    bar = tqdm(
        total=len(split), desc=f"encoding {split.dataset}/{split.split}", unit="img", disable=not progress, leave=False
    )
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(split), batch_size):
            idx = range(start, min(start + batch_size, len(split)))
            images = torch.stack(list(pool.map(lambda i: backbone.preprocess(split.image(i)), idx)))  # (B, 3, H, W)
            pooled, tokens = backbone.encode_image_tokens(images)  # (B, D), (B, P, D)
            if features is None:
                features = torch.empty(len(split), pooled.shape[1])
            features[start : start + len(idx)] = pooled.float().cpu()
            if patches:
                if patch_out is None:
                    patch_out = torch.empty(len(split), *tokens.shape[1:], dtype=PATCH_DTYPE)
                patch_out[start : start + len(idx)] = tokens.to(PATCH_DTYPE).cpu()
            bar.update(len(idx))
    bar.close()
    if features is None:
        features = torch.empty(0, backbone.embed_dim)
    tensors = {"features": features}
    if patches:
        empty = torch.empty(0, 0, backbone.embed_dim, dtype=PATCH_DTYPE)
        tensors["patches"] = patch_out if patch_out is not None else empty
    if cache is not None:
        cache.put(key, tensors)
    return FeatureSet(features, labels, tensors.get("patches"))
