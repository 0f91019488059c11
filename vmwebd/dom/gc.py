"""Collecting tombstones once every host has them (causal stability), never by a timer alone.

A deletion is a tombstone (docs/dom.md) and must stay until no replica can bring the entity back:
a host that never saw the tombstone would keep the entity alive, and would hand it back to a host
that had forgotten it. So each host publishes, in its own ``host`` record, its *complete version
vector* (``cvv``: for each origin, the stamp up to which it holds every part that origin wrote, or
a newer version of it; see docs/gossip.md), written once everything it covers is on disk (a
barrier on the store's writer first), whenever it moved on and at least every minute. A host may
forget a tombstoned entity when

1. the tombstone is older than the settle time (a message from before the deletion may still be
   on its way; a few seconds would do, the default is minutes), and this host holds everything
   every host wrote up to the tombstone's stamp (so any earlier state of the entity is covered by
   its vector: see below),
2. every host in the DOM or known to the peer layer (alive, dead or departed: each may come back;
   one whose record has not arrived counts as holding nothing) has published a vector covering
   every part of the entity, and so does this host's own current vector.

Then every replica holds the tombstone, which beats every older state of the main part, and no
host writes a sub-part to a deleted entity (``Dom.put`` refuses). Anti-entropy never sends the
entity again (its stamps are below everybody's vector). A state of it that still arrives (a rumor
sent before the sender saw the tombstone) has a main part older than the tombstone, so covered by
our own vector: the entity is unknown here although we held that part or a newer one, so we
forgot it on purpose, and the gossip layer drops it (:func:`forgotten`).

A host that never comes back keeps every tombstone from being collected: its record stays in the
DOM, and the host view shows it dead.
"""

from __future__ import annotations

import re
from typing import Iterable

from lxml import etree

from vmwebd.dom.document import Dom, entity_key, part_versions
from vmwebd.dom.hlc import Version
from vmwebd.dom.records import HostRec
from vmwebd.ids import HOST_ID_PATTERN

#: Lease records carry the Paxos ballot that decided them as their version, not their writer's
#: clock: a host records a commit it learns late with an older stamp than writes it already
#: claimed, so a complete vector does not prove it holds a lease record. Their tombstones stay.
NEVER_COLLECTED = frozenset({"lease"})
_ENTRY = re.compile(rf"^({HOST_ID_PATTERN}):(\d{{1,15}})\.(\d{{1,9}})$")
#: An attribute longer than this is not published (collection waits): the schema's text limit.
MAX_CVV_CHARS = 4000

Vector = dict[str, tuple[int, int]]


def format_cvv(cvv: Vector) -> str:
    """``{"h1": (1700000000000, 3)}`` → ``"h1:1700000000000.3"`` (sorted, space-separated);
    empty when too long to publish (then no tombstone is collected, which is safe)."""
    text = " ".join(f"{o}:{w}.{c}" for o, (w, c) in sorted(cvv.items()))
    return text if len(text) <= MAX_CVV_CHARS else ""


def parse_cvv(text: str) -> Vector:
    """The inverse of :func:`format_cvv`; malformed entries are ignored (they only cover less)."""
    out: Vector = {}
    for item in (text or "").split():
        m = _ENTRY.match(item)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def collectable(
    dom: Dom, own_cvv: Vector, now_ms: int, settle_ms: int, members: Iterable[str] = (), limit: int = 500
) -> list[tuple[str, str]]:
    """The (kind, id) of the tombstoned entities this host may forget now (see the module doc).

    ``members`` are the hosts the peer layer knows, whatever their state: a host whose record has
    not reached us yet still counts, as one that holds nothing (its record may be on its way, and
    it may hold the entity alive). At most ``limit`` per call: a pass runs on the reactor, and
    the next heartbeat takes the rest."""
    published = {h.id: parse_cvv(h.cvv) for h in dom.all(HostRec)}
    for m in members:
        published.setdefault(m, {})
    if not published:
        return []
    vectors = list(published.values()) + [own_cvv]
    origins = set(published) | set(own_cvv)
    none = (-1, -1)
    # What every host holds, per origin; and how far we hold everything from everyone.
    held_by_all = {o: min(v.get(o, none) for v in vectors) for o in origins | {o for v in vectors for o in v}}
    ours_everywhere = min((own_cvv.get(o, none) for o in origins), default=none)
    out = []
    for el in dom.tombstones(skip=NEVER_COLLECTED):
        tomb = Version.parse(el.get("v"))
        if now_ms - tomb.wall_ms < settle_ms:
            continue
        # We hold everything every host wrote up to the tombstone: any earlier state of the
        # entity's main part that could still arrive is covered, so `forgotten` will know it.
        if ours_everywhere < tomb.stamp:
            continue
        if all(v.stamp <= held_by_all.get(v.origin, none) for v in part_versions(el)):
            out.append(entity_key(el))
            if len(out) >= limit:
                break
    return out


def forgotten(dom: Dom, own_cvv: Vector, el: etree._Element) -> bool:
    """Is ``el`` (from a peer) a state of an entity this host collected? Unknown here, and its main
    part covered by our vector: we held that main part or a newer one, and only collection
    removes entities. (Its sub-parts do not matter: the entity was deleted.)"""
    kind, id_ = entity_key(el)
    if kind not in dom._index or kind in NEVER_COLLECTED:
        return False  # not an entity (the merge refuses it with the reason), or never collected
    if dom._index[kind].get(id_) is not None:
        return False
    main = part_versions(el)[0]
    return main.stamp <= own_cvv.get(main.origin, (-1, -1))
