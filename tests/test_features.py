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


def _poison(data_path, tensors_fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(data_path))
    save_file({k: tensors_fn(v) for k, v in tensors.items()}, str(data_path))


def test_a_replaced_or_poisoned_entry_is_detected_and_recomputed(toy, tmp_path, caplog):
    """Same-size random numbers or NaN in a cached entry used to be served silently (linear probe 97.2% -> 10.2%)."""
    split = few_shot(load_dataset("toy:nonce-shapes")["val"], 2, seed=1)
    cache = FeatureCache(tmp_path)
    clean = extract_features(toy, split, cache, progress=False).features
    data = next((tmp_path / "features").glob("*.safetensors"))
    for poison in (lambda v: torch.randn_like(v), lambda v: torch.full_like(v, float("nan"))):
        _poison(data, poison)
        with caplog.at_level("WARNING"):
            again = extract_features(toy, split, cache, progress=False).features
        assert "damaged" in caplog.text
        torch.testing.assert_close(again, clean)  # recomputed, and rewritten intact
        caplog.clear()
    key = feature_key(toy, split, patches=False)
    assert cache.get(key, len(split), toy.embed_dim) is not None
    assert cache.get(key, len(split) + 1, toy.embed_dim) is None  # wrong sample count: a miss


def test_cache_files_honour_the_umask(toy, tmp_path):
    import os
    import stat

    split = few_shot(load_dataset("toy:nonce-shapes")["val"], 1, seed=1)
    extract_features(toy, split, FeatureCache(tmp_path), progress=False)
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (tmp_path / "features").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600: shared caches work
