"""Images a method may read without learning where they came from: an opaque, index-addressed source.

A label-free method must not see the labels of its unlabelled images, nor anything that gives them away: on
Caltech101, DTD, EuroSAT, Food101, SUN397 or UCF101 a file's path names its class folder, and Oxford Pets' file
names carry the breed. ``ImageSource`` therefore holds no path, sample id, label or split: ``image(i)`` reads the
i-th image and ``content_hash(i)`` hashes its bytes (cache keys), through a reader kept in this module's private
table under an opaque token. Nothing reachable from the object by attributes, containers or closures leads to the
split (``tests/test_label_free_contract.py`` walks it); the runner-side code that must record where an image came
from (the text stage's provenance) asks ``sample_id(source, i)``.

The table entry lives as long as the source; worker processes forked from the owner (DataLoader workers) inherit
it, a process that merely unpickles a source has no reader and says so.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import weakref
from typing import TYPE_CHECKING

from PIL import Image

from vlmtune._io import file_sha256

if TYPE_CHECKING:
    from vlmtune.data.base import DatasetSplit

_READERS: dict[int, DatasetSplit] = {}
_TOKENS = itertools.count(1)


def _drop(token: int) -> None:
    _READERS.pop(token, None)


class ImageSource:
    """The images of a split by position only: ``len``, ``image(i)`` (RGB PIL), ``content_hash(i)``, ``dataset``."""

    __slots__ = ("__weakref__", "_n", "_token", "dataset")

    def __init__(self, split: DatasetSplit) -> None:
        self._token = next(_TOKENS)
        self._n = len(split)
        self.dataset = split.dataset
        _READERS[self._token] = split
        weakref.finalize(self, _drop, self._token)

    def _split(self) -> DatasetSplit:
        try:
            return _READERS[self._token]
        except KeyError:
            raise RuntimeError("this image source belongs to another process (sources are not transferable)") from None

    def __len__(self) -> int:
        return self._n

    def image(self, i: int) -> Image.Image:
        return self._split().image(int(i))

    def content_hash(self, i: int) -> str:
        """SHA-256 of the image's file, or of its PNG encoding for generated images."""
        split = self._split()
        path = split.file_path(int(i))
        if path is not None:
            return file_sha256(path)
        buf = io.BytesIO()
        split.image(int(i)).save(buf, format="PNG")
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def __copy__(self) -> ImageSource:
        return self  # immutable; a copy would share the token but not its lifetime

    def __deepcopy__(self, memo: dict[int, object]) -> ImageSource:
        return self

    def __repr__(self) -> str:
        return f"ImageSource({self.dataset!r}, {self._n} images)"


def sample_id(source: ImageSource, i: int) -> str:
    """The sample id of ``source``'s i-th image (runner-side provenance only; methods have no use for it)."""
    return source._split().ids[int(i)]
