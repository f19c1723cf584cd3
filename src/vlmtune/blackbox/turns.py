"""Fair turns on the one served model: computation slices granted round-robin over the keys that wait.

A service holds one model, and one computation runs on it at a time (its hooks and buffers are shared). A lock
alone serves whoever asks first and holds the model for a whole request: a key's 64-candidate visual-prompt
request held it for 75 s while another key's one-image query waited 74 s. Here a request computes in slices (one
text-tower pass, one image-tower batch) and, between slices, hands the model to the next key in line, if any:
a waiting key gets the model after at most one slice of every key ahead of it, however long their requests are.
Within a key, requests are served in arrival order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class FairTurns:
    """A lock over one model, granted round-robin over keys (``turn(key)``); ``between(key)`` inside a turn lets
    the next waiting key compute one slice first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: dict[Hashable, deque[object]] = {}  # key -> its waiting tickets, in arrival order
        self._rotation: deque[Hashable] = deque()  # keys with waiting tickets, in turn order
        self._granted: object | None = None  # the ticket the model was just handed to
        self.handovers = 0  # turns handed to another waiting request (for tests)

    def acquire(self, key: Hashable) -> None:
        with self._cond:
            if not self._busy and not self._rotation:
                self._busy = True
                return
            self._wait(self._enqueue(key))

    def release(self) -> None:
        with self._cond:
            self._hand_over()

    @contextmanager
    def turn(self, key: Hashable) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release()

    def between(self, key: Hashable) -> None:
        """Between two slices of ``key``'s computation: if another request waits, ``key`` takes its place in line
        (behind every key that waits) and the model passes to the next in turn."""
        with self._cond:
            if not self._rotation:
                return
            ticket = self._enqueue(key)
            self._hand_over()
            self._wait(ticket)

    # ---- under self._cond ----
    def _enqueue(self, key: Hashable) -> object:
        ticket = object()
        if key not in self._waiting:
            self._waiting[key] = deque()
            self._rotation.append(key)
        self._waiting[key].append(ticket)
        return ticket

    def _wait(self, ticket: object) -> None:
        while self._granted is not ticket:
            self._cond.wait()
        self._granted = None

    def _hand_over(self) -> None:
        """The model passes to the first waiting ticket of the next key in turn (or becomes free)."""
        if not self._rotation:
            self._busy = False
            return
        key = self._rotation.popleft()
        tickets = self._waiting[key]
        self._granted = tickets.popleft()  # the model passes to it: it stays busy
        if tickets:
            self._rotation.append(key)  # its next request waits for the other keys' turns
        else:
            del self._waiting[key]
        self.handovers += 1
        self._cond.notify_all()
