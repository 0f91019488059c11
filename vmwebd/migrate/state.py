"""What every host needs to know about migrations under way (no I/O, no Twisted)."""

from __future__ import annotations

from vmwebd.dom.records import LeaseRec, MigrationRec

TERMINAL = ("done", "failed")
#: A migration not finished after this long is abandoned by everyone (its hosts crashed).
STALE_MS = 15 * 60 * 1000
#: Ended migrations are kept this long (the web and `vmweb migrations` show them, the balancer's
#: min-residence reads them: its setting is at most 7 days), then deleted by their source host.
HISTORY_MS = 8 * 24 * 3600 * 1000


def expired(migrations, host_id: str, now_ms: int, dom) -> list[MigrationRec]:
    """Of ``migrations``, the ended ones older than HISTORY_MS that ``host_id`` deletes: the
    source's, or, for an evacuation (its source is dead), the destination's; abandoned ones by
    their source too (``dom``: where hand-overs are looked up, see :func:`stale`)."""
    out = []
    for m in migrations:
        ended = m.phase in TERMINAL or stale(m, now_ms, dom)
        owner = m.dest if m.mode == "evacuate" else m.source
        if ended and owner == host_id and now_ms - max(m.finished_at, m.started_at) >= HISTORY_MS:
            out.append(m)
    return out


def lease_key(vm_id: str) -> str:
    """The consensus lease that makes one migration of a VM at a time."""
    return f"migration/{vm_id}"


def lease_holder(vm_id: str, mid: str) -> str:
    return f"migration:{vm_id}#{mid}"


def handover_key(mid: str) -> str:
    """The consensus lease that decides who has a cold move saved at its source: the destination,
    to restore it there, or whoever fails the move, to restore it at the source. Held until the
    migration entity is deleted: a destination that has not yet heard of the failure must still
    find it taken."""
    return f"handover/{mid}"


#: The two holders of a hand-over lease: the destination restoring, or the move failed.
RESTORE, FAIL = "restore", "fail"


def handover_holder(side: str, mid: str) -> str:
    return f"handover:{side}#{mid}"


def held_by_dest(dom, m: MigrationRec) -> bool:
    """Has the destination of cold move ``m`` taken its hand-over (to restore the saved VM)?

    Such a move is never abandoned: the saved VM is the destination's, which may have restored
    it already (its ``restored`` not heard yet, the host cut off). Restarting the VM at the
    source once the move went stale would then run it twice, with one address. The move ends
    when the destination comes back (it restores the VM, the source finishes), when the
    destination fails its own restore, or when an admin evacuates the destination (the move is
    failed and the source restores the VM: ``MigrationManager.evacuate``)."""
    rec = dom.get(LeaseRec, handover_key(m.id))
    return rec is not None and rec.holder == handover_holder(RESTORE, m.id)


def stale(m: MigrationRec, now_ms: int, dom) -> bool:
    """Is ``m`` abandoned: unfinished after STALE_MS (its hosts crashed), and not held by its
    destination (``held_by_dest``, looked up in ``dom``)? Everyone leaves an abandoned move, and
    the reconciler gives its lease back."""
    if m.phase in TERMINAL or now_ms - m.started_at < STALE_MS:
        return False
    return not held_by_dest(dom, m)


def in_flight(dom, now_ms: int) -> dict[str, MigrationRec]:
    """VM id -> its unfinished, not abandoned migration."""
    out = {}
    for m in dom.all(MigrationRec):
        if m.phase not in TERMINAL and not stale(m, now_ms, dom):
            out[m.vm] = m
    return out
