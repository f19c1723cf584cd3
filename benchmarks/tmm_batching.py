"""TMM training-step throughput: batched over images and classes vs the paper's batch-size-1 formulation.

    python benchmarks/tmm_batching.py [--batch 32] [--classes 10] [--repeats 3] [--backbone toy]

Same inputs, same parameters: one optimisation step's loss and gradients computed (a) for the whole batch at once
(B x K class-aware prompts through the text tower together) and (b) image by image, accumulating gradients (the
reference's batch size 1). Prints the speed ratio and the largest relative differences of loss and gradients.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlmtune import load_backbone
from vlmtune.methods.prompt.tmm import TMMClassifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbone", default="toy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bb = load_backbone(args.backbone, args.device)
    names = [f"class {i}" for i in range(args.classes)]
    settings = {"n_ctx": 4, "position": "end", "embed_dim": bb.embed_dim, "width": bb.token_width, "lam": 0.2}
    settings |= {"ctp": "attention", "tft": "attention", "scale": bb.logit_scale}
    clf = TMMClassifier(names, torch.randn(4, bb.token_width) * 0.02, settings).bind(bb)
    f = F.normalize(torch.randn(args.batch, bb.embed_dim), dim=-1).to(args.device)
    patches = F.normalize(torch.randn(args.batch, 49, bb.embed_dim), dim=-1).to(args.device)
    labels = torch.randint(0, args.classes, (args.batch,)).to(args.device)
    params = list(clf.parameters())

    def batched() -> tuple[float, list[torch.Tensor]]:
        loss = F.cross_entropy(clf.forward_logits(f, patches), labels)
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), list(grads)

    def serial() -> tuple[float, list[torch.Tensor]]:
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for i in range(args.batch):
            loss = F.cross_entropy(clf.forward_logits(f[i : i + 1], patches[i : i + 1]), labels[i : i + 1])
            loss = loss / args.batch
            for g, gi in zip(grads, torch.autograd.grad(loss, params), strict=True):
                g += gi
            total += float(loss.detach())
        return total, grads

    def timed(fn):  # best of repeats
        best, out = float("inf"), None
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, out

    with bb.frozen():
        t_b, (loss_b, g_b) = timed(batched)
        t_s, (loss_s, g_s) = timed(serial)
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(g_b, g_s, strict=True))
    print(f"backbone {args.backbone} on {args.device}, B={args.batch}, K={args.classes}, {args.threads} threads")
    print(f"batch-size-1 loop: {t_s * 1000:8.1f} ms/step ({args.batch / t_s:7.1f} images/s)")
    print(f"batched:           {t_b * 1000:8.1f} ms/step ({args.batch / t_b:7.1f} images/s)")
    loss_rel = abs(loss_b - loss_s) / abs(loss_s)
    print(f"speed-up: {t_s / t_b:.1f}x; loss rel. diff {loss_rel:.1e}; max grad rel. diff {rel:.1e}")


if __name__ == "__main__":
    main()
