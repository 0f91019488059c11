"""Hybrid logical clock versions.

Every part of every entity in the cluster DOM carries a :class:`Version`: a hybrid logical clock
reading (wall-clock milliseconds plus a counter) and the id of the host that wrote it. Versions are
totally ordered, so "the newer one wins" is well defined on every replica; the origin breaks ties
between hosts that wrote in the same millisecond with the same counter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from vmwebd.ids import HOST_ID_PATTERN

_VERSION_RE = re.compile(rf"^(\d{{1,15}})\.(\d{{1,9}})@({HOST_ID_PATTERN})$")


@dataclass(frozen=True, order=True, slots=True)
class Version:
    wall_ms: int
    counter: int
    origin: str

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}@{self.origin}"

    @classmethod
    def parse(cls, text: str | None) -> "Version":
        m = _VERSION_RE.match(text or "")
        if not m:
            raise ValueError(f"not a version: {text!r} (expected WALLMS.COUNTER@HOST)")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3))

    @property
    def stamp(self) -> tuple[int, int]:
        """The clock reading without the origin, as kept in version vectors."""
        return (self.wall_ms, self.counter)


class HybridClock:
    """A hybrid logical clock for one host.

    ``now_ms`` is injected (a reactor's ``seconds()`` scaled, or a simulator's clock), so tests and
    the simulator are deterministic. A reading is always greater than every reading this clock has
    produced or observed, even when the wall clock steps backwards.
    """

    def __init__(self, origin: str, now_ms: Callable[[], int]):
        self.origin = origin
        self._now_ms = now_ms
        self._wall = 0
        self._counter = 0

    def tick(self) -> Version:
        now = int(self._now_ms())
        if now > self._wall:
            self._wall, self._counter = now, 0
        else:
            self._counter += 1
        return Version(self._wall, self._counter, self.origin)

    def reading(self) -> tuple[int, int]:
        """The latest stamp this clock produced or observed (no tick)."""
        return (self._wall, self._counter)

    def observe(self, seen: Version) -> None:
        """Moves the clock past a version received from elsewhere (so our next write is newer)."""
        if seen.stamp > (self._wall, self._counter):
            self._wall, self._counter = seen.wall_ms, seen.counter
