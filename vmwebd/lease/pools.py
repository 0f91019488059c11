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


def ip_candidates(pool: IpPool, taken: Callable[[str], bool], n: int,
                  exclude: set[str] = frozenset()) -> list[str]:
    """The first ``n`` free addresses in pool order (lowest first: readable for lab users)."""
    out = []
    for addr in pool.addresses():
        a = str(addr)
        if a in exclude or taken(ip_key(pool.name, a)):
            continue
        out.append(a)
        if len(out) == n:
            break
    return out


def mac_candidates(pool: MacPool, taken: Callable[[str], bool], n: int, rng: random.Random,
                   exclude: set[str] = frozenset(), max_draws: int = 100_000) -> list[str]:
    """``n`` free MACs drawn at random under the prefix (at most ``max_draws`` draws)."""
    out: list[str] = []
    for _ in range(max_draws):
        if len(out) == n:
            break
        tail = rng.getrandbits(24)
        mac = f"{pool.prefix}:{tail >> 16 & 0xff:02x}:{tail >> 8 & 0xff:02x}:{tail & 0xff:02x}"
        if mac in exclude or mac in out or taken(mac_key(mac)):
            continue
        out.append(mac)
    return out


def vni_candidates(pool: VniRange, taken: Callable[[str], bool], n: int,
                   exclude: set[int] = frozenset()) -> list[int]:
    out = []
    for v in range(pool.first, pool.last + 1):
        if v in exclude or taken(vni_key(v)):
            continue
        out.append(v)
        if len(out) == n:
            break
    return out
