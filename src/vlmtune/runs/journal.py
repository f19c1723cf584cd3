"""Append-only journal of a black-box run's steps, for exact resumption (``vlmtune fit --resume``).

A step's record holds what it took from the black box (candidate fitness values, or the scores the head trained
on). Resuming rebuilds the trainer from the same seed and replays the records without querying, which puts
CMA-ES, the head, its optimiser and every generator in the state they had; the run then goes on live and ends
exactly as an uninterrupted run would. Records are written in chunks (safetensors + JSON, atomically); steps
after the last complete chunk are recomputed on resume (spending their queries again).

Every chunk's JSON carries its index, its first step, the queries before it, each step's queries, the SHA-256
of its tensor file and the SHA-256 of the header itself; a journal whose chunks are out of sequence, missing,
altered (an edited query count in the last chunk included) or inconsistent, or whose records are not finite, is
refused with a clear message instead of being replayed into a wrong result. The method checks each replayed step
against the step it is about to take (its kind, shape and query cost: ``CraftTrainer._next_record``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmtune._io import atomic_write, file_sha256
from vlmtune.errors import VlmtuneError
from vlmtune.methods.blackbox.craft import GenerationRecord

VERSION = 3  # 3: the header's own checksum (a version-2 journal is refused: start the run again)
_CHUNK = re.compile(r"chunk_(\d{4,})\.json")


class JournalDamaged(VlmtuneError):
    """A resume journal failed its checks; nothing was replayed."""


def header_sha256(header: dict[str, Any]) -> str:
    """SHA-256 of a chunk header's canonical JSON, without its own ``header_sha256`` field."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FileJournal:
    """Records in ``folder`` as ``chunk_NNNN.safetensors`` + ``chunk_NNNN.json``, ``every`` records a chunk."""

    def __init__(self, folder: str | Path, run_config: dict[str, Any], resume: bool, every: int = 10) -> None:
        self.folder = Path(folder)
        self.every = every
        self._pending: list[GenerationRecord] = []
        meta = self.folder / "run.json"
        if resume:
            if not meta.is_file():
                raise VlmtuneError(f"nothing to resume in {self.folder.parent} (no {meta.name})")
            if json.loads(meta.read_text()) != run_config:
                raise VlmtuneError(f"{self.folder.parent} was started with a different configuration; not resuming")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(run_config, indent=1)))
        self._records = self._load() if resume else []
        self._chunks = len({r for r, _ in self._records})
        self._steps = len(self._records)
        self._queries = sum(rec.queries for _, rec in self._records)

    def _damaged(self, what: str) -> JournalDamaged:
        return JournalDamaged(
            f"the resume journal in {self.folder} is damaged ({what}); nothing was replayed. "
            "Run again without --resume to start over."
        )

    def _load(self) -> list[tuple[int, GenerationRecord]]:
        """(chunk index, record) of every complete chunk, each checked against its JSON."""
        files = sorted(self.folder.glob("chunk_*.json"))
        records: list[tuple[int, GenerationRecord]] = []
        queries = 0
        for expected, meta_path in enumerate(files):
            match = _CHUNK.fullmatch(meta_path.name)
            if match is None or int(match.group(1)) != expected:
                raise self._damaged(f"chunk {expected} is missing or misnamed ({meta_path.name})")
            data_path = meta_path.with_suffix(".safetensors")
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                raise self._damaged(f"{meta_path.name} is not readable JSON") from None
            if not isinstance(meta, dict) or meta.get("version") != VERSION:
                raise self._damaged(f"{meta_path.name} has no version-{VERSION} header")
            if meta.get("header_sha256") != header_sha256(meta):
                raise self._damaged(f"{meta_path.name} was changed after it was written (its checksum differs)")
            steps = meta.get("steps")
            if meta.get("chunk") != expected or meta.get("first_step") != len(records) or not isinstance(steps, list):
                raise self._damaged(f"{meta_path.name} is out of sequence")
            if meta.get("queries_before") != queries:
                raise self._damaged(f"{meta_path.name} does not follow the query count of the chunks before it")
            if not data_path.is_file() or file_sha256(data_path) != meta.get("sha256"):
                raise self._damaged(f"{data_path.name} does not match its checksum")
            tensors = load_file(str(data_path))
            for i, entry in enumerate(steps):
                q = entry.get("queries") if isinstance(entry, dict) else None
                if not isinstance(q, int) or isinstance(q, bool) or q < 0:
                    raise self._damaged(f"{meta_path.name} step {i} has an invalid query count {q!r}")
                fit, head = tensors.get(f"fitness_{i}"), tensors.get(f"head_{i}")
                record = fit if head is None else head if fit is None else None
                if record is None:
                    raise self._damaged(f"{data_path.name} step {i} has no (or two) records")
                if not bool(torch.isfinite(record).all()):
                    raise self._damaged(f"{data_path.name} step {i} holds values that are not finite")
                records.append(
                    (
                        expected,
                        GenerationRecord(
                            fit.numpy() if fit is not None else None, head.numpy() if head is not None else None, q
                        ),
                    )
                )
                queries += q
        return records

    def replay(self) -> list[GenerationRecord]:
        return [rec for _, rec in self._records]

    @property
    def queries(self) -> int:
        return self._queries

    def record(self, record: GenerationRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"chunk_{self._chunks:04d}"
        tensors: dict[str, torch.Tensor] = {}
        for i, r in enumerate(self._pending):
            if r.fitness is not None:
                tensors[f"fitness_{i}"] = torch.as_tensor(np.asarray(r.fitness, dtype=np.float64))
            if r.head_scores is not None:
                tensors[f"head_{i}"] = torch.as_tensor(np.asarray(r.head_scores, dtype=np.float32))
        data, meta = self.folder / f"{name}.safetensors", self.folder / f"{name}.json"
        atomic_write(data, lambda tmp: save_file(tensors, tmp))
        header = {
            "version": VERSION,
            "chunk": self._chunks,
            "first_step": self._steps,
            "queries_before": self._queries,
            "steps": [{"queries": r.queries} for r in self._pending],
            "sha256": file_sha256(data),
        }
        header["header_sha256"] = header_sha256(header)
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(header)))  # the JSON marks the chunk complete
        self._chunks += 1
        self._steps += len(self._pending)
        self._queries += sum(r.queries for r in self._pending)
        self._pending = []
