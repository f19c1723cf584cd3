"""Append-only journal of a black-box run's steps, for exact resumption (``vlmtune fit --resume``).

A step's record holds what it took from the black box (candidate fitness values, or the scores the head trained
on). Resuming rebuilds the trainer from the same seed and replays the records without querying, which puts
CMA-ES, the head, its optimiser and every generator in the state they had; the run then goes on live and ends
exactly as an uninterrupted run would. Records are written in chunks (safetensors + JSON, atomically); steps
after the last complete chunk are recomputed on resume (spending their queries again).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmtune._io import atomic_write
from vlmtune.errors import VlmtuneError
from vlmtune.methods.craft import GenerationRecord


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
        meta.write_text(json.dumps(run_config, indent=1))
        self._chunks = sorted(self.folder.glob("chunk_*.json"))

    def replay(self) -> list[GenerationRecord]:
        records: list[GenerationRecord] = []
        for meta_path in self._chunks:
            tensors = load_file(str(meta_path.with_suffix(".safetensors")))
            for i, entry in enumerate(json.loads(meta_path.read_text())):
                fit, head = tensors.get(f"fitness_{i}"), tensors.get(f"head_{i}")
                records.append(
                    GenerationRecord(
                        fit.numpy() if fit is not None else None,
                        head.numpy() if head is not None else None,
                        int(entry["queries"]),
                    )
                )
        return records

    @property
    def queries(self) -> int:
        return sum(r.queries for r in self.replay())

    def record(self, record: GenerationRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"chunk_{len(self._chunks):04d}"
        tensors: dict[str, torch.Tensor] = {}
        for i, r in enumerate(self._pending):
            if r.fitness is not None:
                tensors[f"fitness_{i}"] = torch.as_tensor(np.asarray(r.fitness, dtype=np.float64))
            if r.head_scores is not None:
                tensors[f"head_{i}"] = torch.as_tensor(np.asarray(r.head_scores, dtype=np.float32))
        entries = [{"queries": r.queries} for r in self._pending]
        data, meta = self.folder / f"{name}.safetensors", self.folder / f"{name}.json"
        atomic_write(
            data, lambda tmp: save_file(tensors, tmp) if tensors else save_file({"empty": torch.zeros(0)}, tmp)
        )
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(entries)))  # the JSON marks the chunk complete
        self._chunks.append(meta)
        self._pending = []
