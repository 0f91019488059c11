"""The last bytes a VM's console printed, bounded, so a page shows the last lines at once."""

from __future__ import annotations

#: What a ring keeps by default: a few screens of a busy console.
RING_BYTES = 64 * 1024


class ConsoleRing:
    """The last ``capacity`` bytes written, and how many were written in all (``total``).

    Kept as one ``bytearray`` trimmed from the front: a console writes a few KB/s at most (a
    115200-baud serial line), so copying at most ``capacity`` bytes per append costs nothing."""

    def __init__(self, capacity: int = RING_BYTES):
        if capacity < 1:
            raise ValueError("a console ring holds at least one byte")
        self.capacity = capacity
        self.total = 0
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        if len(data) >= self.capacity:
            self._buf[:] = data[-self.capacity :]
            return
        self._buf += data
        over = len(self._buf) - self.capacity
        if over > 0:
            del self._buf[:over]

    def snapshot(self) -> bytes:
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)
