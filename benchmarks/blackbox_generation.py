"""One CMA-ES generation of black-box prompt scoring: vlmtune's batched box vs the reference's serial loop.

    python benchmarks/blackbox_generation.py [--arch ViT-B-32] [--popsize 40] [--classes 10] [--bf16]

Both score the same 40 candidate contexts (p0 + A z, A ~ N(0, 0.2), z ~ N(0, 0.02^2)) for K = 10 class prompts on
a random-init open_clip text tower, then compute each candidate's cross-entropy fitness on the same images:

- reference: one candidate at a time, every class prompt through the full 77-token context (as the CraFT / BBT
  reference code does);
- vlmtune: ``LocalBlackBox`` — all candidates x classes in one batch, truncated after the last end-of-text token.

Prints both wall times, the speed ratio and the max relative difference of the 40 fitness values.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from vlmtune.backbones import load_backbone
from vlmtune.blackbox.api import PredictRequest
from vlmtune.blackbox.local import LocalBlackBox

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@torch.no_grad()
def reference_fitness(bb, contexts: np.ndarray, classnames, template, images, labels) -> list[float]:
    """Serial loop over candidates with full-length contexts (the reference implementation's structure)."""
    tokens = bb.tokenize([template.format(c) for c in classnames])  # (K, 77)
    eot = bb.eot_index(tokens)
    base = bb.embed_tokens(tokens)  # (K, 77, W)
    out = []
    for ctx in torch.as_tensor(contexts):  # (n_ctx, W) per candidate
        embeds = base.clone()
        embeds[:, 1 : 1 + ctx.shape[0]] += ctx  # p0 + A z
        text = bb.encode_text_embeddings(embeds, eot)  # full 77 positions, (K, D)
        logits = bb.logit_scale * images @ text.T  # (N, K)
        out.append(float(F.cross_entropy(logits, labels)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--popsize", type=int, default=40)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="also time the batched path under bf16 autocast")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(f"openclip:{args.arch}", cache=False)
    classnames = (CLASSES * (args.classes // len(CLASSES) + 1))[: args.classes]
    template = "a photo of a {}."
    rng = np.random.default_rng(0)
    width = bb.token_width
    a = rng.normal(0, 0.2, (4 * width, 512)).astype(np.float32)
    z = rng.normal(0, 0.02, (args.popsize, 512)).astype(np.float32)
    contexts = (z @ a.T).reshape(args.popsize, 4, width)

    box = LocalBlackBox(bb)
    size = bb.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    from PIL import Image

    pil = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.images)]
    ids = box.upload_images(pil)
    labels = torch.as_tensor(rng.integers(0, args.classes, args.images))
    images = torch.stack([box._features[i] for i in ids])  # the same image features for both paths

    def batched() -> list[float]:
        scores = torch.as_tensor(box.predict(PredictRequest(ids, classnames, template, contexts)))  # (C, N, K)
        return [float(F.cross_entropy(s, labels)) for s in scores]

    batched()  # warm-up both paths once
    reference_fitness(bb, contexts[:1], classnames, template, images, labels)
    t0 = time.perf_counter()
    ref = reference_fitness(bb, contexts, classnames, template, images, labels)
    t1 = time.perf_counter()
    ours = batched()
    t2 = time.perf_counter()
    rel = np.max(np.abs(np.array(ours) - np.array(ref)) / np.maximum(np.abs(ref), 1e-12))
    print(
        f"{args.arch} text tower (random init), {args.popsize} candidates x {args.classes} classes, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"reference serial full-context loop: {t1 - t0:.2f} s")
    print(f"vlmtune batched, truncated:         {t2 - t1:.2f} s")
    print(f"speed ratio {(t1 - t0) / (t2 - t1):.1f}x, max relative fitness difference {rel:.2e}")
    if args.bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            batched()
            t3 = time.perf_counter()
            ours16 = batched()
            t4 = time.perf_counter()
        rel16 = np.max(np.abs(np.array(ours16) - np.array(ref)) / np.abs(ref))
        print(
            f"vlmtune batched bf16:               {t4 - t3:.2f} s, ratio {(t1 - t0) / (t4 - t3):.1f}x, "
            f"max relative difference {rel16:.2e}"
        )


if __name__ == "__main__":
    main()
