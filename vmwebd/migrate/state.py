"""What every host needs to know about migrations under way (no I/O, no Twisted)."""
from __future__ import annotations

from vmwebd.dom.records import MigrationRec

TERMINAL = ("done", "failed")
#: A migration not finished after this long is abandoned by everyone (its hosts crashed).
STALE_MS = 15 * 60 * 1000


def lease_key(vm_id: str) -> str:
    """The consensus lease that makes one migration of a VM at a time."""
    return f"migration/{vm_id}"


def lease_holder(vm_id: str, mid: str) -> str:
    return f"migration:{vm_id}#{mid}"


def in_flight(dom, now_ms: int) -> dict[str, MigrationRec]:
    """VM id -> its unfinished, not abandoned migration."""
    out = {}
    for m in dom.all(MigrationRec):
        if m.phase not in TERMINAL and now_ms - m.started_at < STALE_MS:
            out[m.vm] = m
    return out
