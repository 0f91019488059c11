"""Lease keys, and free candidates from the configured pools.

The pools themselves (:class:`vmwebd.config.IpPool`, ``MacPool``, ``VniRange``) say which
addresses exist; this module proposes free ones given a ``taken(key)`` predicate (the local
replica of the lease table). Uniqueness is the lease table's job, not this module's: a candidate
that turns out taken is simply retried.
"""

from __future__ import annotations

import random
from typing import Callable

from vmwebd.config import IpPool, MacPool, VniRange


def ip_key(pool: str, addr: str) -> str:
    return f"ip/{pool}/{addr}"


def mac_key(mac: str) -> str:
    return f"mac/{mac}"


def vni_key(vni: int) -> str:
    return f"vni/{vni}"


def name_key(kind: str, name: str) -> str:
    return f"name/{kind}/{name}"


def ip_candidates(
    pool: IpPool,
    taken: Callable[[str], bool],
    n: int,
    exclude: set[str] = frozenset(),
    rng: random.Random | None = None,
    spread: int = 0,
    lane: tuple[int, int] = (0, 1),
) -> list[str]:
    """``n`` free addresses: the lowest ones (readable for lab users), or — with ``rng`` and
    ``spread`` > 0, after a conflict — ``n`` drawn at random among the first ``n + spread`` free
    ones, so that hosts allocating at the same moment stop competing for the same addresses.
    ``lane = (i, m)``: only addresses whose place in the pool is i modulo m (hosts in different
    lanes never propose the same ones, whatever their replicas know), any free ones when the
    lane has too few."""
    if lane[1] > 1:
        mine = ip_candidates(_Lane(pool, lane), taken, n, exclude, rng, spread)
        if len(mine) == n:
            return mine
    out = []
    want = n + (spread if rng is not None else 0)
    for addr in pool.addresses():
        a = str(addr)
        if a in exclude or taken(ip_key(pool.name, a)):
            continue
        out.append(a)
        if len(out) == want:
            break
    if rng is not None and spread and len(out) > n:
        out = sorted(rng.sample(out, n), key=lambda a: tuple(int(x) for x in a.split(".")))
    return out[:n]


def mac_candidates(
    pool: MacPool,
    taken: Callable[[str], bool],
    n: int,
    rng: random.Random,
    exclude: set[str] = frozenset(),
    max_draws: int = 100_000,
) -> list[str]:
    """``n`` free MACs drawn at random under the prefix (at most ``max_draws`` draws)."""
    out: list[str] = []
    for _ in range(max_draws):
        if len(out) == n:
            break
        tail = rng.getrandbits(24)
        mac = f"{pool.prefix}:{tail >> 16 & 0xFF:02x}:{tail >> 8 & 0xFF:02x}:{tail & 0xFF:02x}"
        if mac in exclude or mac in out or taken(mac_key(mac)):
            continue
        out.append(mac)
    return out


class _Lane:
    """The addresses of ``pool`` at places i, i + m, i + 2m, ... (``lane = (i, m)``)."""

    def __init__(self, pool: IpPool, lane: tuple[int, int]):
        self.name, self._pool, self._lane = pool.name, pool, lane

    def addresses(self):
        i, m = self._lane
        for k, addr in enumerate(self._pool.addresses()):
            if k % m == i % m:
                yield addr


def vni_candidates(
    pool: VniRange,
    taken: Callable[[str], bool],
    n: int,
    exclude: set[int] = frozenset(),
    rng: random.Random | None = None,
    spread: int = 0,
    lane: tuple[int, int] = (0, 1),
) -> list[int]:
    """Like :func:`ip_candidates`, for network ids."""
    i, m = lane
    if m > 1:
        mine = [
            v
            for v in vni_candidates(
                pool,
                lambda key: taken(key) or (int(key[4:]) - pool.first) % m != i % m,
                n,
                exclude,
                rng,
                spread,
            )
        ]
        if len(mine) == n:
            return mine
    out = []
    want = n + (spread if rng is not None else 0)
    for v in range(pool.first, pool.last + 1):
        if v in exclude or taken(vni_key(v)):
            continue
        out.append(v)
        if len(out) == want:
            break
    if rng is not None and spread and len(out) > n:
        out = sorted(rng.sample(out, n))
    return out[:n]
