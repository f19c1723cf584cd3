"""A recipe as groups of runs, each group one protocol call; what a group lacks before it can run; its cost.

``plan`` turns a recipe (and the user's choice of backbones, rows, datasets, seeds, or ``--toy``) into ``Group``s;
``backbone_missing`` and ``data_missing`` say what stops a group (weights not cached, an extra not installed, a
dataset not found); ``estimate``
prices the runs from measured per-job times (``jobs.jsonl`` of earlier runs), never from guesses.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmtune.backbones import parse_spec
from vlmtune.errors import UnknownName, VlmtuneError
from vlmtune.reproduce.recipes import BACKBONES, DISTILL_SEP, Protocol, Recipe, Row
from vlmtune.reproduce.toy import TOY_BACKBONE, TOY_NOISE, TOY_STUDENT, toy_dataset

LABEL_FREE = ("unsupervised", "noisy-labels", "distill")
TEXTGEN_METHODS = ("latteclip", "lafter", "lmm_zeroshot", "coft_plus")  # methods whose texts an LLM / LMM writes


@dataclass(frozen=True)
class Group:
    """Runs of one protocol call: ``rows`` x ``seeds`` (x ``shots``) on one dataset and backbone."""

    backbone: str  # the paper's label ("ViT-B/16"; "ViT-L/14->ViT-B/16" for distillation)
    spec: str  # the backbone spec run (distillation: the teacher's)
    protocol: Protocol
    dataset: str  # paper name of the dataset trained on (transfer: the source)
    run_dataset: str  # the dataset run (``--toy``: its toy task)
    rows: tuple[Row, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    targets: tuple[tuple[str, str], ...] = ()  # transfer: (paper name, dataset run)
    student: str | None = None
    noise: str = ""

    @property
    def runs(self) -> int:
        return len(self.rows) * len(self.seeds) * len(self.shots)

    @property
    def slug(self) -> str:
        """A folder name for this group's job log."""
        shots = "-".join(map(str, self.shots))
        text = f"{self.backbone}_{self.protocol}_{self.dataset}_{shots}_{'-'.join(r.label for r in self.rows)}"
        return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text)[:150]


@dataclass
class Selection:
    """What of a recipe to run (empty = all) and how: the papers' backbones (``LABEL`` or ``LABEL=SPEC``)."""

    backbones: Sequence[str] = ()
    rows: Sequence[str] = ()
    datasets: Sequence[str] = ()
    seeds: Sequence[int] = ()
    toy: bool = False


def _backbones(recipe: Recipe, sel: Selection) -> list[tuple[str, str, str | None]]:
    """(paper label, spec, student spec) per backbone to run."""
    chosen: dict[str, str | None] = {}
    for item in sel.backbones:
        label, eq, spec = item.partition("=")
        if label not in recipe.backbones:
            raise UnknownName(f"backbone of {recipe.name}", label, list(recipe.backbones))
        chosen[label] = spec if eq else None
    labels = list(chosen) or list(recipe.backbones)
    if sel.toy:  # every backbone is the toy model: run once, beside the paper's headline (last) backbone
        label = labels[-1]
        return [(label, TOY_BACKBONE, TOY_STUDENT if DISTILL_SEP in label else None)]
    out = []
    for label in labels:
        if DISTILL_SEP in label:
            teacher, student = label.split(DISTILL_SEP)
            out.append((label, BACKBONES[teacher], BACKBONES[student]))
        else:
            out.append((label, chosen.get(label) or BACKBONES[label], None))
    return out


def _rows(recipe: Recipe, sel: Selection) -> list[Row]:
    rows = [recipe.row(label) for label in sel.rows] if sel.rows else list(recipe.rows)
    return [r for r in rows if r.method is not None]


def plan(recipe: Recipe, sel: Selection | None = None) -> list[Group]:
    """The groups of runs of ``recipe`` (rows vlmtune lacks are left out: ``unavailable_rows`` lists them)."""
    sel = sel or Selection()
    columns = recipe.dataset_columns()
    for d in sel.datasets:
        if d not in columns:
            raise UnknownName(f"dataset of {recipe.name}", d, list(columns))
    seeds = tuple(sel.seeds) or recipe.seeds
    rows = _rows(recipe, sel)
    by_kind: dict[tuple[Protocol, tuple[int, ...]], list[Row]] = {}  # rows run by one protocol call
    for r in rows:
        shots = (r.shots,) if r.shots is not None else recipe.shots
        by_kind.setdefault((r.protocol or recipe.protocol, shots), []).append(r)
    noise = TOY_NOISE.get(recipe.noise, recipe.noise) if sel.toy else recipe.noise
    groups: list[Group] = []
    for label, spec, student in _backbones(recipe, sel):
        for (protocol, shots), members in by_kind.items():
            label_free = protocol in LABEL_FREE

            def run_name(d: str, label_free: bool = label_free) -> str:
                return toy_dataset(d, label_free) if sel.toy else d

            common = {"rows": tuple(members), "shots": shots, "seeds": seeds, "student": student, "noise": noise}
            if protocol == "transfer":
                source, *targets = columns
                kept = [t for t in targets if not sel.datasets or t in sel.datasets]
                tg = tuple((t, run_name(t)) for t in kept)
                groups.append(Group(label, spec, protocol, source, run_name(source), targets=tg, **common))
                continue
            for d in columns:
                if not sel.datasets or d in sel.datasets:
                    groups.append(Group(label, spec, protocol, d, run_name(d), **common))
    return groups


def unavailable_rows(recipe: Recipe) -> list[Row]:
    return [r for r in recipe.rows if r.method is None]


# ---- what is missing ------------------------------------------------------------------------------------------
def _module_missing(module: str, extra: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"extra not installed: pip install 'vlmtune[{extra}]' ({module})"
    return None


def backbone_missing(spec: str) -> str | None:
    """Why ``spec`` cannot load here (extra not installed, weights not cached), or None."""
    family, name, tag = parse_spec(spec)
    if family == "toy":
        return None
    if family == "local":
        return None if Path(name).expanduser().is_dir() else f"weights folder not found: {name}"
    if family == "openclip":
        absent = _module_missing("open_clip", "openclip")
        if absent or tag is None:
            return absent
        if Path(tag).expanduser().is_file():
            return None
        from vlmtune.backbones.openclip import _cache_candidates

        try:
            found, searched = _cache_candidates(name, tag, None)
        except VlmtuneError as e:
            return str(e)
        return None if found else f"weights not cached: {spec} (looked in {'; '.join(searched)})"
    absent = _module_missing("transformers", "hf")
    if absent or Path(name).expanduser().is_dir():
        return absent
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(name, "config.json")
    return None if isinstance(hit, str) else f"weights not cached: {spec} (Hugging Face cache, {name})"


class DatasetCheck:
    """Whether each dataset loads (``load_dataset`` reads split files and folder listings, not images); memoised."""

    def __init__(self, data_root: str | None) -> None:
        self.data_root = data_root
        self.seen: dict[str, str | None] = {}

    def __call__(self, name: str) -> str | None:
        if name not in self.seen:
            from vlmtune.data import list_datasets, load_dataset

            try:
                if name.startswith("toy:"):  # generated on demand: registered is enough (generating takes seconds)
                    base = name.split("@")[0]
                    known = [d.name for d in list_datasets()]
                    if base not in known:
                        raise UnknownName("dataset", base, known)
                else:
                    load_dataset(name, self.data_root)
                self.seen[name] = None
            except (VlmtuneError, OSError, ValueError) as e:
                lines = str(e).splitlines()
                source = [x for x in lines[1:] if x.startswith("Download")]  # DatasetNotFound names its source
                self.seen[name] = f"{name}: {'; '.join(x.rstrip('.') for x in lines[:1] + source)}"
        return self.seen[name]


def data_missing(group: Group, datasets: DatasetCheck, textgen: str = "toy") -> list[str]:
    """What of ``group``'s data and text generation is missing here (its backbones aside)."""
    out: list[str] = []
    names = [group.run_dataset, *(t for _, t in group.targets)]
    if group.noise and not group.noise.startswith("pairflip"):
        names = [f"{group.run_dataset}@noisy={group.noise}"]
    out += [m for m in map(datasets, names) if m]
    if any(r.method in TEXTGEN_METHODS for r in group.rows):
        extra = {"openai": ("openai", "textgen"), "transformers": ("transformers", "hf")}.get(textgen)
        if extra and (absent := _module_missing(*extra)):
            out.append(f"text generation ({textgen}): {absent}")
    return out


# ---- cost ------------------------------------------------------------------------------------------------------
def measured_times(folders: Iterable[Path]) -> dict[tuple[str, str, str], list[float]]:
    """Seconds per finished job in the ``jobs.jsonl`` files under ``folders``, by (row label, dataset, backbone)."""
    times: dict[tuple[str, str, str], list[float]] = {}
    for folder in folders:
        for log in Path(folder).glob("**/jobs.jsonl"):
            for line in log.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    job, _, spec = json.loads(entry["key"])
                    seconds = float(entry["seconds"])
                except (ValueError, KeyError, TypeError):
                    continue  # older logs carry no time; a cut line
                label = job["method"].partition("=")[0]
                times.setdefault((label, job["dataset"], spec), []).append(seconds)
    return times


def estimate(groups: Sequence[Group], times: dict[tuple[str, str, str], list[float]]) -> tuple[float, int, int]:
    """(estimated seconds, runs priced, runs without a measurement): a run is priced by the mean time of the same row
    on the same dataset and backbone, else of the same row on the backbone's other datasets."""
    by_row: dict[tuple[str, str], list[float]] = {}
    for (label, _, spec), ts in times.items():
        by_row.setdefault((label, spec), []).extend(ts)
    total, priced, unknown = 0.0, 0, 0
    for g in groups:
        for r in g.rows:
            n = len(g.seeds) * len(g.shots)
            ts = times.get((r.label, g.run_dataset, g.spec)) or by_row.get((r.label, g.spec))
            if ts:
                total += n * statistics.mean(ts)
                priced += n
            else:
                unknown += n
    return total, priced, unknown
