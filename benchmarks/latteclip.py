"""LatteCLIP on a toy pool: training throughput (images/s) and the time share of text generation in a run.

    python benchmarks/latteclip.py [--dataset toy:toynet-sketch-pool] [--iterations 16] [--batch-size 256]
                                   [--device cpu]

Two runs of the same configuration in one fresh cache folder, the CLIP features of the pool and the test split
extracted beforehand: the first generates the LMM texts (T^image of every image, T^group of every image's group, with
the toy describer) and trains; the second finds the texts in the cache and only trains. Text generation = first -
second; training throughput = images trained / the second run's fit time (both towers, forward and backward, batch
--batch-size). All figures of one invocation, on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from vlmtune import load_backbone, load_dataset
from vlmtune.features import FeatureCache, extract_features
from vlmtune.methods.labelfree.contrastive import epochs_for
from vlmtune.runs.runner import RunConfig, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="toy:toynet-sketch-pool")
    ap.add_argument("--iterations", type=int, default=16, help="LatteCLIP's min(iterations, epochs) budget")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    options = {"batch_size": args.batch_size, "iterations": args.iterations, "lr": 1e-5}
    cfg = RunConfig(method="latteclip", dataset=args.dataset, device=args.device, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        backbone, splits = load_backbone("toy", args.device), load_dataset(args.dataset)
        for split in ("train", "test"):  # features first: the two runs differ by the text generation alone
            extract_features(backbone, splits[split], cache, progress=False)
        times, results = [], []
        for _ in range(2):  # cold (texts generated), then warm (texts from the cache)
            start = time.perf_counter()
            results.append(run(cfg, cache=cache, progress=False, backbone=backbone, splits=splits))
            times.append(time.perf_counter() - start)
    n = results[1].n_train
    images = n * epochs_for(n, args.batch_size, args.iterations, 50)
    text = times[0] - times[1]
    print(f"| {args.dataset}, {n} unlabelled images, batch {args.batch_size}, device {args.device} | value |")
    print("|---|---|")
    print(f"| run with text generation (s) | {times[0]:.1f} |")
    print(f"| run with cached texts (s) | {times[1]:.1f} |")
    print(f"| text generation (s), its share of the first run | {text:.1f}, {100 * text / times[0]:.0f}% |")
    print(f"| training: images / fit seconds (img/s) | {images / results[1].fit_seconds:.1f} |")
    print(f"| test accuracy (both runs) | {results[0].accuracy['test']} / {results[1].accuracy['test']} |")


if __name__ == "__main__":
    main()
