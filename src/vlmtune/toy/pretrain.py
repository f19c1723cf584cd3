"""Pretrain ToyCLIP contrastively on freshly rendered, captioned toy scenes.

    python -m vlmtune.toy.pretrain --out src/vlmtune/toy/weights --steps 6000 --device cuda
    python -m vlmtune.toy.pretrain --size small --out src/vlmtune/toy/weights/small --steps 4000 --batch 256

``--size`` picks the architecture (``SIZES``: ``base`` is the bundled ``toy`` backbone, ``small`` the ``toy:small``
student of the distillation protocol, a quarter of its parameters); it runs on CUDA or the CPU.

Every batch is new (no epochs, no dataset on disk); everything follows from ``--seed``. The result is a
``toy_clip.safetensors`` + ``toy_clip.json`` pair (config, vocabulary, normalisation, provenance) that
``load_backbone("toy")`` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlmtune.toy.model import ToyCLIP, ToyCLIPConfig
from vlmtune.toy.render import render
from vlmtune.toy.tasks import TOY_TASKS, get_task
from vlmtune.toy.tokenizer import ToyTokenizer
from vlmtune.toy.world import SceneDistribution, caption, sketch_dialect, vocabulary

log = logging.getLogger("vlmtune.toy.pretrain")
MEAN, STD = 0.5, 0.25  # image normalisation of ToyCLIP
CONTEXT_LENGTH = 20
SIZES: dict[str, dict[str, int]] = {  # ToyCLIPConfig fields per size (base = the dataclass defaults)
    "base": {},
    "small": {
        "vision_width": 64,
        "vision_layers": 3,
        "vision_heads": 2,
        "embed_dim": 64,
        "text_width": 64,
        "text_layers": 2,
        "text_heads": 2,
    },
}


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images (B, 3, S, S) -> normalised float input of ToyCLIP."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return (x - MEAN) / STD


@torch.no_grad()
def zero_shot_accuracy(model: ToyCLIP, tok: ToyTokenizer, task_name: str, device: str, n: int = 30) -> float:
    task = get_task(task_name)
    images, labels = task.generate("test", n)
    texts = [task.templates[0].format(c) for c in task.classnames]
    t = tok(texts).to(device)
    tf = F.normalize(model.text(model.text.embed_tokens(t), tok.eot_index(t)), dim=-1)
    imf = F.normalize(model.visual(normalise(images.to(device)))[0], dim=-1)
    return float(((imf @ tf.T).argmax(-1).cpu() == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("src/vlmtune/toy/weights"))
    ap.add_argument("--size", choices=sorted(SIZES), default="base", help="architecture (SIZES)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--dialect-pairs", type=int, default=3, help="shape-name pairs swapped in sketch captions")
    ap.add_argument("--rare-shape-prob", type=float, default=0.3, help="how often rare-style captions name the shape")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)  # parameter init
    tok = ToyTokenizer(vocabulary(), CONTEXT_LENGTH)
    cfg = ToyCLIPConfig(vocab_size=tok.vocab_size, context_length=CONTEXT_LENGTH, **SIZES[args.size])
    model = ToyCLIP(cfg).to(args.device)
    log.info("ToyCLIP: %d parameters, vocabulary %d", model.n_params(), tok.vocab_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = min(500, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    dev_gen = torch.Generator(device=args.device).manual_seed(args.seed)
    rng = random.Random(args.seed)
    dist = SceneDistribution()
    dialect = sketch_dialect(args.dialect_pairs)
    labels = torch.arange(args.batch, device=args.device)
    start = time.time()
    for step in range(args.steps):
        scene = dist.sample(args.batch, gen)
        texts = [caption(scene, i, rng, args.rare_shape_prob, dialect) for i in range(args.batch)]
        scene_dev = type(scene)(**{k: v.to(args.device) for k, v in vars(scene).items()})
        images = render(scene_dev, dev_gen)
        tokens = tok(texts).to(args.device)
        imf = F.normalize(model.visual(normalise(images))[0], dim=-1)  # (B, D)
        txf = F.normalize(model.text(model.text.embed_tokens(tokens), tok.eot_index(tokens)), dim=-1)  # (B, D)
        logits = model.logit_scale.exp() * imf @ txf.T  # (B, B)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            accs = {
                t: zero_shot_accuracy(model, tok, t, args.device)
                for t in ("shapes", "shapes-sketch", "shapes-noisy", "shapes-pixel")
            }
            model.train()
            log.info(
                "step %d loss %.3f scale %.1f zs %s (%.0fs)",
                step + 1,
                loss.item(),
                model.logit_scale.exp().item(),
                {k: round(v, 3) for k, v in accs.items()},
                time.time() - start,
            )
    elapsed = time.time() - start
    model.eval()
    for name in TOY_TASKS:
        log.info("final zero-shot %-14s %.3f", name, zero_shot_accuracy(model, tok, name, args.device, n=50))
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "vlmtune-toyclip/1",
        "config": cfg.to_dict(),
        "words": vocabulary(),
        "normalise": {"mean": MEAN, "std": STD},
        "provenance": {
            **run_provenance(args, elapsed, model.n_params()),
            "size": args.size,
            "rare_shape_prob": args.rare_shape_prob,
            "dialect_pairs": args.dialect_pairs,
        },
    }
    write_weights(args.out, "toy_clip", state, meta)
    log.info("saved to %s in %.0fs", args.out, elapsed)


def run_provenance(args: argparse.Namespace, seconds: float, n_params: int) -> dict[str, object]:
    """What a toy training script records of its run (shared by pretrain and train_describer)."""
    keys = ("seed", "steps", "batch", "lr")
    return {
        **{k: getattr(args, k) for k in keys},
        "device": str(args.device),
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "n_params": n_params,
    }


def write_weights(out: Path, stem: str, state: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
    """``<out>/<stem>.safetensors`` + ``<out>/<stem>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / f"{stem}.safetensors"))
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
