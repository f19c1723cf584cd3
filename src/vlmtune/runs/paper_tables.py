"""Published numbers (accuracy, %) of our five papers' tables, as data: ``paper_numbers/<paper>_table<N>.csv``.

Each file starts with a ``# caption`` line, then ``backbone,row,<column>...``: ``row`` is the method (or the
ablation preset) the number belongs to, under our names; columns are our dataset names, ``avg`` (the paper's own
average), ``<dataset>/base|new|H`` (base-to-new) or a shot count (ablations averaged over datasets). An empty cell is
a number the paper does not give. The protocol tables and ``vlmtune reproduce`` put these beside our results.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class PaperTable:
    """One published table: ``cells[(backbone, row)][column]`` in %."""

    key: str  # "001_table1"
    caption: str
    columns: tuple[str, ...]
    cells: dict[tuple[str, str], dict[str, float]]

    @property
    def backbones(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b for b, _ in self.cells))

    @property
    def rows(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for _, r in self.cells))

    def get(self, row: str, column: str, backbone: str | None = None) -> float | None:
        """The number of ``row`` in ``column`` (the first backbone holding the row when none is named)."""
        for (b, r), values in self.cells.items():
            if r == row and (backbone is None or b == backbone):
                return values.get(column)
        return None


def table_keys() -> list[str]:
    folder = resources.files("vlmtune.runs") / "paper_numbers"
    return sorted(p.name.removesuffix(".csv") for p in folder.iterdir() if p.name.endswith(".csv"))


@functools.cache
def paper_table(key: str) -> PaperTable:
    """The table ``key`` (e.g. ``"003_table1"``), read from the package data."""
    if key not in table_keys():
        raise KeyError(f"no published table {key!r}; known: {', '.join(table_keys())}")
    text = (resources.files("vlmtune.runs") / "paper_numbers" / f"{key}.csv").read_text()
    caption, _, body = text.partition("\n")
    reader = csv.reader(body.splitlines())
    header = next(reader)
    columns = tuple(header[2:])
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for backbone, row, *values in reader:
        cells[backbone, row] = {c: float(v) for c, v in zip(columns, values, strict=True) if v}
    return PaperTable(key, caption.removeprefix("#").strip(), columns, cells)


def _per_dataset(key: str, method: str, dataset: str, backbone: str | None = None) -> str:
    """``key``'s number for ``method`` on ``dataset`` (the paper's average for other datasets), or ''."""
    table = paper_table(key)
    value = table.get(method, dataset, backbone)
    if value is not None:
        return f"{value:.2f}"
    avg = table.get(method, "avg", backbone)
    if avg is None:
        return ""
    return f"{avg:.2f} (avg of {sum(c not in ('avg',) for c in table.columns)})"


def paper_003(method: str, dataset: str) -> str:
    """Paper 003 Table 1's number for ``method`` on ``dataset`` (the 9-dataset average for other datasets), or ''."""
    return _per_dataset("003_table1", method, dataset)


def paper_003_table2(method: str) -> str:
    """Table 2's CIFAR-100N number for ``method`` (linear_probe / coop stand beside its plain CE), or ''."""
    ce = method in ("linear_probe", "coop")
    value = paper_table("003_table2").get("ce" if ce else method, "cifar100")
    return "" if value is None else f"{value:.2f}" + (" (CE)" if ce else "")


def paper_003_table3(method: str, dataset: str) -> str:
    """Table 3's distillation number (L/14 -> B/16) for ``method`` on ``dataset`` (else the average), or ''."""
    return _per_dataset("003_table3", method, dataset)


def paper_004(method: str, dataset: str) -> str:
    """Paper 004 Table 1's number for ``method`` on ``dataset`` (the 10-dataset average for others), or ''."""
    return _per_dataset("004_table1", method, dataset)
