"""Protocol jobs on a cluster engine: submitit (SLURM job arrays, or its ``local`` and ``debug`` modes).

``vlmtune protocol ... --executor slurm`` hands each (method, setting, seed) job to the engine instead of local
worker processes. The job runs the same function as a local worker (``protocols._worker``), so results equal the
local ones: every run is seeded on its own. ``local`` runs the jobs as subprocesses of this machine (the engine's
test mode), ``debug`` in this process. The engine keeps its job files (pickled by submitit, as any submitit job)
and logs in ``<out>/executor``: a folder only you should be able to write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vlmtune.errors import VlmtuneError, require

ENGINES = ("local", "slurm", "debug")
T = TypeVar("T")


def run_on_engine(
    fn: Callable[[T], dict[str, Any]],
    jobs: Sequence[T],
    engine: str,
    folder: Path,
    options: dict[str, Any] | None = None,
    in_flight: int | None = None,
    poll_seconds: float = 2.0,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, result) of each of ``jobs`` as it finishes, each run as ``fn(job)`` by submitit on ``engine``.

    Args:
        options: submitit parameters (``timeout_min``, ``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``,
            ...; ``vlmtune protocol --executor-set KEY=VALUE``).
        in_flight: the most jobs submitted at once (None = all: a cluster queues them; the local engine starts a
            process per submitted job, so it is given the ``--jobs`` count).
    """
    if engine not in ENGINES:
        raise VlmtuneError(f"unknown executor {engine!r}: one of {', '.join(ENGINES)}")
    submitit = require("submitit", "cluster", f"--executor {engine}")
    executor = submitit.AutoExecutor(folder=folder, cluster=engine)
    try:
        executor.update_parameters(**(options or {}))
    except (NameError, TypeError, ValueError) as exc:  # submitit names the unknown or ill-typed parameter
        raise VlmtuneError(f"--executor-set: {'; '.join(str(exc).splitlines())}") from None
    waiting = list(enumerate(jobs))
    running: dict[Any, int] = {}
    limit = in_flight or len(waiting)
    try:
        while waiting or running:
            room = max(0, limit - len(running))
            batch, waiting = waiting[:room], waiting[room:]
            if batch:
                handles = executor.map_array(fn, [job for _, job in batch])
                running.update({h: i for h, (i, _) in zip(handles, batch, strict=True)})
            handle = next(submitit.helpers.as_completed(list(running), poll_frequency=poll_seconds))
            i = running.pop(handle)
            try:
                yield i, handle.result()
            except Exception as exc:  # submitit's FailedJobError quotes the job's stderr
                raise VlmtuneError(f"job {i} failed on the {engine} executor (logs in {folder}): {exc}") from None
    finally:
        for handle in running:
            handle.cancel(check=False)
