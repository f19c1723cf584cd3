"""The runner: one (method, dataset, shots, seed) job from config to saved results.

It owns what methods must not do: loading the backbone and data, the few-shot pick, feature extraction
through the cache, scoring, progress and logs, and writing the run directory::

    <run>/config.json       resolved configuration (``vlmtune fit --config <run>/config.json`` re-runs it)
    <run>/results.json      scores (acc1, acc5, mean per-class recall), timings, notes, versions, git revision, date
    <run>/results.md        the same as a Markdown table
    <run>/train_log.jsonl   training progress (loss / fitness per epoch or generation); training.png
    <run>/pseudo_labels.jsonl  label-free runs: accuracy / coverage of each pseudo-labelling; pseudo_labels.png
    <run>/adapter/          adapter.safetensors + adapter.json
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmtune._io import atomic_write
from vlmtune.backbones import load_backbone
from vlmtune.backbones.base import Backbone, Capability
from vlmtune.backbones.prefix import Precision, resolve_precision
from vlmtune.blackbox.api import BlackBoxVLM, ImageRefs, QueryBudget, upload_bytes
from vlmtune.blackbox.local import LocalBlackBox
from vlmtune.data import DatasetSplit, base_new_split, few_shot, load_dataset
from vlmtune.data.fewshot import few_shot_indices
from vlmtune.errors import VlmtuneError
from vlmtune.features import FeatureCache, FeatureSet, default_cache_dir, extract_features
from vlmtune.methods.api import Classifier, Method, Task
from vlmtune.methods.blackbox.base import PIXEL_CHUNK, BlackBoxClassifier, image_parts
from vlmtune.methods.registry import get_method, make_config
from vlmtune.metrics import classification_metrics
from vlmtune.pixels.data import ImageSet
from vlmtune.pixels.dist import device_for, init_from_env
from vlmtune.runs.diagnostics import PseudoLabelLog, PseudoLabelReports, write_pseudo_labels
from vlmtune.runs.journal import FileJournal
from vlmtune.runs.provenance import provenance
from vlmtune.runs.report import markdown_table
from vlmtune.runs.textgen import text_cache_for
from vlmtune.runs.training_log import TrainingLog
from vlmtune.settings import ExecSettings, parse_settings
from vlmtune.textgen import DatasetTexts, TextStage
from vlmtune.textgen.backends import model_name

log = logging.getLogger(__name__)
RUN_MARKERS = ("config.json", "results.json", "adapter", "state")


def warn_if_toy_outside_its_world(backbone: str | None, dataset: str) -> None:
    """The toy CLIP knows only its procedural world: on any other dataset say so once, naming a real backbone."""
    spec = backbone or "toy"
    if (spec == "toy" or spec.startswith("toy:")) and not dataset.startswith("toy:"):
        log.warning(
            "the %s backbone knows only the toy world (toy:* datasets); on %s expect chance-level accuracy: "
            "use a real one, e.g. --backbone openclip:ViT-B-32@openai",
            spec,
            dataset,
        )


@dataclass(frozen=True)
class RunConfig(ExecSettings):
    """Everything that determines a run's result.

    Attributes:
        method: registered method name.
        dataset: dataset name (``toy:shapes``, ``caltech101``, ``folder:/path``).
        backbone: backbone spec.
        shots: labelled images per class for training (0 = the whole train split; None = the method's default:
            16, or 0 for label-free methods). Label-free methods: 0 = unsupervised (the train split without its
            labels); k > 0 = semi-supervised (k labelled images per class, the rest of the train split unlabelled).
        seed: seed of the few-shot pick and of the method's generator.
        options: method config overrides (``preset`` picks a named option set).
        subsample: ``all``, ``base`` or ``new`` classes (CoOp's base-to-new rule).
        val_shots: validation images per class for model selection (None = min(shots, 4); 0 = no validation).
        curve_every: for black-box methods, score the current adapter on test every this many queries
            (accuracy-vs-queries curve; test scoring uses a separate box and never feeds back into training).
        query_budget: hard limit of the black box a ``BLACK_BOX`` method trains against (None = unlimited; the
            method plans within it, and a run that meets a limit ends with the adapter so far).
        service: URL of a ``vlmtune serve`` black box to train (and test) a black-box method against instead of a
            local one; the API key comes from ``run(..., api_key=)`` or ``$VLMTUNE_API_KEY``, never the config.
        student: distillation (methods with ``supports_student``, CoFT): the backbone whose image tower the method
            fine-tunes, while ``backbone`` (the teacher) pseudo-labels; the adapter is scored and saved for the
            student.
        unlabeled_fraction: label-free methods: the share of the unlabelled images they get, a random subset drawn
            with ``seed`` (paper 004's data-amount study, Fig. 6: 1%, 20%, 100%).
        (and every ``ExecSettings`` field: device, data_root, skip_corrupt, precisions, textgen).
    """

    method: str = "linear_probe"
    dataset: str = "toy:shapes-sketch"
    backbone: str = "toy"
    shots: int | None = None
    seed: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    subsample: str = "all"
    val_shots: int | None = None
    query_budget: int | None = None
    curve_every: int | None = None
    service: str | None = None
    student: str | None = None
    unlabeled_fraction: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        """From ``config.json`` or a config file: unknown keys and wrong types are errors (``method_config``, which
        a run directory's config.json also holds, is ignored)."""
        return parse_settings(cls, data, "run config", ignore=("method_config",))


@dataclass
class RunResult:
    config: RunConfig
    metrics: dict[str, dict[str, float]]  # split -> acc1 / acc5 / mean per-class recall (%)
    n_train: int
    fit_seconds: float
    classifier: Classifier
    method_config: dict[str, Any] = field(default_factory=dict)
    queries: int | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    shots_used: dict[str, int] | None = None  # smallest and largest number of training images of a class
    notes: list[str] = field(default_factory=list)
    pseudo_labels: list[dict[str, Any]] = field(default_factory=list)  # label-free diagnostics (PseudoLabelLog)

    @property
    def accuracy(self) -> dict[str, float]:
        """split -> top-1 accuracy (%)."""
        return {split: m["acc1"] for split, m in self.metrics.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "method_config": self.method_config,
            "accuracy": self.accuracy,  # acc1, already rounded to 2 decimals
            "metrics": self.metrics,
            "n_train": self.n_train,
            "shots_used": self.shots_used,
            "fit_seconds": round(self.fit_seconds, 3),
            "queries": self.queries,
            "curve": [{"queries": q, "test": round(a, 2)} for q, a in self.curve],
            "notes": self.notes,
            "pseudo_labels": self.pseudo_labels,
            "provenance": provenance(),
        }


class FeatureSource:
    """Backbone + dataset + cache: features of (sub)splits, each extracted once."""

    def __init__(
        self,
        backbone: Backbone,
        cache: FeatureCache | None,
        progress: bool = True,
        patches: bool = False,
        precision: Precision = "fp32",
    ) -> None:
        self.backbone, self.cache, self.progress, self.patches = backbone, cache, progress, patches
        self.precision = precision
        self._encoder: Backbone | None = None  # the copy at ``precision`` (``backbone`` itself at fp32)

    def features(self, split: DatasetSplit) -> FeatureSet:
        if self._encoder is None:  # an encoder without ``cast`` (an LMM scorer) keeps its own dtype
            castable = self.precision != "fp32" and isinstance(self.backbone, Backbone)
            dtype = resolve_precision(self.precision, self.backbone.device) if castable else None
            self._encoder = self.backbone.cast(dtype) if dtype is not None else self.backbone
        return extract_features(self._encoder, split, self.cache, patches=self.patches, progress=self.progress)


def _shot_counts(split: DatasetSplit) -> dict[str, int]:
    counts = np.bincount(split.labels, minlength=split.num_classes)
    return {"min": int(counts.min()), "max": int(counts.max())} if len(counts) else {"min": 0, "max": 0}


def with_shots(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``shots`` resolved (None -> the method's default)."""
    return cfg if cfg.shots is not None else replace(cfg, shots=get_method(cfg.method).default_shots)


def _train_of(splits: dict[str, DatasetSplit], cfg: RunConfig) -> DatasetSplit:
    if "train" not in splits:
        root = splits["test"].dataset.removeprefix("folder:")
        raise VlmtuneError(
            f"{splits['test'].dataset} has no train split; this method trains on (labelled or unlabelled) images "
            f"(image folders: put them in {root}/train/<class>/, and test images in {root}/test/<class>/)"
        )
    return base_new_split(splits["train"], cfg.subsample)


def train_split_for(splits: dict[str, DatasetSplit], cfg: RunConfig) -> DatasetSplit:
    """The training samples of a run: the class subsample, then ``cfg.shots`` per class picked with ``cfg.seed``."""
    cfg = with_shots(cfg)
    split = _train_of(splits, cfg)
    if not split.labelled:
        raise VlmtuneError(
            f"the train images of {split.dataset} are unlabelled: {cfg.method} needs labels "
            "(label-free methods: `vlmtune list methods`)"
        )
    assert cfg.shots is not None
    if cfg.shots <= 0:
        return split
    picked = few_shot(split, cfg.shots, cfg.seed)
    counts = np.bincount(picked.labels, minlength=picked.num_classes)
    if counts.min() < cfg.shots:
        log.warning(
            "--shots %d: %d of %d classes have fewer training images (the smallest %d); they give all they have",
            cfg.shots,
            int((counts < cfg.shots).sum()),
            picked.num_classes,
            int(counts.min()),
        )
    return picked


def label_free_splits(splits: dict[str, DatasetSplit], cfg: RunConfig) -> tuple[DatasetSplit | None, DatasetSplit]:
    """(labelled shots or None, unlabelled rest) of the train split: unsupervised with ``shots`` 0, else
    semi-supervised (``shots`` labelled images per class picked with ``seed``; every other train image unlabelled)."""
    cfg = with_shots(cfg)
    split = _train_of(splits, cfg)
    if not cfg.shots:
        return None, _fraction_of(split, cfg)
    if not split.labelled:
        raise VlmtuneError(f"--shots {cfg.shots} takes labelled train images; those of {split.dataset} are unlabelled")
    picked = few_shot_indices(split.labels, cfg.shots, cfg.seed)
    rest = np.setdiff1d(np.arange(len(split)), picked)
    labelled = split.subset(picked, split=f"{split.split}@{cfg.shots}shot-seed{cfg.seed}")
    return labelled, _fraction_of(
        split.subset(rest, split=f"{split.split}@unlabelled-{cfg.shots}shot-seed{cfg.seed}"), cfg
    )


def _fraction_of(split: DatasetSplit, cfg: RunConfig) -> DatasetSplit:
    """A random ``cfg.unlabeled_fraction`` of ``split`` (at least one image), drawn with ``cfg.seed``, labels unseen."""
    if cfg.unlabeled_fraction >= 1:
        return split
    n = max(1, round(len(split) * cfg.unlabeled_fraction))
    picked = np.sort(np.random.default_rng(cfg.seed).choice(len(split), n, replace=False))
    return split.subset(picked, split=f"{split.split}@{cfg.unlabeled_fraction:g}-seed{cfg.seed}")


def make_task(
    splits: dict[str, DatasetSplit], source: FeatureSource, cfg: RunConfig, method: Method | None = None
) -> tuple[Task, DatasetSplit | None]:
    """The method's ``Task``. Label-free methods get the unlabelled images with their labels removed (and the
    labelled shots of the semi-supervised regime in ``train``). Returns the training split too: the labelled one,
    the unlabelled one for label-free methods, None for methods that fit from class names alone. ``method``: the
    configured instance that will fit (built from ``cfg`` if not given), asked whether it trains on pixels."""
    cfg = with_shots(cfg)
    assert cfg.shots is not None
    if method is None:
        method = get_method(cfg.method)(make_config(get_method(cfg.method), cfg.options))
    if not method.needs_train:  # class names alone; the text stage without images (LMM zero-shot: per test image)
        names = base_new_split(splits.get("train", splits["test"]), cfg.subsample)
        texts = _texts(cfg, source, names.subset([], split="no-images"))
        return Task(classnames=names.classnames, templates=names.templates, texts=texts), None
    val_shots = min(cfg.shots, 4) if cfg.val_shots is None else cfg.val_shots
    val = None
    if "val" in splits and val_shots != 0 and splits["val"] is not splits.get("test"):
        val_split = base_new_split(splits["val"], cfg.subsample)
        val = source.features(few_shot(val_split, val_shots, cfg.seed) if val_shots > 0 else val_split)
    pixels = method.wants_images()
    if not method.needs_labels:
        labelled, stored = label_free_splits(splits, cfg)
        order = shuffled_order(len(stored), cfg.seed)  # datasets list their images by class: never hand that order
        unlabeled = stored.subset(order)
        task = Task(
            classnames=unlabeled.classnames,
            templates=unlabeled.templates,
            train=source.features(labelled) if labelled is not None else None,
            val=val,
            unlabeled=source.features(stored).select(torch.as_tensor(order)).without_labels(),  # cached unshuffled
            images=ImageSet.unlabelled(unlabeled) if pixels else None,
            train_images=ImageSet.labelled(labelled) if pixels and labelled is not None else None,
            texts=_texts(cfg, source, unlabeled),
        )
        return task, unlabeled
    train_split = train_split_for(splits, cfg)
    train = source.features(train_split)
    train_images = ImageSet.labelled(train_split) if pixels else None
    texts = _texts(cfg, source, train_split)
    task = Task(train_split.classnames, train_split.templates, train, val, train_images=train_images, texts=texts)
    return task, train_split


def _texts(cfg: RunConfig, source: FeatureSource, split: DatasetSplit) -> DatasetTexts:
    """The text-generation stage over the training images (labels removed; the backend loads on the first text a
    method asks for that is not in the cache beside the feature cache)."""
    cache = text_cache_for(source.cache)
    stage = TextStage(
        cfg.textgen,
        cfg.textgen_model,
        cache,
        endpoint=cfg.textgen_endpoint,
        device=cfg.device,
        progress=source.progress,
    )
    return DatasetTexts(stage, split)


def split_logits(
    classifier: Classifier,
    backbone: Backbone | None,
    split: DatasetSplit,
    source: FeatureSource | None,
    progress: bool,
    box: BlackBoxVLM | None = None,
    box_precision: Precision = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of any adapter on ``split``: black-box adapters through ``box`` (default: a fresh,
    unmetered local box at ``box_precision``), the others from (cached) features."""
    if isinstance(classifier, BlackBoxClassifier):
        if box is None:
            assert backbone is not None
            box = LocalBlackBox(backbone, precision=box_precision, **classifier.box_options())
        bind_client_encoder(classifier, backbone.device if backbone is not None else "cpu")
        refs = upload_split(box, split, progress)
        return classifier.predict_blackbox(box, refs), refs.labels
    assert backbone is not None
    patches = bool(getattr(classifier, "needs_patches", False))
    encoder = classifier.image_encoder(backbone)  # a tuned tower: its own features, under its own fingerprint
    if source is None or (patches and not source.patches) or source.backbone is not encoder:
        precision = source.precision if source else "fp32"
        source = FeatureSource(encoder, source.cache if source else None, progress, patches, precision)
    data = source.features(split)
    return classifier.bind(backbone).score(data), data.labels


def score_split(
    classifier: Classifier,
    backbone: Backbone,
    split: DatasetSplit,
    source: FeatureSource | None,
    progress: bool,
    box_precision: Precision = "fp32",
) -> float:
    """Top-1 test accuracy (%) of any adapter on ``split``."""
    logits = split_logits(classifier, backbone, split, source, progress, box_precision=box_precision)
    return classification_metrics(*logits)["acc1"]


def prepare_run_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one: an existing run is replaced only with ``overwrite`` (whole)."""
    if resume or not folder.exists() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        return
    if not any((folder / m).exists() for m in RUN_MARKERS):
        raise VlmtuneError(f"{folder} is not empty and is not a vlmtune run directory: choose another --out")
    if not overwrite:
        raise VlmtuneError(
            f"{folder} already holds a run: --overwrite replaces it (black-box runs: --resume continues)"
        )
    shutil.rmtree(folder)
    folder.mkdir(parents=True)


def run(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    cache: FeatureCache | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    splits: dict[str, DatasetSplit] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    api_key: str | None = None,
) -> RunResult:
    """Fit ``cfg.method`` and score it on the test split (of the same class subsample).

    Options are validated before anything is loaded. With ``out_dir``, black-box runs keep a journal in
    ``<out_dir>/state``; ``resume=True`` continues a run that was stopped and ends with the result an
    uninterrupted run would have given.
    """
    method_cls = get_method(cfg.method)
    method_config = make_config(method_cls, cfg.options)
    cfg = with_shots(cfg)
    assert cfg.shots is not None
    if cfg.shots < 0:
        raise VlmtuneError(f"--shots must be >= 0 (0 = the whole train split), got {cfg.shots}")
    if not 0 < cfg.unlabeled_fraction <= 1:
        raise VlmtuneError(f"--unlabeled-fraction must be in (0, 1], got {cfg.unlabeled_fraction}")
    if cfg.unlabeled_fraction < 1 and method_cls.needs_labels:
        raise VlmtuneError(f"--unlabeled-fraction is for label-free methods; {cfg.method} trains on labels")
    model_name(cfg.textgen, cfg.textgen_model)  # a bad text-generation backend fails before anything loads
    if cfg.service and method_cls.capability is not Capability.BLACK_BOX:
        raise VlmtuneError(f"--service trains black-box methods only; {cfg.method} needs the model itself")
    processes = init_from_env(cfg.device)
    if processes.active:  # under torchrun: every process runs the job, rank 0 writes and reports
        if method_cls.capability is Capability.BLACK_BOX:
            raise VlmtuneError("black-box methods run in one process (torchrun is for white-box / label-free methods)")
        if processes.rank != 0:
            out_dir, progress, cache = None, False, None  # one writer: rank 0 (the others recompute features)
    folder = Path(out_dir) if out_dir is not None else None
    created = folder is not None and not folder.exists()
    if folder is not None:
        prepare_run_dir(folder, resume, overwrite)
    try:
        if cfg.service is None:
            if backbone is None:
                warn_if_toy_outside_its_world(cfg.backbone, cfg.dataset)
            backbone = backbone or load_backbone(cfg.backbone, device_for(cfg.device))
        splits = splits or load_dataset(cfg.dataset, cfg.data_root, cfg.skip_corrupt)
        if "test" not in splits:
            raise VlmtuneError(f"{cfg.dataset} has no test split")
        method = method_cls(method_config)
        training_log = TrainingLog(folder, progress, f"{cfg.method} on {cfg.dataset}")
        method.hooks.on_step = training_log.step
        generator = torch.Generator().manual_seed(cfg.seed)
        try:
            if method_cls.capability is Capability.BLACK_BOX:
                journal = FileJournal(folder / "state", cfg.to_json(), resume) if folder is not None else None
                result = _run_black_box(cfg, backbone, splits, method, generator, progress, journal, api_key)
            else:
                assert backbone is not None
                student = _student_of(cfg, method_cls, backbone)
                result = _run_features(cfg, backbone, splits, method, generator, cache, progress, student)
        finally:
            training_log.close()
        result.method_config = asdict(method_config)
        result.notes = list(method.hooks.notes)
        if processes.active:
            result.notes.append(f"trained on {processes.world} processes (torchrun; DDP over {processes.world} shards)")
        if folder is not None:
            write_run_dir(folder, result)
    except BaseException:
        if created:
            _remove_if_empty(folder)  # a run that failed before writing anything leaves no folder behind
        raise
    return result


def _remove_if_empty(folder: Path | None) -> None:
    """Remove ``folder`` if none of its files holds a byte (an empty train log, empty folders)."""
    if folder is not None and all(p.is_dir() or p.stat().st_size == 0 for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _client_encoder(spec: str | None, backbone: Backbone | None, cfg: RunConfig) -> Backbone | None:
    """A black-box method's client-side encoder (``Method.wants_encoder``): None, the run's own backbone object
    for ``""`` (a backbone passed to ``run`` is used as it is, never re-loaded from its spec), or ``spec`` loaded."""
    if spec is None:
        return None
    if spec == "" and backbone is not None:
        return backbone
    return load_backbone(spec or cfg.backbone, device_for(cfg.device))


def _student_of(cfg: RunConfig, method_cls: type[Method], teacher: Backbone) -> Backbone | None:
    """The student backbone of a distillation run (``cfg.student``), or None."""
    if cfg.student is None:
        return None
    if not method_cls.supports_student:
        raise VlmtuneError(f"{cfg.method} does not distil: --student works with methods such as coft and coft_plus")
    return load_backbone(cfg.student, str(teacher.device))


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """The order (n,) in which a label-free method gets its unlabelled images: a permutation drawn with the run's
    seed (its own stream, so the method's generator draws what it would draw anyway)."""
    return np.random.default_rng([seed, 0x5EA1]).permutation(n)


def _run_features(
    cfg: RunConfig,
    backbone: Backbone,
    splits: dict[str, DatasetSplit],
    method: Method,
    generator: torch.Generator,
    cache: FeatureCache | None,
    progress: bool,
    student: Backbone | None = None,
) -> RunResult:
    source = FeatureSource(backbone, cache, progress, patches=method.needs_patches, precision=cfg.feature_precision)
    task, train_split = make_task(splits, source, cfg, method)
    task = replace(task, student=student)
    reports = PseudoLabelReports()  # a plain recorder: nothing in reach of the method holds the hidden labels
    method.hooks.on_pseudo_labels = reports.record
    start = time.perf_counter()
    classifier = method.fit(backbone, task, generator=generator)
    fit_seconds = time.perf_counter() - start
    method.hooks.on_pseudo_labels = None
    test = base_new_split(splits["test"], cfg.subsample)
    metrics = classification_metrics(*split_logits(classifier, student or backbone, test, source, progress))
    n_train = len(train_split) if train_split is not None else 0
    if task.unlabeled is not None and isinstance(task.train, FeatureSet):
        n_train += len(task.train)
    shots = _shot_counts(train_split) if train_split is not None and task.unlabeled is None else None
    result = RunResult(cfg, {"test": metrics}, n_train, fit_seconds, classifier, shots_used=shots)
    if task.unlabeled is not None and train_split is not None and reports.reports:  # scored after fit returned
        hidden = torch.as_tensor(train_split.labels, dtype=torch.long)
        result.pseudo_labels = PseudoLabelLog(hidden, train_split.num_classes).score(reports)
    return result


def bind_client_encoder(classifier: BlackBoxClassifier, device: Any) -> None:
    """Load and attach the client-side image encoder a black-box adapter computes its prompts with (BlackVIP)."""
    if classifier.encoder_spec is not None and not classifier.encoder_bound:
        classifier.bind_encoder(load_backbone(classifier.encoder_spec, device_for(str(device))))


@dataclass(frozen=True)
class SplitImages:
    """A split's images by index (PIL): the client's own copies beside the uploaded ids (``ImageRefs.images``)."""

    split: DatasetSplit

    def __getitem__(self, i: int) -> Any:
        return self.split.image(i)

    def __len__(self) -> int:
        return len(self.split)


def upload_split(box: BlackBoxVLM, split: DatasetSplit, progress: bool) -> ImageRefs:
    """Upload a split's images to a black box (the files' own bytes where the format is accepted, else PNG); the
    refs keep the split's images for methods that prompt each image on the client."""
    reading = tqdm(range(len(split)), desc=f"reading {split.dataset}/{split.split}", disable=not progress, leave=False)
    data = [upload_bytes(split.file_path(i), functools.partial(split.image, i)) for i in reading]
    ids: list[str] = []
    for start in tqdm(range(0, len(data), 256), desc="uploading", unit="batch", disable=not progress, leave=False):
        ids += box.upload(data[start : start + 256])
    return ImageRefs(ids, torch.as_tensor(split.labels, dtype=torch.long), SplitImages(split))


class _Reserved:
    """A service box whose reported budget keeps ``reserve`` queries back (for the final test scoring), so a
    method that plans within the key's limit leaves room to score what it learned."""

    def __init__(self, box: BlackBoxVLM, reserve: int) -> None:
        self.box, self.reserve = box, reserve

    def info(self) -> Any:
        return self.box.info()

    def upload(self, images: list[bytes]) -> list[str]:
        return self.box.upload(images)

    def predict(self, request: Any) -> Any:
        return self.box.predict(request)

    def usage(self) -> Any:
        u = self.box.usage()
        return replace(u, limit=None if u.limit is None else max(0, u.limit - self.reserve))


def _scoring_queries(box: BlackBoxVLM, split: DatasetSplit, pixel_prompts: bool = False) -> int:
    """Queries the client needs to score ``split`` once (it splits by images where needed): without a context,
    or (``pixel_prompts``: BlackVIP) with one pixel prompt per image, sent ``PIXEL_CHUNK`` images at a time."""
    if pixel_prompts and hasattr(box, "pixel_images_per_request"):
        step = box.pixel_images_per_request(split.classnames)
        return -(-len(split) // PIXEL_CHUNK) * -(-min(PIXEL_CHUNK, len(split)) // step)
    return image_parts(box, len(split), max(1, split.num_classes))


def _run_black_box(
    cfg: RunConfig,
    backbone: Backbone | None,
    splits: dict[str, DatasetSplit],
    method: Any,
    generator: torch.Generator,
    progress: bool,
    journal: FileJournal | None,
    api_key: str | None,
) -> RunResult:
    """A black-box method sees only a box: a local one (test scored through a separate, unmetered box) or the
    service at ``cfg.service`` (test scored through it as well: one query per request)."""
    train_split = train_split_for(splits, cfg)
    test_split = base_new_split(splits["test"], cfg.subsample)
    box_options = method.box_options()
    if cfg.service is not None:
        from vlmtune.blackbox.client import HttpBlackBox

        if cfg.curve_every:
            raise VlmtuneError("--curve-every is not available with --service (every test scoring would be charged)")
        eval_box: BlackBoxVLM = HttpBlackBox(cfg.service, api_key or os.environ.get("VLMTUNE_API_KEY", ""))
        reserve = _scoring_queries(eval_box, test_split, bool(box_options.get("pixel_prompts")))
        box: BlackBoxVLM = _Reserved(eval_box, reserve)
    else:
        assert backbone is not None
        used = journal.queries if journal else 0
        served = backbone.cast(resolve_precision(cfg.box_precision, backbone.device))  # one copy for both boxes
        box = LocalBlackBox(served, QueryBudget(cfg.query_budget, used=used), **box_options)
        eval_box = LocalBlackBox(served, **box_options)  # unmetered, separate from the training box
    method.hooks.journal = journal
    encoder = method.wants_encoder()
    if encoder == "" and cfg.service is not None:
        raise VlmtuneError(f"{cfg.method} over --service needs its client-side encoder named: --set encoder=SPEC")
    task = Task(
        train_split.classnames,
        train_split.templates,
        train=upload_split(box, train_split, progress),
        encoder=_client_encoder(encoder, backbone, cfg),
    )
    test = upload_split(eval_box, test_split, progress)
    curve: list[tuple[int, float]] = []
    if cfg.curve_every:
        method.hooks.monitor_every = cfg.curve_every
        method.hooks.monitor = lambda used, clf: curve.append(
            (used, classification_metrics(clf.predict_blackbox(eval_box, test), test.labels)["acc1"])
        )
    replayed = journal.queries if journal is not None else 0  # spent before a resume, replayed without queries
    used_before = box.usage().used
    start = time.perf_counter()
    classifier = method.fit(box, task, generator=generator)
    fit_seconds = time.perf_counter() - start
    queries = box.usage().used - used_before + replayed
    if journal is not None:
        journal.flush()
    metrics = classification_metrics(classifier.predict_blackbox(eval_box, test), test.labels)
    shots = _shot_counts(train_split)
    return RunResult(cfg, {"test": metrics}, len(train_split), fit_seconds, classifier, {}, queries, curve, shots)


def write_run_dir(folder: Path, result: RunResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = result.config

    def write_json(name: str, data: Any) -> None:
        atomic_write(folder / name, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))

    # The adapter first and results.json last: a run directory with results.json is complete (a full disk used
    # to leave results.json beside no adapter).
    spec = cfg.student or cfg.backbone  # a distilled adapter runs on the student
    result.classifier.save(folder / "adapter", backbone=spec, dataset=cfg.dataset, service=cfg.service)
    write_json("config.json", {**cfg.to_json(), "method_config": result.method_config})
    m = result.metrics.get("test", {})
    table = markdown_table(
        ["method", "dataset", "backbone", "shots", "seed", "acc1 (%)", "acc5 (%)", "mean recall (%)", "fit (s)"],
        [
            [
                cfg.method,
                cfg.dataset,
                cfg.service or cfg.backbone,
                cfg.shots,
                cfg.seed,
                result.accuracy["test"],
                m.get("acc5", "-"),
                m.get("mean_per_class_recall", "-"),
                result.fit_seconds,
            ]
        ],
    )
    notes = "".join(f"\n- {n}" for n in result.notes)
    atomic_write(
        folder / "results.md", lambda tmp: Path(tmp).write_text(table + "\n" + notes + ("\n" if notes else ""))
    )
    if result.pseudo_labels:
        write_pseudo_labels(
            folder,
            result.pseudo_labels,
            f"{cfg.method} on {cfg.dataset}: pseudo-labels (measured against hidden labels)",
        )
    if result.curve:
        from vlmtune.runs.plots import write_curve

        write_curve(folder, result.curve, f"{cfg.method} on {cfg.dataset}, {cfg.shots}-shot, seed {cfg.seed}")
    write_json("results.json", result.to_json())


def open_cache(path: str | Path | None, enabled: bool = True) -> FeatureCache | None:
    return FeatureCache(path or default_cache_dir()) if enabled else None
