"""Feature cache: complete keys, no encoder work on a hit, atomic files, damaged entries are misses."""

from __future__ import annotations

import torch

from vlmtune.data import few_shot, load_dataset
from vlmtune.features import FeatureCache, extract_features
from vlmtune.features.extract import feature_key


class CountingBackbone:
    """Wraps a backbone and counts image-encoder forward calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_image_tokens(self, images, normalize=True):
        self.calls += 1
        return self.inner.encode_image_tokens(images, normalize)


def test_second_identical_run_does_no_image_forward(toy, tmp_path):
    split = few_shot(load_dataset("toy:shapes")["test"], 5, seed=1)
    counting = CountingBackbone(toy)
    first = extract_features(counting, split, FeatureCache(tmp_path), progress=False)
    assert counting.calls > 0
    calls = counting.calls
    second = extract_features(counting, split, FeatureCache(tmp_path), progress=False)
    assert counting.calls == calls
    torch.testing.assert_close(first.features, second.features)
    assert torch.equal(second.labels, torch.as_tensor(split.labels))
    # another sample set, or asking for patches, is another key
    extract_features(
        counting, few_shot(load_dataset("toy:shapes")["test"], 5, seed=2), FeatureCache(tmp_path), progress=False
    )
    assert counting.calls > calls
    with_patches = extract_features(counting, split, FeatureCache(tmp_path), patches=True, progress=False)
    assert with_patches.patches is not None and with_patches.patches.shape[:2] == (50, 64)


def test_key_covers_model_preprocessing_and_samples(toy):
    split = load_dataset("toy:shapes")["test"]
    key = feature_key(toy, split, patches=False)
    assert key.backbone == "toy" and key.fingerprint == toy.fingerprint() and key.preprocess == toy.preprocess_id
    assert key.dataset == "toy:shapes" and key.split == "test" and key.dtype == "float32"
    assert key.samples != feature_key(toy, split.subset(range(10)), patches=False).samples


def test_cache_files_are_complete_and_damage_is_a_miss(toy, tmp_path):
    split = few_shot(load_dataset("toy:nonce-shapes")["val"], 2, seed=1)
    cache = FeatureCache(tmp_path)
    extract_features(toy, split, cache, progress=False)
    files = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    data = next((tmp_path / "features").glob("*.safetensors"))
    data.write_bytes(b"garbage")
    assert cache.get(feature_key(toy, split, patches=False)) is None
    extract_features(toy, split, cache, progress=False)  # rewritten
    assert cache.get(feature_key(toy, split, patches=False)) is not None


def test_fingerprint_follows_in_place_weight_changes():
    from vlmtune import load_backbone

    backbone = load_backbone("toy", cache=False)
    before = backbone.fingerprint()
    assert backbone.fingerprint() == before  # memoised
    with torch.no_grad():
        next(backbone.module.parameters()).mul_(1.01)
    assert backbone.fingerprint() != before
