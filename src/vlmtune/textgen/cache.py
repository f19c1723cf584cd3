"""Every generated text, stored once with its provenance, in one SQLite file that can be copied and shared.

Key = SHA-256 of (backend, model, prompt, image content hash, generation settings). A row holds the text, the
SHA-256 of the text (a damaged row is a miss and is generated again) and the provenance (backend, model id and
revision, settings, prompt, image hash, date). ``vlmtune textgen`` fills a cache on one machine (a GPU box);
methods read the same file anywhere else and never load the generator when every text they need is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError
from vlmtune.textgen.base import GenSettings

log = logging.getLogger(__name__)
FILENAME = "texts.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    provenance TEXT NOT NULL
)
"""


def text_key(backend: str, model: str, prompt: str, image_hash: str | None, settings: GenSettings) -> str:
    """The cache key of one generation (image_hash: SHA-256 of the image's bytes, None for text-only prompts)."""
    blob = json.dumps(
        {"backend": backend, "model": model, "prompt": prompt, "image": image_hash, "settings": settings.to_json()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    key: str
    text: str
    provenance: dict[str, Any]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _text(value: object) -> str | None:
    """A stored TEXT value (read as bytes) as a string; None when it is not valid UTF-8 text (a damaged row)."""
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


class TextCache:
    """``<root>/texts.sqlite``; ``root=None`` keeps the texts in memory (nothing written)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        self.path = self.root / FILENAME if self.root is not None else None
        self._conn: sqlite3.Connection | None = None
        if self.path is not None and self.path.exists():
            self._db  # noqa: B018 (a damaged file is refused now, not at the first text)

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, opened on first use (a run that asks for no text creates no file)."""
        if self._conn is None:
            if self.root is not None:
                self.root.mkdir(parents=True, exist_ok=True)
            try:
                target = str(self.path) if self.path else ":memory:"
                conn = sqlite3.connect(target, timeout=30, check_same_thread=False)  # writes stay on one thread
                conn.text_factory = bytes  # decoded row by row: one undecodable row is a miss, not an error
                conn.execute(_SCHEMA)
                conn.commit()
            except sqlite3.DatabaseError as exc:
                raise VlmtuneError(
                    f"text cache {self.path} is damaged or not a vlmtune text cache ({exc}): move it away to start anew"
                ) from None
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """SQLite errors of a damaged file as one line (never its message: it may quote the stored text)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise VlmtuneError(
                f"text cache {self.path} is damaged ({type(exc).__name__}): move it away to start anew"
            ) from None

    def __len__(self) -> int:
        with self._reading():
            return int(self._db.execute("SELECT COUNT(*) FROM texts").fetchone()[0])

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The stored texts of ``keys`` that exist and are intact (a row whose checksum fails is logged, a miss)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            with self._reading():
                rows = self._db.execute(
                    f"SELECT key, text, text_sha256 FROM texts WHERE key IN ({marks})", chunk
                ).fetchall()
            for raw_key, raw_text, raw_digest in rows:
                key, text, digest = _text(raw_key), _text(raw_text), _text(raw_digest)
                if key is not None and text is not None and _sha(text) == digest:
                    found[key] = text
                else:
                    log.warning("text cache %s: an entry is damaged; it will be generated again", self.path)
        return found

    def put_many(self, entries: Iterable[Entry]) -> None:
        """Store entries (one transaction: a stop in the middle of a batch loses that batch only)."""
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        rows = [(e.key, e.text, _sha(e.text), json.dumps({**e.provenance, "date": date})) for e in entries]
        with self._reading(), self._db:
            self._db.executemany("INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?)", rows)

    def entries(self) -> Iterator[Entry]:
        """Every intact entry, in insertion order (damaged rows are logged and skipped)."""
        with self._reading():
            rows = self._db.execute("SELECT key, text, text_sha256, provenance FROM texts ORDER BY rowid").fetchall()
        for row in rows:
            key, text, digest, prov = map(_text, row)
            provenance = _json_object(prov)
            if key is None or text is None or _sha(text) != digest or provenance is None:
                log.warning("text cache %s: an entry is damaged; skipped", self.path)
                continue
            yield Entry(key, text, provenance)


def _json_object(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
