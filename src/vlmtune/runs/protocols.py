"""Evaluation protocols of the papers as runners over any registered method (all through ``runner.run``).

- ``few_shot_sweep``: shots x seeds, test accuracy (TMM Table 2, CoOp's curves);
- ``base_to_new``: train on the base half of the classes, test on base and on new classes, harmonic mean (Table 1);
- ``transfer``: train on a source dataset, test on targets: other datasets (cross-dataset, Table 3) or the
  source's shifted variants with the same classes (domain generalisation, Table 4);
- ``unsupervised``: label-free methods on the train split without its labels -> test accuracy, with the
  runner-measured accuracy of the final pseudo-labels, beside paper 003's Table 1;
- ``data_amount``: the same on 1%, 20% and 100% of the unlabelled images (paper 004 Fig. 6);
- ``semi_supervised``: k labelled shots per class plus the rest of the train split unlabelled (paper 003 Fig. 2);
- ``noisy_labels``: the train split with noisy labels: label-free methods ignore them, supervised ones train on
  them (paper 003 Table 2);
- ``distill``: Phase I on a teacher backbone, Phase II fine-tunes a student (paper 003 Table 3).

Model selection happens inside ``run`` on validation shots only; test splits are only scored. Each protocol
returns a ``ProtocolResult`` (rows of per-seed numbers) that writes JSON, CSV, a Markdown table of mean ± std and,
for sweeps, a plot of accuracy vs shots.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmtune.backbones import load_backbone
from vlmtune.backbones.base import Backbone
from vlmtune.capabilities import Capability
from vlmtune.data import load_dataset
from vlmtune.data.base import DatasetSplit
from vlmtune.data.fewshot import base_new_split
from vlmtune.data.noisy import NOISY_SEP, noise_rate
from vlmtune.features.cache import FeatureCache
from vlmtune.methods.options import EXECUTION_OPTIONS
from vlmtune.methods.registry import get_method, make_config
from vlmtune.metrics import harmonic_mean
from vlmtune.runs.executors import run_on_engine
from vlmtune.runs.paper_tables import paper_003, paper_003_table2, paper_003_table3, paper_004
from vlmtune.runs.plots import pyplot
from vlmtune.runs.report import fmt_mean_std, markdown_table
from vlmtune.runs.runner import FeatureSource, RunConfig, run, score_split
from vlmtune.settings import ExecSettings, exec_of

log = logging.getLogger(__name__)
Options = dict[str, dict[str, Any]]  # method (or variant label) -> its options


@dataclass
class ProtocolResult:
    """Per-seed results: one row per (method, setting, seed) with named metrics (accuracies in %)."""

    protocol: str
    columns: list[str]  # metric names, in table order
    rows: list[dict[str, Any]] = field(default_factory=list)
    # the papers' numbers in last columns: column title -> {method (or "method|setting"): number}
    references: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, method: str, setting: str, seed: int, metrics: dict[str, float | None]) -> None:
        self.rows.append({"method": method, "setting": setting, "seed": seed, **metrics})

    def values(self, method: str, setting: str, column: str) -> list[float]:
        """The per-seed values of one cell (seeds where the metric exists)."""
        rows = (r for r in self.rows if (r["method"], r["setting"]) == (method, setting))
        return [r[column] for r in rows if r.get(column) is not None]

    def summary(self) -> list[list[str]]:
        """Mean ± std over seeds per (method, setting) and metric."""
        keys = list(dict.fromkeys((r["method"], r["setting"]) for r in self.rows))
        return [[m, s, *(fmt_mean_std(self.values(m, s, c)) for c in self.columns)] for m, s in keys]

    def mean(self, method: str, setting: str, column: str) -> float:
        return statistics.mean(self.values(method, setting, column))

    def markdown(self) -> str:
        """Mean ± std over seeds; a shot sweep as one row per method and one column per shot count; the
        papers' numbers in last columns where ``references`` has them."""
        if self.protocol not in SWEEPS:
            rows = [
                [*r, *(ref.get(f"{r[0]}|{r[1]}", ref.get(r[0], "")) for ref in self.references.values())]
                for r in self.summary()
            ]
            return markdown_table(["method", "setting", *self.columns, *self.references], rows)
        cells = {(m, s): c for m, s, c in self.summary()}
        shots = sorted({int(s) for _, s in cells}, key=int)
        methods = list(dict.fromkeys(m for m, _ in cells))
        rows = [[m, *(cells.get((m, str(k)), "") for k in shots)] for m in methods]
        return markdown_table(["method", *(f"{k} shot{'s' * (k != 1)}" for k in shots)], rows)

    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({"protocol": self.protocol, "rows": self.rows}, indent=1))
        with (folder / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["method", "setting", "seed", *self.columns])
            writer.writeheader()
            writer.writerows(self.rows)
        (folder / "results.md").write_text(self.markdown() + "\n")
        if self.protocol in SWEEPS:
            _plot_sweep(self, folder / "accuracy_vs_shots.png")
        return folder


SWEEPS = ("few-shot", "semi-supervised")  # protocols whose setting is a shot count


def _plot_sweep(result: ProtocolResult, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    all_shots: set[int] = set()
    for method in dict.fromkeys(r["method"] for r in result.rows):
        shots = sorted({int(r["setting"]) for r in result.rows if r["method"] == method})
        all_shots |= set(shots)
        per_seed = [result.values(method, str(s), "test") for s in shots]
        means = [statistics.mean(v) for v in per_seed]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed]
        style = {"linestyle": "--", "marker": None} if method == "zeroshot" else {"marker": "o"}
        (line,) = ax.plot(shots, means, label=method, **style)
        lo, hi = [m - s for m, s in zip(means, stds, strict=True)], [m + s for m, s in zip(means, stds, strict=True)]
        ax.fill_between(shots, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)  # ± std over seeds
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_shots), [str(s) for s in sorted(all_shots)])
    ax.set_xlabel("labelled shots per class" + (" (+ the rest unlabelled)" if result.protocol != "few-shot" else ""))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class ProtocolSettings(ExecSettings):
    """What every protocol shares: the backbone, the feature cache, per-method options and how to run the jobs.

    ``jobs > 1`` runs the (method, setting, seed) jobs in that many worker processes (each loads the backbone from
    its spec and opens the same cache folder; threads are split between them). Results do not depend on ``jobs``:
    every run is seeded on its own. CUDA workers are spawned, so a script using them needs the
    ``if __name__ == "__main__":`` guard. ``executor`` hands the jobs to submitit instead (``slurm``; ``local``:
    ``jobs`` subprocesses at a time; ``debug``: in this process), with the same results (``runs.executors``).
    The ``ExecSettings`` fields (device: used when ``backbone`` is a spec string) go to every run.
    """

    backbone: str | Backbone = "toy"
    cache: FeatureCache | None = None
    options: Options = field(default_factory=dict)
    progress: bool = True
    jobs: int = 1
    out: str | Path | None = None  # each finished job is appended to <out>/jobs.jsonl as it ends
    resume: bool = False  # skip the jobs <out>/jobs.jsonl already holds (same method, options, data, seed)
    executor: str | None = None  # run the jobs on a submitit engine: slurm, local, debug (``runs.executors``)
    executor_options: dict[str, Any] = field(default_factory=dict)  # submitit parameters (timeout_min, ...)


@dataclass(frozen=True)
class _Job:
    """One fit: ``method`` on ``dataset`` (``shots``, ``seed``, class ``subsample``), scored on its test split
    (column ``test``) and on each of ``targets`` = (column, dataset, class subsample of that test split).

    ``method`` is a registered name or ``label=name``: a variant of ``name`` with its own row and its own options
    (e.g. ``"w/o-CTP=tmm"`` with options ``{"w/o-CTP": {"ctp": "none"}}``).
    """

    method: str
    dataset: str
    shots: int
    seed: int
    subsample: str = "all"
    targets: tuple[tuple[str, str, str], ...] = ()
    backbone: str | None = None  # another backbone than the protocol's (distillation: the student alone)
    student: str | None = None  # distillation: the backbone Phase II fine-tunes
    fraction: float = 1.0  # label-free: the share of the unlabelled images (data-amount study)

    @property
    def label(self) -> str:
        return self.method.partition("=")[0]

    @property
    def name(self) -> str:
        return self.method.partition("=")[2] or self.method


class _Context:
    """A loaded backbone, the cache and the datasets loaded so far (one per process)."""

    def __init__(self, backbone: Backbone, settings: ProtocolSettings) -> None:
        self.backbone, self.cache, self.settings = backbone, settings.cache, settings
        self.splits: dict[str, dict[str, DatasetSplit]] = {}

    def data(self, dataset: str) -> dict[str, DatasetSplit]:
        if dataset not in self.splits:
            self.splits[dataset] = load_dataset(dataset, self.settings.data_root, self.settings.skip_corrupt)
        return self.splits[dataset]

    def execute(self, job: _Job) -> dict[str, float | None]:
        backbone = self.backbone if job.backbone is None else load_backbone(job.backbone, str(self.backbone.device))
        cfg = RunConfig(
            method=job.name,
            dataset=job.dataset,
            backbone=backbone.spec,
            student=job.student,
            shots=job.shots,
            seed=job.seed,
            subsample=job.subsample,
            options=self.settings.options.get(job.label, {}),
            unlabeled_fraction=job.fraction,
            **(exec_of(self.settings) | {"device": str(self.backbone.device)}),
        )
        res = run(cfg, cache=self.cache, progress=False, backbone=backbone, splits=self.data(job.dataset))
        out: dict[str, float | None] = {"test": res.accuracy["test"]}
        out["pseudo_labels"] = final_pseudo_label_accuracy(res.pseudo_labels)  # measured against hidden labels
        for column, dataset, subsample in job.targets:
            split = self.data(dataset)["test"]
            out[column] = self.score(res.classifier, split if subsample == "all" else base_new_split(split, subsample))
        return out

    def score(self, classifier: Any, split: DatasetSplit) -> float | None:
        """Accuracy of ``classifier`` on ``split``'s classes (re-targeted to its names when they differ)."""
        if classifier.classnames != split.classnames:
            try:
                classifier = classifier.for_classnames(split.classnames, self.backbone)
            except (NotImplementedError, TypeError):
                return None  # the method cannot describe classes it was not trained on
        precision = self.settings.feature_precision
        source = FeatureSource(self.backbone, self.cache, False, precision=precision)  # + patches if needed
        return score_split(classifier, self.backbone, split, source, False, self.settings.box_precision)


def final_pseudo_label_accuracy(rows: list[dict[str, Any]]) -> float | None:
    """Accuracy of the pseudo-labels a label-free run trained on last: its last selected (or filtered clean) sets,
    else (methods that relabel every image as they train: LatteCLIP, FLYP + PL, ReCLIP) the labels of its models in
    the last round that is not the frozen zero-shot one; the mean over the models; None if nothing was measured."""
    measured = [r for r in rows if r["accuracy"] is not None]
    trained = [r for r in measured if r["kind"] in ("selected", "clean")]
    if not trained:
        trained = [r for r in measured if r["kind"] == "all" and r.get("source") != "zero-shot"]
    if not trained:
        return None
    last = (trained[-1]["round"], trained[-1]["kind"])
    return round(statistics.mean(r["accuracy"] for r in trained if (r["round"], r["kind"]) == last), 2)


_WORKER: dict[str, _Context] = {}  # a worker process's context, made on its first job


def _worker(settings: ProtocolSettings, threads: int, job: _Job) -> dict[str, float | None]:
    """Runs in a worker process: ``settings`` arrives pickled (backbone as a spec string, cache as its folder);
    ``threads`` 0 keeps torch's default (a cluster job's own CPUs)."""
    if threads > 0:
        torch.set_num_threads(threads)
    if "ctx" not in _WORKER:
        assert isinstance(settings.backbone, str)
        _WORKER["ctx"] = _Context(load_backbone(settings.backbone, settings.device), settings)
    return _WORKER["ctx"].execute(job)


def _check_jobs(jobs: list[_Job], settings: ProtocolSettings) -> None:
    """Every method and option is checked before the first job runs (a typo fails in a second, not an hour)."""
    unused = sorted(set(settings.options) - {job.label for job in jobs})
    if unused:
        raise ValueError(f"options given for methods that are not run: {', '.join(unused)}")
    for label, name in dict.fromkeys((job.label, job.name) for job in jobs):
        make_config(get_method(name), settings.options.get(label, {}))


def _job_key(job: _Job, settings: ProtocolSettings, spec: str) -> str:
    """What identifies a finished job in ``jobs.jsonl``: the job, its options, the backbone and, when not fp32, the
    precision the job's method computes at (keys written before precisions existed stay valid). Execution-only
    options (``workers``) are left out: changing them never re-runs a finished job."""
    options = {k: v for k, v in settings.options.get(job.label, {}).items() if k not in EXECUTION_OPTIONS}
    key: list[Any] = [dataclasses.asdict(job), options, spec]
    black_box = get_method(job.name).capability is Capability.BLACK_BOX
    precision = settings.box_precision if black_box else settings.feature_precision
    if precision != "fp32":
        key.append(precision)
    return json.dumps(key, sort_keys=True)


class _JobLog:
    """``<out>/jobs.jsonl``: one line per finished job, written as it finishes (a crash or Ctrl-C keeps them)."""

    def __init__(self, settings: ProtocolSettings) -> None:
        self.path = Path(settings.out) / "jobs.jsonl" if settings.out is not None else None
        self.done: dict[str, dict[str, float | None]] = {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if settings.resume and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["key"]] = entry["metrics"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that job runs again
        elif self.path.is_file():
            self.path.unlink()

    def add(self, key: str, metrics: dict[str, float | None], seconds: float, device: str) -> None:
        """One finished job, with its wall time and device (``vlmtune reproduce --dry-run`` estimates from them)."""
        self.done[key] = metrics
        if self.path is not None:
            entry = {"key": key, "metrics": metrics, "seconds": round(seconds, 2), "device": device}
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


def _execute_all(jobs: list[_Job], settings: ProtocolSettings, what: str) -> list[tuple[_Job, dict[str, float | None]]]:
    """Each job with its metrics, in job order (in this process, or in ``settings.jobs`` worker processes)."""
    from tqdm import tqdm

    _check_jobs(jobs, settings)
    bb = settings.backbone
    spec, device = (bb.spec, str(bb.device)) if isinstance(bb, Backbone) else (bb, settings.device)
    keys = [_job_key(job, settings, spec) for job in jobs]
    done = _JobLog(settings)
    todo = [i for i, key in enumerate(keys) if key not in done.done]
    if len(todo) < len(jobs):
        log.warning("%s: %d of %d jobs already done (%s), skipped", what, len(jobs) - len(todo), len(jobs), done.path)
    with tqdm(total=len(todo), desc=what, unit="run", disable=not settings.progress) as bar:
        if settings.executor is None and (settings.jobs <= 1 or len(todo) <= 1):
            ctx = _Context(bb if isinstance(bb, Backbone) else load_backbone(spec, device), settings) if todo else None
            for i in todo:
                assert ctx is not None
                start = time.perf_counter()
                done.add(keys[i], ctx.execute(jobs[i]), time.perf_counter() - start, device)
                bar.update()
        else:
            local = settings.executor != "slurm"  # a cluster job keeps its own CPUs' threads
            threads = max(1, (os.cpu_count() or 1) // max(1, settings.jobs)) if local else 0
            fn = functools.partial(_worker, dataclasses.replace(settings, backbone=spec, device=device), threads)
            parallel = _in_pool if settings.executor is None else _on_executor
            for i, metrics, seconds in parallel(fn, [(i, jobs[i]) for i in todo], settings, device):
                done.add(keys[i], metrics, seconds, device)
                bar.update()
    return [(job, done.done[key]) for job, key in zip(jobs, keys, strict=True)]


Finished = Iterator[tuple[int, dict[str, float | None], float]]  # (job index, metrics, the job's share of time)


def _in_pool(
    fn: Callable[[_Job], Any], todo: list[tuple[int, _Job]], settings: ProtocolSettings, device: str
) -> Finished:
    """The jobs in ``settings.jobs`` local worker processes, as they finish."""
    # CUDA cannot be forked; elsewhere the platform's default (fork on Linux: scripts need no main guard)
    mp = multiprocessing.get_context("spawn" if device.startswith("cuda") else None)
    pool = ProcessPoolExecutor(settings.jobs, mp_context=mp)
    try:
        start = time.perf_counter()
        futures = {pool.submit(fn, job): i for i, job in todo}
        for n_done, future in enumerate(as_completed(futures)):
            # the mean wall time per job so far, times the workers: each job's share of the pool's time
            yield futures[future], future.result(), (time.perf_counter() - start) * settings.jobs / (n_done + 1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C or a failed job: stop the rest now
        raise
    pool.shutdown()


def _on_executor(
    fn: Callable[[_Job], Any], todo: list[tuple[int, _Job]], settings: ProtocolSettings, device: str
) -> Finished:
    """The jobs on the submitit engine ``settings.executor``, as they finish (files in ``<out>/executor``)."""
    assert settings.executor is not None
    in_flight = max(1, settings.jobs) if settings.executor != "slurm" else None  # local: a process per job
    folder = Path(settings.out or ".") / "executor"
    start = time.perf_counter()
    jobs = [job for _, job in todo]
    finished = run_on_engine(fn, jobs, settings.executor, folder, settings.executor_options, in_flight)
    for n_done, (j, metrics) in enumerate(finished):
        yield todo[j][0], metrics, (time.perf_counter() - start) * (in_flight or 1) / (n_done + 1)


def few_shot_sweep(
    methods: Sequence[str],
    dataset: str,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Test accuracy per method x shots x seed (settings = shots)."""
    return _shot_sweep("few-shot", methods, dataset, shots, seeds, settings)


def _shot_sweep(
    protocol: str,
    methods: Sequence[str],
    dataset: str,
    shots: Sequence[int],
    seeds: Sequence[int],
    settings: ProtocolSettings | None,
) -> ProtocolResult:
    """Test accuracy per method x shots x seed: the few-shot and the semi-supervised sweeps."""
    jobs = [_Job(m, dataset, k, s) for m in methods for k in shots for s in seeds]
    result = ProtocolResult(protocol, ["test"])
    for job, metrics in _execute_all(jobs, settings or ProtocolSettings(), f"{protocol} {dataset}"):
        result.add(job.label, str(job.shots), job.seed, {"test": metrics["test"]})
    return result


def base_to_new(
    methods: Sequence[str],
    dataset: str,
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Train on the base half of the classes; test on base and on new classes; harmonic mean H."""
    jobs = [_Job(m, dataset, shots, s, "base", (("new", dataset, "new"),)) for m in methods for s in seeds]
    result = ProtocolResult("base-to-new", ["base", "new", "H"])
    for job, metrics in _execute_all(jobs, settings or ProtocolSettings(), f"base-to-new {dataset}"):
        base, new = metrics["test"], metrics["new"]
        hm = harmonic_mean(base, new) if base is not None and new is not None else None
        result.add(job.label, dataset, job.seed, {"base": base, "new": new, "H": hm})
    return result


def transfer(
    methods: Sequence[str],
    source: str,
    targets: Sequence[str],
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Cross-dataset transfer or domain generalisation: columns = source, then each target (test accuracy)."""
    extra = tuple((t, t, "all") for t in targets)
    jobs = [_Job(m, source, shots, s, targets=extra) for m in methods for s in seeds]
    result = ProtocolResult("transfer", [source, *targets])
    for job, metrics in _execute_all(jobs, settings or ProtocolSettings(), f"transfer from {source}"):
        result.add(job.label, f"{source} ->", job.seed, {source: metrics["test"], **{t: metrics[t] for t in targets}})
    return result


def _label_free_jobs(jobs: list[_Job], protocol: str) -> list[_Job]:
    """``jobs``, once every method is checked to train without labels (zeroshot passes: it trains on nothing)."""
    for job in jobs:
        if get_method(job.name).needs_labels:
            raise ValueError(f"{job.method} needs labels: {protocol} runs label-free methods (and zeroshot)")
    return jobs


def unsupervised(
    methods: Sequence[str],
    dataset: str,
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Label-free methods on the train split without labels -> test accuracy, and the accuracy of the pseudo-labels
    each trained on last (measured by the runner); paper 003's and paper 004's Table 1 beside."""
    jobs = _label_free_jobs([_Job(m, dataset, 0, s) for m in methods for s in seeds], "the unsupervised protocol")
    p3, p4 = "paper 003 Table 1 (ViT-B/16)", "paper 004 Table 1 (ViT-B/32, LAION-2B)"
    result = ProtocolResult("unsupervised", ["test", "pseudo_labels"], references={p3: {}, p4: {}})
    for job, metrics in _execute_all(jobs, settings or ProtocolSettings(), f"unsupervised {dataset}"):
        result.add(job.label, dataset, job.seed, metrics)
        result.references[p3][job.label] = paper_003(job.name, dataset)
        result.references[p4][job.label] = paper_004(job.name, dataset)
    return result


def data_amount(
    methods: Sequence[str],
    dataset: str,
    fractions: Sequence[float] = (0.01, 0.2, 1.0),
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Paper 004 Fig. 6: label-free methods on a random share of the unlabelled train split (drawn with each seed)
    -> test accuracy and pseudo-label accuracy per method x share (setting "1%", "20%", "100%")."""
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")
    jobs = [_Job(m, dataset, 0, s, fraction=f) for m in methods for f in fractions for s in seeds]
    jobs = _label_free_jobs(jobs, "the data-amount study")
    result = ProtocolResult("data-amount", ["test", "pseudo_labels"])
    for job, metrics in _execute_all(jobs, settings or ProtocolSettings(), f"data-amount {dataset}"):
        result.add(job.label, f"{100 * job.fraction:g}%", job.seed, metrics)
    return result


def semi_supervised(
    methods: Sequence[str],
    dataset: str,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """k labelled shots per class plus the rest of the train split unlabelled (label-free methods), or the k shots
    alone (few-shot methods, for comparison) -> test accuracy per method x k x seed (paper 003 Fig. 2)."""
    return _shot_sweep("semi-supervised", methods, dataset, shots, seeds, settings)


def noisy_labels(
    methods: Sequence[str],
    dataset: str,
    noise: str = "pairflip-0.4",
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Paper 003 Table 2: the train split with noisy labels (``data.noisy``: ``pairflip-0.4``, ``cifar100n``).
    Label-free methods run unsupervised on it (the labels ignored, as CoFT discards CIFAR-100N's); supervised
    methods train on all of its noisy labels -> test accuracy (true labels). The measured noise rate is the
    setting; no pseudo-label column (the only labels the runner could measure against are the noisy ones)."""
    settings = settings or ProtocolSettings()
    noisy = f"{dataset}{NOISY_SEP}{noise}"
    clean = load_dataset(dataset, settings.data_root, settings.skip_corrupt)["train"]
    rate = noise_rate(clean, load_dataset(noisy, settings.data_root, settings.skip_corrupt)["train"])
    jobs = [_Job(m, noisy, 0, s) for m in methods for s in seeds]  # shots 0: the whole (noisy) train split
    title = "paper 003 Table 2 (CIFAR-100N, ViT-B/16)"
    result = ProtocolResult("noisy-labels", ["test"], references={title: {}})
    for job, metrics in _execute_all(jobs, settings, f"noisy-labels {dataset}"):
        ignores = not get_method(job.name).needs_labels
        setting = f"{noise} ({rate:.1f}% wrong), " + ("labels ignored" if ignores else "trained on them")
        result.add(job.label, setting, job.seed, {"test": metrics["test"]})
        result.references[title][job.label] = paper_003_table2(job.name)
    return result


def distill(
    methods: Sequence[str],
    dataset: str,
    teacher: str,
    student: str,
    seeds: Sequence[int] = (1, 2, 3),
    settings: ProtocolSettings | None = None,
) -> ProtocolResult:
    """Paper 003 Table 3: Phase I on ``teacher``, Phase II fine-tunes ``student`` (methods that distil, CoFT /
    CoFT+), beside the same method on the student alone and on the teacher alone (zero-shot: both backbones) ->
    test accuracy of the student (teacher rows: the teacher's)."""
    settings = dataclasses.replace(settings or ProtocolSettings(), backbone=teacher)
    jobs = []
    for m in methods:
        distils = get_method(m.partition("=")[2] or m).supports_student
        jobs += [_Job(m, dataset, 0, s, student=student) for s in seeds if distils]
        jobs += [_Job(m, dataset, 0, s, backbone=student) for s in seeds]
        jobs += [_Job(m, dataset, 0, s) for s in seeds]
    title = "paper 003 Table 3 (L/14 -> B/16)"
    result = ProtocolResult("distill", ["test"], references={title: {}})
    for job, metrics in _execute_all(jobs, settings, f"distill {teacher} -> {student}"):
        setting = f"{teacher} -> {student}" if job.student else (job.backbone or teacher) + " alone"
        result.add(job.label, setting, job.seed, {"test": metrics["test"]})
        if job.student or (job.name == "zeroshot" and job.backbone == student):  # Table 3's CLIP = B/16 zero-shot
            result.references[title][f"{job.label}|{setting}"] = paper_003_table3(job.name, dataset)
    return result
