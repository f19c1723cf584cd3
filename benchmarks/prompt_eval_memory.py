"""Peak memory of CoCoOp / TMM inference against the number of classes K: the sequences-per-pass bound
(``PromptClassifier.eval_prompts``, 4,096) vs the former fixed 64 images per pass (64 x K sequences).

    python benchmarks/prompt_eval_memory.py [--classes 100 300 1000] [--images 64] [--arch ViT-B-32] [--device cpu]

Each (K, setting) runs in a fresh process: a random-init open_clip model (ViT-B/32's text tower is ViT-B/16's:
width 512, 12 layers, 77 tokens) scores ``--images`` random image features with a CoCoOp head; the peak is the
process's maximum resident set (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA), above the model's own. Prints
the peak, the time and the largest difference of the logits between the two settings (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def child(classes: int, images: int, bounded: bool, arch: str, device: str) -> None:
    import torch.nn.functional as F

    from vlmtune import load_backbone
    from vlmtune.methods.prompt.cocoop import CoCoOpClassifier

    torch.set_num_threads(2)
    torch.manual_seed(0)
    bb = load_backbone(f"openclip:{arch}", device)
    names = [f"class number {i}" for i in range(classes)]
    settings = {"n_ctx": 4, "position": "end", "embed_dim": bb.embed_dim, "width": bb.token_width}
    settings |= {"scale": bb.logit_scale}
    clf = CoCoOpClassifier(names, torch.randn(4, bb.token_width) * 0.02, settings).bind(bb)
    if not bounded:
        clf.eval_prompts = clf.eval_batch * classes  # the former rule: 64 images per pass, whatever K
    f = F.normalize(torch.randn(images, bb.embed_dim), dim=-1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    start = time.perf_counter()
    logits = clf._batched(f, None)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
    out = {"peak_gib": round(peak, 2), "seconds": round(seconds, 1), "per_pass": clf.images_per_pass()}
    print(json.dumps({**out, "logits": logits[:, :8].tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        classes, bounded = int(args.child[0]), args.child[1] == "1"
        return child(classes, args.images, bounded, args.arch, args.device)
    print(f"{args.images} images, open_clip {args.arch} (random init), {args.device}")
    print("| K | sequences per pass (bounded / former) | peak GiB (bounded / former) | seconds | max logit diff |")
    print("|---|---|---|---|---|")
    for k in args.classes:
        runs = {}
        for bounded in (True, False):
            cmd = [sys.executable, __file__, "--child", str(k), "1" if bounded else "0", "x"]
            cmd += ["--images", str(args.images), "--arch", args.arch, "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                runs[bounded] = None  # e.g. killed for memory
                continue
            runs[bounded] = json.loads(done.stdout.strip().splitlines()[-1])
        new, old = runs[True], runs[False]
        assert new is not None
        diff = (torch.tensor(new["logits"]) - torch.tensor(old["logits"])).abs().max().item() if old else float("nan")
        seqs = f"{min(new['per_pass'], args.images) * k:,} / {min(64, args.images) * k:,}"
        peaks = f"{new['peak_gib']} / {old['peak_gib'] if old else 'failed'}"
        secs = f"{new['seconds']} / {old['seconds'] if old else '-'}"
        print(f"| {k:,} | {seqs} | {peaks} | {secs} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
