"""The DOM as the gossip core sees it: merge, delta, sizes and versions — nothing of the schema."""

from __future__ import annotations

import copy

from twisted.logger import Logger

from vmwebd.dom.document import Dom, before, entity_bytes, entity_key, part_versions
from vmwebd.dom.gc import forgotten
from vmwebd.errors import MalformedRequest

log = Logger()


class DomPortAdapter:
    """Adapts a :class:`~vmwebd.dom.document.Dom` to :class:`vmwebd.gossip.core.DomPort`.

    ``validate`` checks every entity from a peer against the schema (the daemon does; the
    simulator, whose entities are made by its own cores, may skip it for speed).
    """

    def __init__(self, dom: Dom, validate: bool = True, me: str | None = None, floor=None, complete=None):
        self.dom = dom
        self.validate = validate
        # ``floor()``: the lowest version this host (``me``) may still write below its latest
        # stamp (a lease ballot, see LeaseService.open_ballot_floor), or None. Claims about our
        # own writes stay below it, so a peer never counts itself complete past a record to come.
        self.me = me
        self.floor = floor
        self.rejected = 0
        # ``complete()``: this host's complete version vector (the gossip core's, which is built
        # on this adapter: a callable breaks that cycle); states of entities collected here are
        # dropped (vmwebd/dom/gc.py).
        self.complete = complete
        self.forgotten = 0

    def merge(self, entities) -> list:
        changed = []
        for el in entities:
            try:
                if self.dom.holds(el):  # a duplicate or an older state: nothing to do
                    continue
                if self.complete is not None and forgotten(self.dom, self.complete(), el):
                    self.forgotten += 1
                    continue
                if self.dom.merge(el, validate=self.validate):
                    kind, id_ = entity_key(el)
                    changed.append(copy.deepcopy(self.dom._index[kind][id_]))
            except (MalformedRequest, ValueError) as e:
                self.rejected += 1
                log.warn("refused an entity from a peer: {err}", err=e)
        return changed

    def delta(self, theirs, mine_complete, budget, held=None):
        theirs = {o: tuple(s) for o, s in theirs.items()}
        low = self.floor() if self.floor is not None else None
        if low is not None and self.me in mine_complete and mine_complete[self.me] >= low.stamp:
            mine_complete = {**mine_complete, self.me: before(low.stamp)}
        skip = self.dom.matched(theirs, held) if held else {}
        for origin, stamp in skip.items():
            # They hold what we hold from ``origin`` up to ``stamp``; complete up to it as far
            # as we are ourselves.
            mine = mine_complete.get(origin)
            if mine is not None and min(stamp, mine) > theirs.get(origin, (-1, -1)):
                theirs[origin] = min(stamp, mine)
        return self.dom.delta(theirs, mine_complete, budget, skip)

    def held_above(self, complete) -> dict:
        return self.dom.held_above(complete)

    def size_of(self, el) -> int:
        return len(entity_bytes(el))

    def key_of(self, el) -> tuple:
        return entity_key(el)

    def stamps_of(self, el) -> list:
        return [(v.origin, v.stamp) for v in part_versions(el)]
