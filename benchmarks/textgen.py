"""Text generation: the toy describer's attribute accuracy per rendering style, and throughput per backend.

    python benchmarks/textgen.py [--n 500] [--device cpu] [--llava FOLDER_OR_HUB_ID]

Accuracy: greedy image descriptions of freshly rendered scenes (ground truth known) under each toy shift; per
attribute, how often a description names it and how often the named value is right (shapes of sketches also
against the sketch dialect's names, the caption corpus' convention). Throughput: descriptions per second through
the stage (cache in memory) for the toy backend (images, 2x2 group collages, templates), the transformers backend
(a tiny random-init LLaVA built here, or --llava), and the openai backend against the toy describer served on
loopback. All figures of one run, on this machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmtune.data import load_dataset
from vlmtune.textgen import DatasetTexts, GenSettings, TextStage
from vlmtune.textgen.backends.toy import ToyBackend
from vlmtune.toy.train_describer import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="scenes per style for the accuracy table")
    ap.add_argument("--images", type=int, default=256, help="images described per throughput figure")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--llava", default=None, help="a real LLaVA (hub id in the cache, or folder) instead of the tiny one"
    )
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    toy = ToyBackend(device=args.device)
    print(f"toy describer: {toy.net.n_params():,} parameters, revision {toy.revision}, device {args.device}\n")
    acc = evaluate(toy.net, toy.tokenizer, args.device, n=args.n)
    attrs = list(acc["photo"]["truth"])
    print("| style | " + " | ".join(f"{a}: named / correct" for a in attrs) + " | shape vs dialect |")
    print("|---" * (len(attrs) + 2) + "|")
    for style, row in acc.items():
        cells = [f"{row['truth'][a]['named']:.0f} / {row['truth'][a]['correct']:.0f}" for a in attrs]
        print(f"| {style} | " + " | ".join(cells) + f" | {row['dialect']['shape']['correct']:.0f} |")
    print()

    split = load_dataset("toy:shapes-noisy-pool")["train"]
    split = split.subset(range(min(args.images, len(split))))
    labels = np.arange(len(split)) % split.num_classes

    def stage(backend: str, model: str | None = None, **kw) -> DatasetTexts:
        return DatasetTexts(TextStage(backend, model, progress=False, **kw), split)

    rows = []
    t = stage("toy", device=args.device, _generator=toy)
    t.image_hashes()
    rows.append(("toy", "image descriptions", rate(t.image_descriptions, len(split))))
    rows.append(("toy", "group descriptions (2x2 collages)", rate(lambda: t.group_descriptions(labels), len(split))))
    rows.append(("toy", "templates (sampled)", rate(lambda: t.templates(64), 64)))

    from test_textgen import build_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        model = args.llava or str(build_tiny_llava(Path(tmp) / "tiny-llava"))
        hf = stage("transformers", model, device=args.device, settings=GenSettings(max_new_tokens=20))
        hf.stage.generator  # noqa: B018 (load outside the timing)
        name = "transformers" + ("" if args.llava else " (tiny random-init LLaVA, 20 tokens)")
        rows.append((name, "image descriptions", rate(hf.image_descriptions, len(split))))

    from conftest import running_server
    from vlmtune.textgen.serve import chat_app

    with running_server(chat_app(toy)) as url:
        api = stage("openai", "toy-describer", endpoint=f"{url}/v1")
        rows.append(
            ("openai -> toy describer on loopback", "image descriptions", rate(api.image_descriptions, len(split)))
        )

    print("| backend | texts | per second |\n|---|---|---|")
    for backend, what, r in rows:
        print(f"| {backend} | {what} | {r:.1f} |")


if __name__ == "__main__":
    main()
