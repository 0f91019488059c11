"""The rumor queue: what this host still has to spread, and how many times.

Each rumor has a key (a member, or a DOM entity) so that a newer rumor about the same thing
replaces the older one. A rumor is sent at most ``limit(n)`` times, ``retransmit_mult *
ceil(log10(n + 1))`` for a grid of ``n`` hosts, which is enough for epidemic spread to reach every
host with high probability (memberlist's rule). The least-sent rumors go first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Item:
    key: tuple
    payload: object
    size: int
    sent: int
    order: int


class BroadcastQueue:
    def __init__(self, retransmit_mult: int):
        self.retransmit_mult = retransmit_mult
        self._items: dict[tuple, _Item] = {}
        self._order = 0

    def limit(self, n_hosts: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n_hosts + 1)))

    def put(self, key: tuple, payload, size: int) -> None:
        """Queues a rumor, replacing any older one with the same key (its count restarts)."""
        self._order += 1
        self._items[key] = _Item(key, payload, size, 0, self._order)

    def __len__(self) -> int:
        return len(self._items)

    def take(self, budget: int, n_hosts: int) -> list:
        """Rumors for one message, at most ``budget`` bytes; counts them as sent once more."""
        if not self._items:
            return []
        lim = self.limit(n_hosts)
        out, used = [], 0
        for item in sorted(self._items.values(), key=lambda i: (i.sent, -i.order)):
            if used + item.size > budget and out:
                continue
            out.append(item.payload)
            used += item.size
            item.sent += 1
            if item.sent >= lim:
                del self._items[item.key]
        return out
