"""Feature cache benchmark: cold extraction vs a cache hit for the same split, measured side by side.

python benchmarks/feature_cache.py [--dataset toy:colour-shapes] [--split test] [--backbone toy]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vlmtune import FeatureCache, extract_features, load_backbone, load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="toy:colour-shapes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--backbone", default="toy")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    backbone = load_backbone(args.backbone)
    split = load_dataset(args.dataset, args.data_root)[args.split]
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        t0 = time.perf_counter()
        cold = extract_features(backbone, split, cache, progress=False)
        t1 = time.perf_counter()
        warm = extract_features(backbone, split, cache, progress=False)
        t2 = time.perf_counter()
    assert torch.equal(cold.features, warm.features)
    print(f"{args.dataset}/{args.split}: {len(split)} images on {args.backbone}")
    print(f"cold extraction {t1 - t0:.2f} s, cache hit {t2 - t1:.3f} s, ratio {(t1 - t0) / max(t2 - t1, 1e-9):.0f}x")


if __name__ == "__main__":
    main()
