"""The cluster DOM: one XML document, replicated on every host, with typed access by id.

Each entity element carries a version per part (see :mod:`vmwebd.dom.records`). The merge of two
states of an entity keeps, part by part, the one with the greater version (ties broken by the
canonical bytes, so the result never depends on who merges first). It is therefore commutative,
associative and idempotent — a state-based CRDT — and deletions are tombstones that merge like any
other write. ``tests/test_dom_merge.py`` checks those laws with hypothesis.

The live document is an lxml tree; a dict index maps (kind, id) to its element, so no lookup ever
runs XPath. This module does no I/O: :mod:`vmwebd.dom.persist` makes it durable.
"""

from __future__ import annotations

import copy
import hashlib
from importlib import resources
from typing import Callable, Collection, Iterator, TypeVar

from lxml import etree
from sortedcontainers import SortedList

from vmwebd import xmlsafe
from vmwebd.dom.hlc import HybridClock, Version
from vmwebd.dom.records import CONTAINERS, NS, PARTS, RECORD_TYPES, Record
from vmwebd.dom.validate import document_error, entity_error
from vmwebd.errors import MalformedRequest

#: Checkpoints per origin in a :meth:`Dom.held_above` summary, parts summarised at most per
#: origin, and hex digits of each checkpoint's hash (128 bits: a false match would leave a part
#: missing for good).
SUMMARY_CHECKPOINTS = 16
SUMMARY_MAX_PARTS = 20_000
SUMMARY_HEX = 32
#: Sorts after every (kind, id, part) of the same stamp (range ends in the stamp index).
_AFTER_ALL = "\U0010ffff"

R = TypeVar("R", bound=Record)
_Q = "{%s}" % NS
_MAX_ENTITY_BYTES = 256 * 1024
_PARSER = xmlsafe.parser(remove_blank_text=True)
_SCHEMA = None
# Main-part attributes with a secondary index (kind -> attributes): the reads that select by them
# (a host's VMs, a cluster's VMs, an owner's clusters) then cost what they return, not the DOM's size.
INDEXED: dict[str, tuple[str, ...]] = {
    "vm": ("host", "cluster"),
    "vcluster": ("owner",),
    "audit": ("host", "user"),
}
_DIGEST_MOD = 1 << 256
#: An entity's parts as (origin, stamp, part name), the main part named "" (the origin index).
_Stamps = tuple[tuple[str, tuple[int, int], str], ...]


def schema() -> etree.RelaxNG:
    global _SCHEMA
    if _SCHEMA is None:
        text = resources.files("vmwebd.dom").joinpath("schema.rng").read_bytes()
        _SCHEMA = etree.RelaxNG(etree.fromstring(text, _PARSER))
    return _SCHEMA


def relaxng_valid(el: etree._Element) -> bool:
    """Is entity ``el`` valid for libxml2's RelaxNG on schema.rng (in a document of its own)?
    The reference the linear validator is tested and measured against; exponential in optional
    attributes, so never used on a hot path."""
    kind = etree.QName(el).localname
    wrapper = etree.Element(_Q + "dom", nsmap={None: NS})  # type: ignore[dict-item]
    for k, cname in CONTAINERS.items():
        box = etree.SubElement(wrapper, _Q + cname)
        if k == kind:
            box.append(copy.deepcopy(el))
    return bool(schema().validate(wrapper))


def parse_xml(data: bytes, what: str, limit: int) -> etree._Element:
    """Parses XML from outside with :func:`vmwebd.xmlsafe.parse` (no DTD, no entities, no
    network, bounded size); a refusal is :class:`MalformedRequest` naming ``what``."""
    try:
        return xmlsafe.parse(data, what, limit, xml_parser=_PARSER)
    except xmlsafe.UnsafeXml as e:
        raise MalformedRequest(str(e)) from None


def _attrs(el: etree._Element) -> dict[str, str]:
    """An element's attributes as a dict (lxml gives str for str input; the stubs say str or bytes)."""
    return dict(el.attrib)  # type: ignore[arg-type]


def _version(el: etree._Element) -> Version:
    return Version.parse(el.get("v"))


def _part_children(el: etree._Element) -> dict[str, etree._Element]:
    names = PARTS[etree.QName(el).localname]
    return {
        etree.QName(c).localname: c
        for c in el
        if etree.QName(c).localname in names and etree.QName(c).namespace == NS
    }


def _canon(el: etree._Element, skip: Collection[etree._Element] = ()) -> bytes:
    """Canonical bytes of an element: independent of namespace prefixes and attribute order."""
    q = etree.QName(el)
    kids = b"".join(_canon(c) for c in el if c not in skip and isinstance(c.tag, str))
    attrs = repr(sorted(el.attrib.items()))
    return repr((q.namespace, q.localname, attrs, (el.text or "").strip())).encode() + b"[" + kids + b"]"


def _main_bytes(el: etree._Element) -> bytes:
    """Canonical bytes of an entity's main part (attributes + body, without sub-parts)."""
    return _canon(el, skip=tuple(_part_children(el).values()))


def _dominated(remote: etree._Element, local: etree._Element, rkids: int, lkids: int) -> bool:
    """Is part ``remote`` older than ``local``, or the same state (equal version and attributes,
    neither with child elements of its own)? False when unsure."""
    rv, lv = remote.get("v"), local.get("v")
    if rv == lv:
        return rkids == 0 and lkids == 0 and remote.attrib == local.attrib
    try:
        return Version.parse(rv) < Version.parse(lv)
    except (TypeError, ValueError):
        return False


def _newer(remote: etree._Element, local: etree._Element, main: bool) -> bool:
    rv, lv = _version(remote), _version(local)
    if rv != lv:
        return rv > lv
    if main:  # same version, different content: only after a broken clock; pick deterministically
        return _main_bytes(remote) > _main_bytes(local)
    return _canon(remote) > _canon(local)


class Dom:
    """One replica of the cluster DOM."""

    def __init__(self, clock: HybridClock):
        self.clock = clock
        self.root = etree.Element(_Q + "dom", nsmap={None: NS})  # type: ignore[dict-item]
        self.root.set("schema", "1")
        self._containers = {}
        for kind, cname in CONTAINERS.items():
            self._containers[kind] = etree.SubElement(self.root, _Q + cname)
        self._index: dict[str, dict[str, etree._Element]] = {k: {} for k in CONTAINERS}
        self._tombstones: set[tuple[str, str]] = set()  # (kind, id) of deleted entities
        self._listeners: list[Callable[[str, str], object]] = []
        # Decoded records by (kind, id) then record class; dropped on every change of the entity.
        self._decoded: dict[tuple[str, str], dict[type, Record | None]] = {}
        # (kind, attribute) -> value -> ids of live entities with it; and id -> value held there.
        self._by_attr: dict[tuple[str, str], dict[str, set[str]]] = {
            (k, a): {} for k, attrs in INDEXED.items() for a in attrs
        }
        self._attr_of: dict[tuple[str, str], dict[str, str]] = {key: {} for key in self._by_attr}
        # (kind, attribute, value) -> a number that grows whenever an entity in that group changes:
        # what is derived from a group (a host's used vCPUs) is cached against it.
        self._generation: dict[tuple[str, str, str], int] = {}
        self._kind_generation: dict[str, int] = {k: 0 for k in CONTAINERS}
        # Versions by origin, sorted: (stamp, kind, id, part) — anti-entropy and the version
        # vector read them instead of scanning the DOM. ``_stamps`` is what each entity has there.
        self._by_origin: dict[str, SortedList] = {}
        self._stamps: dict[tuple[str, str], tuple[tuple[str, tuple[int, int], str], ...]] = {}
        # The replica's digest: the sum of a hash per entity, so a change costs one entity's hash.
        self._digest_terms: dict[tuple[str, str], int] = {}
        self._digest_sum = 0
        self._digest_dirty: set[tuple[str, str]] = set()

    # -- typed reads -----------------------------------------------------------------------
    def get(self, cls: type[R], id_: str) -> R | None:
        """The live record of that kind and id (None if absent, deleted, or the part unset)."""
        key = (cls.KIND, id_)
        slot = self._decoded.get(key)
        if slot is not None and cls in slot:
            return slot[cls]  # type: ignore[return-value]  # the slot of cls holds a cls
        el = self._index[cls.KIND].get(id_)
        if el is None:
            return None
        rec = None if el.get("deleted") == "true" else self._decode(cls, el)
        if slot is None:
            slot = self._decoded[key] = {}
        slot[cls] = rec
        return rec

    def all(self, cls: type[R]) -> list[R]:
        out = []
        get = self.get
        for id_ in self._index[cls.KIND]:
            rec = get(cls, id_)
            if rec is not None:
                out.append(rec)
        return out

    def select(self, cls: type[R], attr: str, value: str) -> list[R]:
        """The live records of ``cls`` whose main part has ``attr`` = ``value``, from a secondary
        index (``attr`` must be one of ``INDEXED[cls.KIND]``), in no particular order."""
        ids = self._by_attr[(cls.KIND, attr)].get(value, ())
        out = []
        for id_ in ids:
            rec = self.get(cls, id_)
            if rec is not None:
                out.append(rec)
        return out

    def count(self, kind: str, attr: str, value: str) -> int:
        """How many live entities of ``kind`` have ``attr`` = ``value`` (indexed attributes only)."""
        return len(self._by_attr[(kind, attr)].get(value, ()))

    def generation(self, kind: str, attr: str, value: str) -> int:
        """Grows whenever an entity of ``kind`` with ``attr`` = ``value`` (before or after the
        change) changes in any part (indexed attributes only): a cache of something computed from
        that group stays valid while this number stays the same."""
        return self._generation.get((kind, attr, value), 0)

    def wrote_between(
        self, origin: str, after: tuple[int, int], upto: tuple[int, int], skip: tuple[str, str] | None = None
    ) -> bool:
        """Does the replica hold a part written by ``origin`` with a stamp in (``after``,
        ``upto``], other than the parts of entity ``skip``? (From the versions-by-origin index.)"""
        sl = self._by_origin.get(origin)
        if sl is None or upto <= after:
            return False
        wall, counter = after
        for _stamp, kind, id_, _part in sl.irange(minimum=((wall, counter + 1),), maximum=(upto, "\uffff")):
            if (kind, id_) != skip:
                return True
        return False

    def kind_generation(self, kind: str) -> int:
        """Grows whenever any entity of ``kind`` changes (in any part, or is collected)."""
        return self._kind_generation[kind]

    def size(self) -> int:
        """How many entities this replica holds, tombstones included."""
        return sum(len(ix) for ix in self._index.values())

    def ids(self, kind: str) -> list[str]:
        return [i for i, el in self._index[kind].items() if el.get("deleted") != "true"]

    def version_of(self, kind: str, id_: str, part: str = "") -> Version | None:
        el = self._index[kind].get(id_)
        if el is None:
            return None
        if part:
            el = _part_children(el).get(part)
            if el is None:
                return None
        return _version(el)

    @staticmethod
    def _decode(cls: type[R], el: etree._Element) -> R | None:
        if cls.PART:
            part = _part_children(el).get(cls.PART)
            if part is None:
                return None
            return cls.from_attrs(el.get("id", ""), _attrs(part))
        body = [
            c for c in el if etree.QName(c).localname not in PARTS[cls.KIND] or etree.QName(c).namespace != NS
        ]
        return cls.from_attrs(el.get("id", ""), _attrs(el), body)

    # -- writes (local) -------------------------------------------------------------------
    def put(self, rec: Record, version: Version | None = None) -> etree._Element:
        """Writes a record as a new version; returns the entity as it now stands (to persist and
        spread). A sub-part (``PART``) is written only onto an existing, live entity.

        ``version`` is for records whose order is decided elsewhere (a lease carries the Paxos
        ballot that decided it); by default the clock ticks."""
        if version is not None:
            self.clock.observe(version)
        v = version or self.clock.tick()
        kind = rec.KIND
        if rec.PART:
            el = self._index[kind].get(rec.id)
            if el is None or el.get("deleted") == "true":
                raise KeyError(f"{kind} {rec.id!r} does not exist")
            part = etree.Element(_Q + rec.PART)
            part.set("v", str(v))
            for k, val in rec.to_attrs().items():
                part.set(k, val)
            old = _part_children(el).get(rec.PART)
            if old is not None:
                el.replace(old, part)
            else:
                el.append(part)
            self._notify(kind, rec.id)
            return copy.deepcopy(el)
        new = etree.Element(_Q + kind)
        new.set("id", rec.id)
        new.set("v", str(v))
        for k, val in rec.to_attrs().items():
            new.set(k, val)
        for child in rec.to_body():
            new.append(copy.deepcopy(child))
        if rec.id not in self._index[kind]:
            # A new entity: nothing to merge, and its version is observed above; ``new`` is
            # ours to keep (what merge would copy in), saving a copy and a parse per lease.
            # Without child elements its one part's version is ``v`` (no need to read it back).
            self._insert(kind, rec.id, new, None if len(new) else ((v.origin, v.stamp, ""),))
            return copy.deepcopy(new)
        return self._apply(new)

    def delete(self, kind: str, id_: str, version: Version | None = None) -> etree._Element | None:
        """Replaces an entity's main part with a tombstone; None if there is nothing to delete
        (with an explicit ``version``, the tombstone is written even for an unknown entity, so
        that it orders correctly against a record still on its way)."""
        el = self._index[kind].get(id_)
        if version is None and (el is None or el.get("deleted") == "true"):
            return None
        if version is not None:
            self.clock.observe(version)
        tomb = etree.Element(_Q + kind)
        tomb.set("id", id_)
        tomb.set("v", str(version or self.clock.tick()))
        tomb.set("deleted", "true")
        return self._apply(tomb)

    def forget(self, kind: str, id_: str) -> bool:
        """Removes a tombstoned entity from this replica altogether (see vmwebd/dom/gc.py for
        when that is safe); False if it is not here or not deleted."""
        el = self._index[kind].get(id_)
        if el is None or el.get("deleted") != "true":
            return False
        del self._index[kind][id_]
        self._containers[kind].remove(el)
        self._tombstones.discard((kind, id_))
        self._reindex(kind, id_)
        return True

    def tombstones(self, skip: Collection[str] = ()) -> Iterator[etree._Element]:
        """The deleted entities still held (candidates for collection), but those of ``skip`` kinds."""
        for kind, id_ in list(self._tombstones):
            if kind not in skip:
                yield self._index[kind][id_]

    def _apply(self, remote: etree._Element) -> etree._Element:
        self.merge(remote, validate=False)
        return copy.deepcopy(self._index[etree.QName(remote).localname][remote.get("id", "")])

    def _insert(self, kind: str, id_: str, el: etree._Element, stamps: _Stamps | None = None) -> None:
        """Adds an entity this replica does not hold (``el`` becomes the replica's own);
        ``stamps``: its parts' (origin, stamp, part name), when the caller knows them."""
        self._containers[kind].append(el)
        self._index[kind][id_] = el
        if el.get("deleted") == "true":
            self._tombstones.add((kind, id_))
        self._notify(kind, id_, stamps)

    # -- replication ----------------------------------------------------------------------
    def merge(self, remote: etree._Element, validate: bool = True) -> bool:
        """Merges one entity state received from anywhere; returns True if the replica changed."""
        kind = etree.QName(remote).localname
        if etree.QName(remote).namespace != NS or kind not in CONTAINERS:
            raise MalformedRequest(f"not a DOM entity: {remote.tag}")
        if validate:
            self.validate_entity(remote)
        id_ = remote.get("id", "")  # every valid entity has one
        for el in [remote, *_part_children(remote).values()]:
            self.clock.observe(_version(el))
        local = self._index[kind].get(id_)
        if local is None:
            self._insert(kind, id_, copy.deepcopy(remote))
            return True
        changed = False
        rparts, lparts = _part_children(remote), _part_children(local)
        if _newer(remote, local, main=True):
            for k in list(local.attrib):
                del local.attrib[k]
            for k, val in remote.attrib.items():
                local.set(k, val)
            for c in list(local):
                if c not in lparts.values():
                    local.remove(c)
            body = [c for c in remote if c not in rparts.values()]
            for i, c in enumerate(body):
                local.insert(i, copy.deepcopy(c))
            if local.get("deleted") == "true":
                self._tombstones.add((kind, id_))
            else:
                self._tombstones.discard((kind, id_))
            changed = True
        for name, rp in rparts.items():
            lp = lparts.get(name)
            if lp is None:
                local.append(copy.deepcopy(rp))
                changed = True
            elif _newer(rp, lp, main=False):
                local.replace(lp, copy.deepcopy(rp))
                changed = True
        if changed:
            self._notify(kind, id_)
        return changed

    def holds(self, remote: etree._Element) -> bool:
        """Would merging ``remote`` change nothing? Decided from versions and attributes alone
        (False when unsure: the full merge then decides). Rumors bring each state many times;
        such duplicates skip validation and the canonical comparison of equal versions."""
        try:
            kind = etree.QName(remote).localname
            local = self._index[kind].get(remote.get("id", "")) if kind in self._index else None
        except ValueError:
            return False
        if local is None:
            return False
        rparts, lparts = _part_children(remote), _part_children(local)
        if not _dominated(remote, local, len(remote) - len(rparts), len(local) - len(lparts)):
            return False
        for name, rp in rparts.items():
            lp = lparts.get(name)
            if lp is None or not _dominated(rp, lp, len(rp), len(lp)):
                return False
        return True

    def validate_entity(self, el: etree._Element) -> None:
        """Checks one entity against schema.rng (in linear time: see vmwebd/dom/validate.py)."""
        err = entity_error(el)
        if err:
            kind = etree.QName(el).localname
            raise MalformedRequest(f"{kind} {el.get('id')!r}: does not match the DOM schema: {err}")

    def entities(self) -> Iterator[etree._Element]:
        for kind in CONTAINERS:
            yield from self._index[kind].values()

    def version_vector(self) -> dict[str, tuple[int, int]]:
        """For each origin host, the newest version of any part it wrote (anti-entropy digest)."""
        return {origin: sl[-1][0] for origin, sl in self._by_origin.items() if sl}

    def newer_than(self, vv: dict[str, tuple[int, int]]) -> list[etree._Element]:
        """Entities with a part newer than what ``vv`` says the other side has."""
        out = []
        for el in self.entities():
            for part in [el, *_part_children(el).values()]:
                v = _version(part)
                if v.stamp > vv.get(v.origin, (-1, -1)):
                    out.append(copy.deepcopy(el))
                    break
        return out

    def held_above(
        self, complete: dict[str, tuple[int, int]], checkpoints: int = SUMMARY_CHECKPOINTS
    ) -> dict[str, list[tuple[tuple[int, int], str]]]:
        """What this replica holds above its complete version vector, in a form another replica
        can check against its own (see :meth:`matched`): for each origin, up to
        ``checkpoints`` points along the parts stamped above ``complete[origin]``, in stamp
        order, each ``(stamp, hash of every part from just above complete up to that stamp)``.

        Entities learnt outside anti-entropy (a rumor, a Paxos Commit) do not move the complete
        vector; without this, the next anti-entropy round would send them all again. Origins
        with more than ``SUMMARY_MAX_PARTS`` such parts are left out (the plain delta serves
        them)."""
        out: dict[str, list[tuple[tuple[int, int], str]]] = {}
        for origin, sl in self._by_origin.items():
            low = complete.get(origin, (-1, -1))
            start = sl.bisect_left(((low[0], low[1] + 1),))
            n = len(sl) - start
            if n <= 0 or n > SUMMARY_MAX_PARTS:
                continue
            every = -(-n // checkpoints)
            h = hashlib.sha256()
            points = []
            entries = list(sl.islice(start, len(sl)))
            since = 0
            for i, entry in enumerate(entries):
                h.update(_summary_line(entry))
                since += 1
                # A checkpoint closes a stamp: every part of that stamp is in its hash.
                last = i + 1 == n
                if last or (since >= every and entries[i + 1][0] != entry[0]):
                    points.append((entry[0], h.hexdigest()[:SUMMARY_HEX]))
                    since = 0
            out[origin] = points
        return out

    def matched(
        self, theirs: dict[str, tuple[int, int]], held: dict[str, list[tuple[tuple[int, int], str]]]
    ) -> dict[str, tuple[int, int]]:
        """How far another replica's :meth:`held_above` summary (taken above its complete
        vector ``theirs``) matches this replica: for each origin, the highest checkpoint whose
        hash is that of the same parts here. Matching hashes mean the same parts from that
        origin on both sides, from above ``theirs`` up to that stamp: nothing there is to be
        sent. (The other side is complete up to it only as far as this replica is: a part below
        it may not have reached either yet, or be written later with an earlier stamp, as a
        Paxos ballot is.)"""
        out = {}
        for origin, points in held.items():
            sl = self._by_origin.get(origin)
            low = theirs.get(origin, (-1, -1))
            wanted = {stamp: digest for stamp, digest in points if stamp > low}
            if sl is None or not wanted:
                continue
            h = hashlib.sha256()
            best: tuple[int, int] | None = None
            at: tuple[int, int] | None = None  # the stamp whose parts are being hashed
            for entry in sl.irange(minimum=((low[0], low[1] + 1),), maximum=(max(wanted), _AFTER_ALL)):
                if entry[0] != at:
                    # Every part of ``at`` is hashed: compare there, if it is a checkpoint.
                    if at is not None and at in wanted:
                        if h.hexdigest()[:SUMMARY_HEX] != wanted[at]:
                            break  # differs from here on (each hash is of a prefix)
                        best = at
                    at = entry[0]
                h.update(_summary_line(entry))
            else:
                if at is not None and at in wanted and h.hexdigest()[:SUMMARY_HEX] == wanted[at]:
                    best = at
            if best is not None:
                out[origin] = best
        return out

    def delta(
        self,
        theirs: dict[str, tuple[int, int]],
        mine_complete: dict[str, tuple[int, int]],
        budget_bytes: int,
        skip: dict[str, tuple[int, int]] | None = None,
    ) -> tuple[list[etree._Element], dict[str, tuple[int, int]]]:
        """What another replica lacks, within a size budget, and how far it may then count itself
        complete (Scuttlebutt-style anti-entropy).

        ``theirs`` is the other side's complete version vector, ``mine_complete`` ours; ``skip``
        (optional) says up to which stamp, per origin, the other side is known to hold what we
        hold (:meth:`matched`): nothing from there down is sent. Entities
        are chosen by the stamp of their unknown parts, oldest first (parts we can claim before
        parts above our complete vector), until the budget is spent; ``claims[o]`` is the highest
        stamp from origin ``o`` up to which the other side holds everything after merging them
        (never more than what we are complete up to).
        """
        cands: list[tuple[tuple[int, int], str, str, str]] = []
        for origin, sl in self._by_origin.items():
            wall, counter = max(theirs.get(origin, (-1, -1)), (skip or {}).get(origin, (-1, -1)))
            # Everything from ``origin`` stamped after what they have: (w, c+1) is the least
            # stamp above (w, c), and (stamp,) sorts before every (stamp, kind, id, part).
            for stamp, kind, id_, _part in sl.irange(minimum=((wall, counter + 1),)):
                cands.append((stamp, origin, kind, id_))
        # Parts we can claim (up to our complete vector) go first: each round then moves the other
        # side's vector forward. Parts above it (heard by rumor; the other side may hold them too)
        # come after, so they can never starve the claimable ones.
        cands.sort(key=lambda c: (c[0] > mine_complete.get(c[1], (-1, -1)), c))
        chosen: dict[tuple[str, str], etree._Element] = {}
        claims = dict(mine_complete)
        size = 0
        blocked: set[str] = set()
        for stamp, origin, kind, id_ in cands:
            if origin in blocked:
                continue
            key = (kind, id_)
            if key not in chosen:
                el = self._index[kind][id_]
                n = len(entity_bytes(el))
                if chosen and size + n > budget_bytes:
                    # Everything from this origin below this stamp is in; nothing above may be claimed.
                    if origin in claims:
                        claims[origin] = min(claims[origin], before(stamp))
                    blocked.add(origin)
                    continue
                chosen[key] = copy.deepcopy(el)
                size += n
        for origin in list(claims):
            if origin in theirs and claims[origin] < theirs[origin]:
                claims[origin] = theirs[origin]
        return list(chosen.values()), claims

    def digest(self) -> str:
        """A hash of the replica's content, independent of the order things arrived in: the sum
        (mod 2^256) of one SHA-256 per entity, kept up to date as entities change (only those
        changed since the last call are hashed again). Equal replicas have equal digests."""
        for key in self._digest_dirty:
            self._digest_sum -= self._digest_terms.pop(key, 0)
            el = self._index[key[0]].get(key[1])
            if el is not None:
                term = int.from_bytes(hashlib.sha256(_canonical_entity(el)).digest(), "big")
                self._digest_terms[key] = term
                self._digest_sum += term
        self._digest_dirty.clear()
        return format(self._digest_sum % _DIGEST_MOD, "064x")

    def canonical_digest(self) -> str:
        """A hash of the replica's content, independent of the order things arrived in (a whole
        scan: the reference :meth:`digest` is checked against)."""
        h = hashlib.sha256()
        for kind in CONTAINERS:
            for id_ in sorted(self._index[kind]):
                el = self._index[kind][id_]
                h.update(_canonical_entity(el))
        return h.hexdigest()

    # -- whole document -------------------------------------------------------------------
    def to_xml(self, pretty: bool = True) -> bytes:
        return etree.tostring(self.root, xml_declaration=True, encoding="UTF-8", pretty_print=pretty)

    def load_xml(self, data: bytes, what: str = "DOM snapshot") -> None:
        """Merges a whole document (a snapshot) into this replica, validating it first."""
        root = parse_xml(data, what, limit=1 << 31)
        err = document_error(root, CONTAINERS)
        if err:
            raise MalformedRequest(f"{what}: does not match the DOM schema: {err}")
        for container in root:
            for el in container:
                self.merge(el, validate=False)

    # -- change listeners -----------------------------------------------------------------
    def subscribe(self, fn: Callable[[str, str], object]) -> None:
        """Calls ``fn(kind, id)`` after every change, local or merged."""
        self._listeners.append(fn)

    def _notify(self, kind: str, id_: str, stamps: _Stamps | None = None) -> None:
        self._reindex(kind, id_, stamps)
        for fn in list(self._listeners):
            fn(kind, id_)

    def _reindex(self, kind: str, id_: str, stamps: _Stamps | None = None) -> None:
        """Brings the caches and indexes up to date with entity (kind, id) as it now stands
        (``stamps``: its parts' versions as :data:`_Stamps`, when the caller knows them)."""
        key = (kind, id_)
        self._decoded.pop(key, None)
        self._digest_dirty.add(key)
        self._kind_generation[kind] += 1
        el = self._index[kind].get(id_)
        live = el is not None and el.get("deleted") != "true"
        for attr in INDEXED.get(kind, ()):
            ix, held = self._by_attr[(kind, attr)], self._attr_of[(kind, attr)]
            new = el.get(attr, "") if live and el is not None else None
            old = held.get(id_)
            for value in {v for v in (old, new) if v is not None}:
                gkey = (kind, attr, value)
                self._generation[gkey] = self._generation.get(gkey, 0) + 1
            if old == new:
                continue
            if old is not None:
                ids = ix[old]
                ids.discard(id_)
                if not ids:
                    del ix[old]
                del held[id_]
            if new is not None:
                ix.setdefault(new, set()).add(id_)
                held[id_] = new
        old_stamps = self._stamps.pop(key, ())
        new_stamps: _Stamps = ()
        if el is not None:
            if stamps is None:
                stamps = tuple((v.origin, v.stamp, part) for v, part in _part_versions_named(el))
            new_stamps = self._stamps[key] = stamps
        if old_stamps == new_stamps:
            return
        for origin, stamp, part in old_stamps:
            self._by_origin[origin].discard((stamp, kind, id_, part))
        for origin, stamp, part in new_stamps:
            sl = self._by_origin.get(origin)
            if sl is None:
                sl = self._by_origin[origin] = SortedList()
            sl.add((stamp, kind, id_, part))


def _summary_line(entry: tuple[tuple[int, int], str, str, str]) -> bytes:
    (wall, counter), kind, id_, part = entry
    return f"{wall}.{counter} {kind} {id_} {part}\n".encode()


def before(stamp: tuple[int, int]) -> tuple[int, int]:
    """The greatest stamp strictly below ``stamp``."""
    wall, counter = stamp
    return (wall, counter - 1) if counter > 0 else (wall - 1, 10**9)


def _canonical_entity(el: etree._Element) -> bytes:
    parts = _part_children(el)
    main = _main_bytes(el)
    rest = b"".join(_canon(parts[n]) for n in sorted(parts))
    return main + rest


def _part_versions_named(el: etree._Element) -> list[tuple[Version, str]]:
    """(version, part name) of an entity's parts, the main part named ""."""
    return [(_version(el), "")] + [(_version(p), name) for name, p in _part_children(el).items()]


def part_versions(el: etree._Element) -> list[Version]:
    """The versions of an entity's parts (main part first)."""
    return [_version(p) for p in [el, *_part_children(el).values()]]


def entity_key(el: etree._Element) -> tuple[str, str]:
    return (etree.QName(el).localname, el.get("id", ""))


def entity_bytes(el: etree._Element) -> bytes:
    return etree.tostring(el)


def entity_from_bytes(data: bytes, what: str = "entity") -> etree._Element:
    return parse_xml(data, what, limit=_MAX_ENTITY_BYTES)


__all__ = ["Dom", "parse_xml", "entity_bytes", "entity_from_bytes", "RECORD_TYPES"]
