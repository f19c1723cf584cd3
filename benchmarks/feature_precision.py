"""Image feature extraction in fp32 vs bf16 weights (the image tower cast to bfloat16, not autocast) and
channels_last (ResNets): images per second and the cosine of the features to fp32's, side by side in one run.

    python benchmarks/feature_precision.py [--archs ViT-B-32 RN50] [--images 64] [--batch 32] [--threads 2]

Random-init open_clip models (no download; the arithmetic is what is timed). On CPUs with AMX (Sapphire Rapids and
later) bf16 matrix products run on the tile units; elsewhere bf16 may be slower than fp32. A precision is usable
for feature caching when its minimum cosine to fp32 is >= 0.999 (issue 14's check).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F


def encode(tower: torch.nn.Module, images: torch.Tensor, batch: int, dtype: torch.dtype, channels_last: bool):
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(tower(x).float())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "RN50"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.images} images of 224 x 224, batch {args.batch}, {args.threads} threads, torch {torch.__version__}")
    print("| arch | setting | img/s | speed-up | min cosine to fp32 |")
    print("|---|---|---|---|---|")
    for arch in args.archs:
        model = open_clip.create_model(arch, pretrained=None).eval()
        images = torch.randn(args.images, 3, 224, 224)
        settings = [("fp32", torch.float32, False), ("bf16 weights", torch.bfloat16, False)]
        if arch.startswith("RN"):
            settings += [("fp32 channels_last", torch.float32, True), ("bf16 channels_last", torch.bfloat16, True)]
        reference, base_rate = None, None
        for name, dtype, cl in settings:
            tower = copy.deepcopy(model.visual).to(dtype)
            if cl:
                tower = tower.to(memory_format=torch.channels_last)
            encode(tower, images[: args.batch], args.batch, dtype, cl)  # warm-up
            start = time.perf_counter()
            feats = encode(tower, images, args.batch, dtype, cl)
            rate = args.images / (time.perf_counter() - start)
            if reference is None:
                reference, base_rate = feats, rate
            cos = F.cosine_similarity(feats, reference, dim=-1).min().item()
            print(f"| {arch} | {name} | {rate:.1f} | {rate / base_rate:.2f}x | {cos:.5f} |", flush=True)


if __name__ == "__main__":
    main()
