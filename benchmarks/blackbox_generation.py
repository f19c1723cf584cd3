"""One CMA-ES generation of black-box prompt scoring, side by side: the paths of ``LocalBlackBox``.

    python benchmarks/blackbox_generation.py [--arch ViT-B-32] [--classes 100] [--images 64] [--popsize 40]
                                             [--reference] [--repeats 2]

All paths score the same 40 candidate contexts (p0 + A z, A ~ N(0, 0.2), z ~ N(0, 0.02^2), as the reference code
draws them) for K class prompts "a photo of a {}." on a random-init open_clip model, then compute each candidate's
cross-entropy fitness on the same images and labels:

- ``reference`` (with ``--reference``): one candidate at a time, every prompt through the full 77-token context
  (the CraFT / BBT reference code's structure);
- ``fp32 whole``: all candidates x classes batched, truncated after the last end-of-text token (vlmtune before
  issue 14);
- ``fp32 shared prefix``: [SOT, context] computed once per candidate, its keys / values reused by the K suffixes;
- ``bf16 shared prefix``: the same on a bfloat16 copy of the model (AMX / tensor cores).

Prints seconds per generation (best of ``--repeats``), the speed-up over ``fp32 whole``, the largest relative
fitness difference and the Spearman rank correlation of the 40 fitness values to ``fp32 whole``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr

from vlmtune.backbones import load_backbone
from vlmtune.blackbox.api import PredictRequest
from vlmtune.blackbox.local import LocalBlackBox

TEMPLATE = "a photo of a {}."
WORDS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@torch.no_grad()
def reference_fitness(bb, contexts: np.ndarray, classnames, images, labels) -> list[float]:
    """Serial loop over candidates with full-length contexts (the reference implementation's structure)."""
    tokens = bb.tokenize([TEMPLATE.format(c) for c in classnames])  # (K, 77)
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


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--popsize", type=int, default=40)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference", action="store_true", help="also time the reference's serial full-context loop")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(f"openclip:{args.arch}", cache=False)
    classnames = [f"{WORDS[i % 10]} {i // 10}" for i in range(args.classes)]  # no shared word after "a photo of a"
    rng = np.random.default_rng(0)
    width = bb.token_width
    a = rng.normal(0, 0.2, (4 * width, 512)).astype(np.float32)
    z = rng.normal(0, 0.02, (args.popsize, 512)).astype(np.float32)
    contexts = (z @ a.T).reshape(args.popsize, 4, width)
    size = bb.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    pil = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(args.images)]
    labels = torch.as_tensor(rng.integers(0, args.classes, args.images))

    def box_path(**options) -> tuple[float, list[float]]:
        box = LocalBlackBox(bb, **options)
        ids = box.upload_images(pil)

        def generation() -> list[float]:
            scores = torch.as_tensor(box.predict(PredictRequest(ids, classnames, TEMPLATE, contexts)))  # (C, N, K)
            return [float(F.cross_entropy(s, labels)) for s in scores]

        return timed(generation, args.repeats)

    paths = {"fp32 whole": box_path(share_prefix=False)}
    paths["fp32 shared prefix"] = box_path()
    paths["bf16 shared prefix"] = box_path(precision="bf16")
    if args.reference:
        box = LocalBlackBox(bb)
        images = torch.stack([box._features[i] for i in box.upload_images(pil)])  # the boxes' image features
        paths["reference"] = timed(lambda: reference_fitness(bb, contexts, classnames, images, labels), 1)
    base_s, base = paths["fp32 whole"]
    print(
        f"{args.arch} (random init), {args.popsize} candidates x {args.classes} classes x {args.images} images, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| path | s / generation | speed-up vs fp32 whole | max rel. fitness diff | Spearman |")
    print("|---|---|---|---|---|")
    for name, (seconds, fitness) in paths.items():
        rel = np.max(np.abs(np.array(fitness) - base) / np.abs(base))
        rho = spearmanr(fitness, base).statistic
        print(f"| {name} | {seconds:.2f} | {base_s / seconds:.2f}x | {rel:.1e} | {rho:.4f} |")


if __name__ == "__main__":
    main()
