"""Pixel-training throughput: vlmtune's fine-tuning loop vs a plain loop, side by side in one run.

Both fully fine-tune the image tower plus a linear head (cross-entropy) on the same model, images, augmentation
(random resized crop + flip) and batch size for the same number of steps:

- vlmtune: ``pixels.train_pixels`` over ``pixels.make_loader`` (DataLoader workers; bfloat16 autocast and pinned
  memory on CUDA; DDP under torchrun);
- plain: one process, images decoded and augmented in the training loop (no workers), fp32.

On CUDA it also reports the peak GPU memory of each (``torch.cuda.max_memory_allocated``).

python benchmarks/pixel_training.py                                   # toy on CPU
python benchmarks/pixel_training.py --dataset caltech101 --data-root ../shared/data   # real JPEGs
python benchmarks/pixel_training.py --backbone openclip:ViT-B-16 --device cuda --batch 64   # the device figure
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from vlmtune import load_backbone, load_dataset
from vlmtune.backbones.tuning import TowerTuning, tunable_copy
from vlmtune.pixels import ImageSet, LabelledViews, LossModule, make_loader, train_pixels, view
from vlmtune.pixels.data import default_workers
from vlmtune.schedule import Schedule


def _setup(args: argparse.Namespace) -> tuple[object, LossModule]:
    base = load_backbone(args.backbone, args.device, cache=False)
    tuned = tunable_copy(base, TowerTuning("full"))
    head = nn.Linear(base.embed_dim, args.classes).to(tuned.device)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(F.normalize(tuned.encode_images(x), dim=-1)), y)

    return tuned, LossModule({"tower": tuned.model, "head": head}, loss)


def _data(args: argparse.Namespace, tuned: object, images: ImageSet) -> LabelledViews:
    n = args.steps * args.batch
    index = torch.arange(n) % len(images)
    targets = index % args.classes
    return LabelledViews([(images, index, targets)], view("flip-crop", tuned))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_vlmtune(args: argparse.Namespace, images: ImageSet) -> tuple[float, float | None]:
    tuned, module = _setup(args)
    data = _data(args, tuned, images)
    device = tuned.device
    loader = make_loader(data, args.batch, seed=0, pin_memory=device.type == "cuda", workers=args.workers)
    schedule = Schedule(lr=1e-5, epochs=1, batch_size=args.batch, warmup_epochs=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    train_pixels(module, loader, schedule, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return len(data) / seconds, peak


def run_plain(args: argparse.Namespace, images: ImageSet) -> tuple[float, float | None]:
    tuned, module = _setup(args)
    data = _data(args, tuned, images)
    device = tuned.device
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for s in range(0, len(data), args.batch):
        items = [data[int(i)] for i in order[s : s + args.batch]]
        x = torch.stack([x for x, _ in items]).to(device)
        y = torch.stack([y for _, y in items]).to(device)
        loss = module(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return len(data) / seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="toy")
    ap.add_argument("--dataset", default="toy:toynet-noisy-pool")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=None, help="vlmtune loop's workers (default: cores - 1, <= 8)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.backbone.startswith("openclip:") and "@" not in args.backbone:
        import warnings

        warnings.filterwarnings("ignore", "No pretrained weights")
    images = ImageSet.unlabelled(load_dataset(args.dataset, args.data_root)["train"])
    workers = default_workers() if args.workers is None else args.workers
    print(f"{args.backbone} on {args.device}, {args.dataset}: batch {args.batch}, {args.steps} steps, full FT + head")
    ours, ours_peak = run_vlmtune(args, images)
    plain, plain_peak = run_plain(args, images)
    amp = "on" if args.device.startswith("cuda") else "off"
    print(f"vlmtune loop ({workers} workers, AMP {amp}): {ours:.1f} img/s")
    print(f"plain loop   (no workers, fp32):  {plain:.1f} img/s")
    print(f"ratio {ours / plain:.2f}x")
    if ours_peak is not None:
        print(f"peak GPU memory: vlmtune {ours_peak:.2f} GiB, plain {plain_peak:.2f} GiB")


if __name__ == "__main__":
    main()
