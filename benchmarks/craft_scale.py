"""One CraFT generation at ImageNet size (K = 1,000 classes, 16 shots: N = 16,000 images): peak memory and time.

    python benchmarks/craft_scale.py [--classes 1000] [--shots 16] [--arch ViT-B-32] [--precision auto]
                                     [--device cpu] [--settings streamed former]

Each setting runs one CMA-ES generation (40 candidates, the paper's L_I with the refinement head) in a fresh
process on a random-init open_clip model; the N training images are random unit features put in the box (encoding
16,000 images is not what is measured). The peak is the process's maximum resident set above the model and the
features (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).

- ``streamed`` (vlmtune): the candidates' scores are requested within the box's limits (at most 2^26 values a
  reply: 4 candidates here) and each reply is reduced to per-candidate losses before the next request;
- ``former``: one request for all (40, N, K) scores (2.6 GB; the box's reply limit raised to let it through, as
  before issue 14) and the fitness computed on the whole tensor.

Prints the peak, the seconds and the fitness values' largest relative difference between the settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def child(setting: str, classes: int, shots: int, arch: str, precision: str, device: str) -> None:
    import numpy as np
    import torch.nn.functional as F

    from vlmtune import load_backbone
    from vlmtune.blackbox.api import ImageRefs, ServiceLimits
    from vlmtune.blackbox.local import LocalBlackBox
    from vlmtune.methods.api import Task
    from vlmtune.methods.blackbox.base import query_scores
    from vlmtune.methods.blackbox.craft import CollaborativeTrainer
    from vlmtune.methods.registry import get_method, make_config

    torch.set_num_threads(torch.get_num_threads())
    torch.manual_seed(0)
    bb = load_backbone(f"openclip:{arch}", device, cache=False)
    limits = ServiceLimits(max_reply_values=2**31, max_images=10**6) if setting == "former" else None
    box = LocalBlackBox(bb, limits=limits, precision=precision)  # type: ignore[arg-type]
    n = classes * shots
    ids = [f"{i:024x}" for i in range(n)]
    features = F.normalize(torch.randn(n, bb.embed_dim), dim=-1)
    box._features.update(zip(ids, features, strict=True))  # stand-ins for n uploaded images
    labels = torch.arange(classes).repeat_interleave(shots)
    words = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    names = [f"{words[i % 10]} {i // 10}" for i in range(classes)]
    task = Task(names, ["a photo of a {}."], train=ImageRefs(ids, labels))
    craft = get_method("craft")
    trainer = CollaborativeTrainer(make_config(craft, {}), box, task, torch.Generator().manual_seed(0))
    z = np.asarray(trainer.es.ask())  # (40, d0)
    contexts = trainer.prompt.split(z)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
    start = time.perf_counter()
    if setting == "former":
        scores = query_scores(box, task.train, names, "a photo of a {}.", *contexts)  # (40, N, K) at once
        fitness = trainer.sample_losses(scores, labels, consistency=True).mean(1).numpy()
    else:
        fitness = trainer.fitness(contexts, consistency=True)[0]
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
    print(json.dumps({"peak_gib": round(peak, 2), "seconds": round(seconds, 1), "fitness": fitness.tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", nargs="+", default=["streamed", "former"], choices=("streamed", "former"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.classes, args.shots, args.arch, args.precision, args.device)
        return
    results = {}
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--child", setting, "--classes", str(args.classes), "--shots", str(args.shots)]
        cmd += ["--arch", args.arch, "--precision", args.precision, "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{setting}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
            continue
        results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"one CraFT generation, 40 candidates x {args.classes} classes x {args.classes * args.shots} images, "
        f"{args.arch} (random init), precision {args.precision}, {args.device}, {torch.get_num_threads()} threads\n"
    )
    print("| setting | peak GiB | seconds |")
    print("|---|---|---|")
    for setting, r in results.items():
        print(f"| {setting} | {r['peak_gib']} | {r['seconds']} |")
    if len(results) == 2:
        a, b = (torch.tensor(r["fitness"], dtype=torch.float64) for r in results.values())
        print(f"\nmax relative fitness difference: {((a - b).abs() / b.abs()).max():.1e}")


if __name__ == "__main__":
    main()
