"""API keys and their accounts for ``vlmtune serve``: the keys file, and usage that survives restarts.

Keys file (JSON, keep it ``chmod 600``)::

    {"alice-key-...": 8000,                                   # query budget (null = unlimited)
     "bob-key-...": {"queries": 8000, "work": 10000000000, "images": 20000}}

``queries``: hard query budget; ``work``: hard limit of scores computed (candidates x images x classes);
``images``: the most images the key may hold at once (uploads are kept in memory; default 50,000).

``UsageStore`` keeps every key's counters in SQLite (WAL mode, a durable commit per charge): a charge is one
``UPDATE ... WHERE used + n <= limit`` statement, atomic across threads and processes, so a hard budget survives
restarts and crashes. Keys are stored as SHA-256 hashes only. Uploaded images are not persisted: after a restart
clients upload again (ids are content hashes, so they come back the same).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import stat
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmtune._io import atomic_write
from vlmtune.blackbox.api import BudgetExceeded, QueryBudget
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)
MIN_KEY_CHARS = 16
DEFAULT_IMAGE_QUOTA = 50_000


class KeySpec(BaseModel):
    """One key's limits (every number a whole number >= 0, or null for no limit)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    queries: int | None = Field(default=None, ge=0)
    work: int | None = Field(default=None, ge=0)
    images: int | None = Field(default=DEFAULT_IMAGE_QUOTA, ge=0)


def key_id(key: str) -> str:
    """What is stored and logged for a key: a hash prefix, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> dict[str, KeySpec]:
    """Read and check a keys file; any problem is a one-line ``VlmtuneError`` naming the entry (not the key)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise VlmtuneError(f"cannot read keys file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise VlmtuneError(f"keys file {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or not data:
        raise VlmtuneError(f'keys file {path}: expected a JSON object of key -> budget, e.g. {{"<key>": 8000}}')
    keys: dict[str, KeySpec] = {}
    for n, (key, value) in enumerate(data.items(), 1):
        if not key.strip() or key != key.strip() or any(c.isspace() for c in key):
            raise VlmtuneError(f"keys file {path}: key #{n} is empty or contains whitespace")
        try:
            keys[key] = KeySpec.model_validate(value if isinstance(value, dict) else {"queries": value})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "queries"
            raise VlmtuneError(
                f"keys file {path}: key #{n}: {field} must be a whole number >= 0 or null, got {err['input']!r}"
            ) from None
        if len(key) < MIN_KEY_CHARS:
            log.warning("keys file %s: key #%d has %d characters; use >= %d random ones", path, n, len(key), 32)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("keys file %s can be read by other users (mode %o): chmod 600 %s", path, mode & 0o777, path)
    return keys


def generate_keys(path: Path, queries: int | None) -> dict[str, KeySpec]:
    """Reuse the keys file at ``path`` or create it (mode 0600) with one fresh random key."""
    if path.is_file():
        return load_keys(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({key: queries}, indent=1) + "\n"), mode=0o600)
    return {key: KeySpec(queries=queries)}


class UsageStore:
    """Per-key counters (queries, work, uploads) in one SQLite file; thread-safe, durable, restart-proof."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 like keys.json (it holds key hashes and usage); SQLite gives its -wal / -shm files the same mode
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        for existing in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            if existing.exists():
                existing.chmod(0o600)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, queries INTEGER NOT NULL DEFAULT 0, "
                "work INTEGER NOT NULL DEFAULT 0, uploads INTEGER NOT NULL DEFAULT 0)"
            )

    def account(self, key: str, spec: KeySpec) -> StoredBudget:
        kid = key_id(key)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO usage (key) VALUES (?)", (kid,))
        return StoredBudget(self, kid, spec.queries, spec.work)

    def row(self, kid: str) -> tuple[int, int, int]:
        with self._lock:
            row = self._db.execute("SELECT queries, work, uploads FROM usage WHERE key = ?", (kid,)).fetchone()
        return tuple(row) if row else (0, 0, 0)

    def execute(self, sql: str, args: tuple) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


class StoredBudget(QueryBudget):
    """A ``QueryBudget`` whose counters live in a ``UsageStore`` (shared by every process serving the file)."""

    def __init__(self, store: UsageStore, kid: str, limit: int | None, work_limit: int | None) -> None:
        super().__init__(limit, work_limit=work_limit)
        self.store, self.kid = store, kid

    @property
    def used(self) -> int:
        return self.store.row(self.kid)[0]

    @property
    def work_used(self) -> int:
        return self.store.row(self.kid)[1]

    @property
    def uploads(self) -> int:
        return self.store.row(self.kid)[2]

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def charge(self, n: int, work: int = 0) -> None:
        if n < 0 or work < 0:
            raise ValueError("cannot charge a negative amount")
        changed = self.store.execute(
            "UPDATE usage SET queries = queries + ?, work = work + ? WHERE key = ? "
            "AND (? IS NULL OR queries + ? <= ?) AND (? IS NULL OR work + ? <= ?)",
            (n, work, self.kid, self.limit, n, self.limit, self.work_limit, work, self.work_limit),
        )
        if changed == 1:
            return
        used, work_used, _ = self.store.row(self.kid)
        if self.limit is not None and used + n > self.limit:
            raise BudgetExceeded(n, used, self.limit)
        raise BudgetExceeded(work, work_used, int(self.work_limit or 0), "work")

    def refund(self, n: int, work: int = 0) -> None:
        self.store.execute(
            "UPDATE usage SET queries = MAX(0, queries - ?), work = MAX(0, work - ?) WHERE key = ?",
            (n, work, self.kid),
        )

    def record_uploads(self, n: int) -> None:
        self.store.execute("UPDATE usage SET uploads = uploads + ? WHERE key = ?", (n, self.kid))


def key_budget(key: str, spec: KeySpec | QueryBudget, store: UsageStore | None) -> QueryBudget:
    """A key's budget: a ``QueryBudget`` given as is, or its ``KeySpec``'s account in ``store`` (in memory without
    a store; then it does not survive a restart)."""
    if isinstance(spec, QueryBudget):
        return spec
    return store.account(key, spec) if store is not None else QueryBudget(spec.queries, work_limit=spec.work)


def state_paths(state_dir: str | Path) -> tuple[Path, Path]:
    """(generated keys file, usage database) of a service state folder."""
    folder = Path(state_dir).expanduser()
    return folder / "keys.json", folder / "usage.sqlite"
