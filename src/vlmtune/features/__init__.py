"""Feature extraction and the on-disk feature cache."""

from vlmtune.features.cache import FeatureCache, FeatureKey, default_cache_dir
from vlmtune.features.extract import FeatureSet, UnlabeledFeatures, extract_features

__all__ = ["FeatureCache", "FeatureKey", "FeatureSet", "UnlabeledFeatures", "default_cache_dir", "extract_features"]
