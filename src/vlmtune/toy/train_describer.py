"""Train the toy describer (``vlmtune.toy.describer``) on freshly rendered, described toy scenes.

    python -m vlmtune.toy.train_describer --out src/vlmtune/toy/weights/describer --steps 3000 --device cuda
    python -m vlmtune.toy.train_describer --steps 3000            # the CPU works too (bf16 weights on AMX cores)

Every step renders new scenes (the pretraining distribution: mostly photos, rare styles) and trains the four modes
side by side: one image, a 2x2 collage of four images that mostly share their shape (like a pseudo-label group),
a class description from the attribute words of a class name, and a template with a ``{}`` slot. The toy CLIP's
image tower (``--clip``, default the bundled ``toy``) stays frozen. The result is ``describer.safetensors``
(float16, the projector and decoder) + ``describer.json`` (config, vocabulary, the image tower's weights hash,
provenance and the attribute accuracy measured at the end), which ``textgen`` backend ``toy`` reads.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmtune._io import file_sha256
from vlmtune.toy.describer import (
    ATTRIBUTES,
    MODE_TOKENS,
    DescriberConfig,
    ToyDescriber,
    attribute_accuracy,
    class_target,
    describer_tokenizer,
    generate,
    group_target,
    image_target,
    load_toy_vision,
    prefix_ids,
    template_target,
    tiles_of,
)
from vlmtune.toy.pretrain import run_provenance, write_weights
from vlmtune.toy.render import StyleParams, render
from vlmtune.toy.tokenizer import ToyTokenizer
from vlmtune.toy.world import STYLES, SceneBatch, SceneDistribution, sketch_dialect

log = logging.getLogger("vlmtune.toy.train_describer")
COLLAGE, GAP = 64, 2  # a collage at 2 x 32 px with 2 px gaps (LatteCLIP: 20 px on a 672 canvas)
SHIFTS = {  # evaluation styles and the strength of the toy tasks' shifts
    "photo": StyleParams(),
    "sketch": StyleParams(sketch_width=0.06, sketch_jitter=0.06),
    "noisy": StyleParams(noise_std=0.25),
    "pixel": StyleParams(pixel_factor=4),
    "blurry": StyleParams(blur_sigma=1.6),
}


def collage(images: torch.Tensor) -> torch.Tensor:
    """(B, 4, 3, S, S) -> 2x2 collages (B, 3, 64, 64) on black with GAP-pixel gaps (as textgen.collage, small)."""
    b = images.shape[0]
    cell = (COLLAGE - 3 * GAP) // 2
    tiles = F.interpolate(images.flatten(0, 1), size=cell, mode="bilinear", antialias=True).view(b, 4, 3, cell, cell)
    out = torch.zeros(b, 3, COLLAGE, COLLAGE, device=images.device)
    for k in range(4):
        r, c = divmod(k, 2)
        y, x = GAP + r * (cell + GAP), GAP + c * (cell + GAP)
        out[:, :, y : y + cell, x : x + cell] = tiles[:, k]
    return out


def group_scenes(n: int, gen: torch.Generator, rng: random.Random) -> tuple[SceneBatch, list[list[int]]]:
    """n groups of four scenes: one style per group, the shape shared with probability 0.8 per image, colour /
    texture / size / background shared as a whole group sometimes (a pseudo-label group of a real dataset)."""
    base = SceneDistribution(exclude_pairs=()).sample(4 * n, gen)
    fields = {k: v.clone() for k, v in vars(base).items()}
    for g in range(n):
        rows = slice(4 * g, 4 * g + 4)
        anchor = 4 * g
        fields["style"][rows] = fields["style"][anchor]
        keep = torch.rand(4, generator=gen) < 0.8
        fields["shape"][rows] = torch.where(keep, fields["shape"][anchor], fields["shape"][rows])
        for attr, p in (("colour", 0.5), ("texture", 0.4), ("size", 0.3), ("background", 0.3)):
            if rng.random() < p:
                fields[attr][rows] = fields[attr][anchor]
    return SceneBatch(**fields), [list(range(4 * g, 4 * g + 4)) for g in range(n)]


def batch(
    mode: str, n: int, tok: ToyTokenizer, cfg: DescriberConfig, gen: torch.Generator, rng: random.Random, dev: str
) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    """(images or None, prefix ids, target texts) of one mode."""
    dialect = sketch_dialect()
    if mode == "image":
        scene = SceneDistribution(exclude_pairs=()).sample(n, gen)
        images = tiles_of(render(scene, gen), 1)  # (B, 1, 3, 32, 32)
        return (
            images,
            torch.tensor([prefix_ids(tok, mode, [], cfg.cond_length)] * n),
            [image_target(scene, i, rng, dialect) for i in range(n)],
        )
    if mode == "group":
        scene, groups = group_scenes(n, gen, rng)
        images = tiles_of(collage(render(scene, gen).view(n, 4, 3, 32, 32)), 2)  # (B, 4, 3, 32, 32)
        return (
            images,
            torch.tensor([prefix_ids(tok, mode, [], cfg.cond_length)] * n),
            [group_target(scene, g, rng, dialect) for g in groups],
        )
    prefixes, texts = [], []
    for _ in range(n):
        if mode == "template":
            style = rng.choice(STYLES) if rng.random() < 0.5 else "photo"
            words = [style] if style != "photo" or rng.random() < 0.5 else []
            texts.append(template_target(style, rng))
        else:
            words = [
                rng.choice(values) for a, values in ATTRIBUTES.items() if rng.random() < (0.9 if a == "shape" else 0.3)
            ]
            texts.append(class_target(words, rng))
        prefixes.append(prefix_ids(tok, mode, words, cfg.cond_length))
    return None, torch.tensor(prefixes), texts


def loss_of(
    model: ToyDescriber, tok: ToyTokenizer, images: torch.Tensor | None, prefix: torch.Tensor, texts: list[str]
):
    ids = tok(texts).to(prefix.device)  # (B, L): SOT caption EOT pad
    img = model.encode_image(images) if images is not None else None
    logits = model(img, prefix, ids[:, :-1])  # (B, L-1, V)
    target = ids[:, 1:].masked_fill(ids[:, 1:] == tok.pad_id, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


@torch.no_grad()
def evaluate(model: ToyDescriber, tok: ToyTokenizer, dev: str, n: int = 200, seed: int = 123) -> dict[str, dict]:
    """Attribute accuracy of greedy image descriptions, per rendering style (the toy tasks' shifts)."""
    model.eval()
    gen, out = torch.Generator().manual_seed(seed), {}
    for style, params in SHIFTS.items():
        w = [0.0] * len(STYLES)
        w[STYLES.index(style)] = 1.0
        scene = SceneDistribution(style=tuple(w), exclude_pairs=()).sample(n, gen)
        images = tiles_of(render(scene, gen, params=params), 1).to(dev)
        prefix = torch.tensor([prefix_ids(tok, "image", [], model.cfg.cond_length)] * n, device=dev)
        texts = generate(model, tok, images, prefix, 77)
        out[style] = {
            "truth": attribute_accuracy(texts, scene),
            "dialect": attribute_accuracy(texts, scene, sketch_dialect()),
        }
        out[style]["example"] = texts[0]
    model.train()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("src/vlmtune/toy/weights/describer"))
    ap.add_argument("--clip", type=Path, default=None, help="ToyCLIP folder whose image tower is used (default: toy)")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64, help="examples per mode per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=200, help="scenes per style in the final attribute accuracy")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    tok = describer_tokenizer()
    cfg = DescriberConfig(vocab_size=tok.vocab_size, context_length=tok.context_length)
    clip = args.clip or Path(str(resources.files("vlmtune.toy") / "weights"))
    model = ToyDescriber(cfg, load_toy_vision(clip)).to(args.device)
    log.info("ToyDescriber: %d parameters, vocabulary %d", model.n_params(), tok.vocab_size)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    warmup = min(200, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup)))
        ),
    )
    gen, rng = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    weights = {"image": 1.0, "group": 1.0, "class": 0.5, "template": 0.5}
    sizes = {"image": args.batch, "group": args.batch, "class": args.batch // 2, "template": args.batch // 2}
    start = time.time()
    for step in range(args.steps):
        total = torch.zeros((), device=args.device)
        for mode in ("image", "group", "class", "template"):
            images, prefix, texts = batch(mode, sizes[mode], tok, cfg, gen, rng, args.device)
            images = images.to(args.device) if images is not None else None
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):  # bf16 on AMX CPUs and GPUs
                total = total + weights[mode] * loss_of(model, tok, images, prefix.to(args.device), texts)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log.info("step %d loss %.3f (%.0fs)", step + 1, total.item(), time.time() - start)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = evaluate(model, tok, args.device, n=50)
            log.info(
                "shape named/correct %s",
                {s: [round(v["truth"]["shape"][k]) for k in ("named", "correct")] for s, v in acc.items()},
            )
    elapsed = time.time() - start
    accuracy = evaluate(model, tok, args.device, n=args.eval_n)
    for style, acc in accuracy.items():
        log.info(
            "%-7s %s | %s",
            style,
            {a: [round(v["named"]), round(v["correct"])] for a, v in acc["truth"].items()},
            acc["example"],
        )
    state = {k: v.detach().half().cpu().contiguous() for k, v in model.own_state().items()}
    meta = {
        "format": "vlmtune-toydescriber/1",
        "config": cfg.to_dict(),
        "words": tok.vocab,
        "modes": list(MODE_TOKENS),
        "image_tower": {"clip": "toy", "sha256": file_sha256(clip / "toy_clip.safetensors")},
        "provenance": run_provenance(args, elapsed, model.n_params()),
        "attribute_accuracy": accuracy,
    }
    write_weights(args.out, "describer", state, meta)
    log.info("saved to %s in %.0fs", args.out, elapsed)


if __name__ == "__main__":
    main()
