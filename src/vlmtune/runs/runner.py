"""The runner: one (method, dataset, shots, seed) job from config to saved results.

It owns what methods must not do: loading the backbone and data, the few-shot pick, feature extraction
through the cache, scoring, and writing the run directory::

    <run>/config.json     resolved configuration
    <run>/results.json    scores and timings
    <run>/results.md      the same as a Markdown table
    <run>/adapter/        adapter.safetensors + adapter.json
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmtune.backbones import load_backbone
from vlmtune.backbones.base import Backbone, Capability
from vlmtune.blackbox.api import BlackBoxVLM, ImageRefs, QueryBudget, image_bytes
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.data import DatasetSplit, base_new_split, few_shot, load_dataset
from vlmtune.features import FeatureCache, FeatureSet, default_cache_dir, extract_features
from vlmtune.methods._blackbox import BlackBoxClassifier
from vlmtune.methods.base import Classifier, Task, get_method, make_config
from vlmtune.metrics import accuracy
from vlmtune.runs.journal import FileJournal
from vlmtune.runs.report import markdown_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result.

    Attributes:
        method: registered method name.
        dataset: dataset name (``toy:shapes``, ``caltech101``, ``folder:/path``).
        backbone: backbone spec.
        shots: labelled images per class for training (0 = the whole train split).
        seed: seed of the few-shot pick and of the method's generator.
        options: method config overrides.
        subsample: ``all``, ``base`` or ``new`` classes (CoOp's base-to-new rule).
        val_shots: validation images per class for model selection (None = min(shots, 4); 0 = no validation).
        data_root: folder holding the real datasets (None = ``$VLMTUNE_DATA`` or ``./data``).
        device: torch device for the backbone.
        skip_corrupt: drop unreadable images (each logged) instead of failing on the first one.
        curve_every: for black-box methods, score the current adapter on test every this many queries
            (accuracy-vs-queries curve; test scoring uses a separate box and never feeds back into training).
        query_budget: hard limit of the black box a ``BLACK_BOX`` method trains against (None = unlimited; the
            method keeps to its own budget either way, and the queries used are reported).
    """

    method: str = "linear_probe"
    dataset: str = "toy:shapes-sketch"
    backbone: str = "toy"
    shots: int = 16
    seed: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    subsample: str = "all"
    val_shots: int | None = None
    data_root: str | None = None
    device: str = "cpu"
    skip_corrupt: bool = False
    query_budget: int | None = None
    curve_every: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    config: RunConfig
    accuracy: dict[str, float]
    n_train: int
    fit_seconds: float
    classifier: Classifier
    method_config: dict[str, Any]
    queries: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "method_config": self.method_config,
            "accuracy": self.accuracy,
            "n_train": self.n_train,
            "fit_seconds": round(self.fit_seconds, 3),
            "queries": self.queries,
            "curve": [{"queries": q, "test": a} for q, a in self.curve],
        }


class FeatureSource:
    """Backbone + dataset + cache: features of (sub)splits, each extracted once."""

    def __init__(
        self, backbone: Backbone, cache: FeatureCache | None, progress: bool = True, patches: bool = False
    ) -> None:
        self.backbone, self.cache, self.progress, self.patches = backbone, cache, progress, patches

    def features(self, split: DatasetSplit) -> FeatureSet:
        return extract_features(self.backbone, split, self.cache, patches=self.patches, progress=self.progress)


def train_split_for(splits: dict[str, DatasetSplit], cfg: RunConfig) -> DatasetSplit:
    """The training samples of a run: the class subsample, then ``cfg.shots`` per class picked with ``cfg.seed``."""
    split = base_new_split(splits["train"], cfg.subsample)
    return few_shot(split, cfg.shots, cfg.seed) if cfg.shots > 0 else split


def make_task(splits: dict[str, DatasetSplit], source: FeatureSource, cfg: RunConfig) -> tuple[Task, int]:
    train_split = train_split_for(splits, cfg)
    val_shots = min(cfg.shots, 4) if cfg.val_shots is None else cfg.val_shots
    val = None
    if "val" in splits and val_shots != 0 and splits["val"] is not splits.get("test"):
        val_split = base_new_split(splits["val"], cfg.subsample)
        val = source.features(few_shot(val_split, val_shots, cfg.seed) if val_shots > 0 else val_split)
    method = get_method(cfg.method)
    train = source.features(train_split)
    task = Task(
        classnames=train_split.classnames,
        templates=train_split.templates,
        train=train if method.needs_labels else None,
        val=val,
        unlabeled=None if method.needs_labels else train,
    )
    return task, len(train_split)


def evaluate(classifier: Classifier, features: FeatureSet) -> float:
    return accuracy(classifier.score(features), features.labels)


def score_split(
    classifier: Classifier, backbone: Backbone, split: DatasetSplit, source: FeatureSource | None, progress: bool
) -> float:
    """Test accuracy of any adapter on ``split``: black-box adapters through a fresh, unmetered box."""
    if isinstance(classifier, BlackBoxClassifier):
        box = LocalBlackBox(backbone)
        refs = upload_split(box, split, progress)
        return accuracy(classifier.predict_blackbox(box, refs), refs.labels)
    patches = bool(getattr(classifier, "needs_patches", False))
    if source is None or (patches and not source.patches):
        source = FeatureSource(backbone, source.cache if source else None, progress, patches)
    return evaluate(classifier.bind(backbone), source.features(split))


def run(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    splits: dict[str, DatasetSplit] | None = None,
    resume: bool = False,
) -> RunResult:
    """Fit ``cfg.method`` and score it on the test split (of the same class subsample).

    With ``out_dir``, black-box runs keep a journal in ``<out_dir>/state``; ``resume=True`` continues a run
    that was stopped and ends with the result an uninterrupted run would have given.
    """
    backbone = backbone or load_backbone(cfg.backbone, cfg.device)
    splits = splits or load_dataset(cfg.dataset, cfg.data_root, cfg.skip_corrupt)
    method_cls = get_method(cfg.method)
    method_config = make_config(method_cls, cfg.options)
    generator = torch.Generator().manual_seed(cfg.seed)
    if method_cls.capability is Capability.BLACK_BOX:
        journal = FileJournal(Path(out_dir) / "state", cfg.to_json(), resume) if out_dir is not None else None
        result = _run_black_box(cfg, backbone, splits, method_cls(method_config), generator, progress, journal)
    else:
        source = FeatureSource(backbone, cache, progress, patches=method_cls.needs_patches)
        task, n_train = make_task(splits, source, cfg)
        start = time.perf_counter()
        classifier = method_cls(method_config).fit(backbone, task, generator=generator)
        fit_seconds = time.perf_counter() - start
        test_acc = score_split(classifier, backbone, base_new_split(splits["test"], cfg.subsample), source, progress)
        result = RunResult(cfg, {"test": test_acc}, n_train, fit_seconds, classifier, {})
    result.method_config = asdict(method_config)
    if out_dir is not None:
        write_run_dir(Path(out_dir), result)
    return result


def upload_split(box: BlackBoxVLM, split: DatasetSplit, progress: bool) -> ImageRefs:
    """Upload a split's images to a black box (as PNG bytes) -> ids + labels."""
    ids: list[str] = []
    for start in tqdm(
        range(0, len(split), 256),
        desc=f"uploading {split.dataset}/{split.split}",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        ids += box.upload([image_bytes(split.image(i)) for i in range(start, min(start + 256, len(split)))])
    return ImageRefs(ids, torch.as_tensor(split.labels, dtype=torch.long))


def _run_black_box(
    cfg: RunConfig,
    backbone: Backbone,
    splits: dict[str, DatasetSplit],
    method: Any,
    generator: torch.Generator,
    progress: bool,
    journal: FileJournal | None = None,
) -> RunResult:
    """A black-box method sees only a ``LocalBlackBox``; test scoring uses a separate, unmetered box."""
    train_split = train_split_for(splits, cfg)
    box_options = method.box_options()
    box = LocalBlackBox(backbone, QueryBudget(cfg.query_budget, used=journal.queries if journal else 0), **box_options)
    method.hooks.journal = journal
    task = Task(train_split.classnames, train_split.templates, train=upload_split(box, train_split, progress))
    eval_box = LocalBlackBox(backbone, **box_options)  # unmetered, separate from the training box
    test = upload_split(eval_box, base_new_split(splits["test"], cfg.subsample), progress)
    curve: list[tuple[int, float]] = []
    if cfg.curve_every:
        method.hooks.monitor_every = cfg.curve_every
        method.hooks.monitor = lambda used, clf: curve.append(
            (used, accuracy(clf.predict_blackbox(eval_box, test), test.labels))
        )
    start = time.perf_counter()
    classifier = method.fit(box, task, generator=generator)
    fit_seconds = time.perf_counter() - start
    if journal is not None:
        journal.flush()
    acc = accuracy(classifier.predict_blackbox(eval_box, test), test.labels)
    return RunResult(cfg, {"test": acc}, len(train_split), fit_seconds, classifier, {}, box.usage().used, curve)


def write_run_dir(folder: Path, result: RunResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    (folder / "config.json").write_text(json.dumps({**cfg.to_json(), "method_config": result.method_config}, indent=1))
    (folder / "results.json").write_text(json.dumps(result.to_json(), indent=1))
    table = markdown_table(
        ["method", "dataset", "backbone", "shots", "seed", "test acc (%)", "fit (s)"],
        [[cfg.method, cfg.dataset, cfg.backbone, cfg.shots, cfg.seed, result.accuracy["test"], result.fit_seconds]],
    )
    (folder / "results.md").write_text(table + "\n")
    result.classifier.save(folder / "adapter", backbone=cfg.backbone, dataset=cfg.dataset)
    if result.curve:
        from vlmtune.runs.plots import write_curve

        write_curve(folder, result.curve, f"{cfg.method} on {cfg.dataset}, {cfg.shots}-shot, seed {cfg.seed}")


def open_cache(path: str | Path | None, enabled: bool = True) -> FeatureCache | None:
    return FeatureCache(path or default_cache_dir()) if enabled else None
