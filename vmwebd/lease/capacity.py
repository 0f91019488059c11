"""Capacity and quotas, decided by consensus in the same operation as a placement's addresses.

Each host places from its own replica, so two requests at two hosts could each find the same
free memory. What is promised is therefore kept in consensus keys, changed by compare-and-set in
the very Paxos operation that leases the addresses (or moves the VM):

``cap/<host>``
    the set of VMs reserved on ``host``: ``<vm id>:<token>:<vcpus>:<MiB>`` entries, sorted,
    comma-separated. A VM being migrated is in the sets of both hosts until the move ends.
``quota/<owner>``
    the set of ``owner``'s VMs: ``<vm id>:<token>`` entries.

Why whole sets and not counters: every key is consistent on its own. A builder refuses a set
whose sums exceed the host's capacity (vCPUs times ``cpu_overcommit``, memory) or whose size
exceeds the owner's quota, judged on the value it expects; the compare-and-set fails unless that
is the decided value, so no decided value of a key is ever over its limit, whatever the
interleaving of requests at any hosts. Paxos decides each key on its own; an operation that ends
in a conflict or without a quorum may still have been applied to some of its keys (a repair
completes a value that may have been chosen). With sets, such a leftover is an entry for a VM
that is not there, never a missing one: more is reserved than used until the sweep
(:meth:`Ledger.sweep_ops`, run by the reconciler) removes it after a grace period. A counter left
half-updated would instead drift below what runs, and promise a host more than it has.

Entries carry the VM's creation token, so a VM made again under the same name, or re-placed
with a new token, is another entry. Adding an entry that is there already changes nothing, and
removing one that is gone neither: operations are idempotent, and a proposer can tell from the
values a conflict reports whether its change is in (:meth:`Change.applied`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vmwebd.errors import NoCapacity, QuotaExceeded
from vmwebd.lease.paxos import UPDATES, Refused, Update

CAP_PREFIX = "cap/"
QUOTA_PREFIX = "quota/"
PREFIXES = (CAP_PREFIX, QUOTA_PREFIX)


def cap_key(host: str) -> str:
    return CAP_PREFIX + host


def quota_key(owner: str) -> str:
    return QUOTA_PREFIX + owner


def is_capacity_key(key: str) -> bool:
    return key.startswith(PREFIXES)


@dataclass(frozen=True)
class Entry:
    """One VM in a host's set (``vcpus``/``memory_mib`` 0 in an owner's set)."""

    vm: str
    token: str
    vcpus: int = 0
    memory_mib: int = 0

    def encode(self, sizes: bool) -> str:
        return (
            f"{self.vm}:{self.token}:{self.vcpus}:{self.memory_mib}" if sizes else f"{self.vm}:{self.token}"
        )

    @classmethod
    def decode(cls, text: str) -> "Entry":
        parts = text.split(":")
        if len(parts) == 4:
            return cls(parts[0], parts[1], int(parts[2]), int(parts[3]))
        return cls(parts[0], parts[1])


_PARSED: dict[str, frozenset] = {}


def parse(value: str | None) -> frozenset:
    """The entries of a set value (parsed once per distinct value: a host's set is read at
    every placement)."""
    if not value:
        return frozenset()
    hit = _PARSED.get(value)
    if hit is None:
        if len(_PARSED) > 4096:
            _PARSED.clear()
        hit = _PARSED[value] = frozenset(Entry.decode(t) for t in value.split(","))
    return hit


def encode(entries, sizes: bool) -> str | None:
    return ",".join(sorted(e.encode(sizes) for e in entries)) or None


@dataclass(frozen=True)
class Usage:
    vms: int = 0
    vcpus: int = 0
    memory_mib: int = 0


def usage(entries) -> Usage:
    return Usage(len(entries), sum(e.vcpus for e in entries), sum(e.memory_mib for e in entries))


@dataclass(frozen=True)
class SetUpdate(Update):
    """Adds and removes entries of one set, applied by the proposer to the value decided before
    it (:class:`~vmwebd.lease.paxos.Update`); refused when the set grows past ``limit`` — a
    host's ``(vCPUs, MiB)`` or an owner's number of VMs. Adding what is there and removing what
    is gone change nothing, so it is idempotent."""

    add: frozenset = frozenset()
    remove: frozenset = frozenset()
    sizes: bool = True
    limit: tuple | int | None = None
    name: str = ""
    KIND = "set"

    def to_attrs(self) -> dict[str, str]:
        out = {
            "name": self.name,
            "sizes": "1" if self.sizes else "0",
            "add": encode(self.add, self.sizes) or "",
            "remove": encode(self.remove, self.sizes) or "",
        }
        if self.limit is not None:
            out["limit"] = ",".join(str(x) for x in self.limit) if self.sizes else str(self.limit)
        return out

    @classmethod
    def from_attrs(cls, attrs) -> "SetUpdate":
        sizes = attrs.get("sizes") == "1"
        limit = attrs.get("limit")
        if limit is not None:
            cpu, _, mem = limit.partition(",")
            limit = (float(cpu), int(mem)) if sizes else int(limit)
        return cls(
            parse(attrs.get("add") or None),
            parse(attrs.get("remove") or None),
            sizes,
            limit,
            attrs.get("name", ""),
        )

    def entries(self, current: str | None) -> frozenset:
        return (parse(current) - self.remove) | self.add

    def apply(self, current: str | None) -> str | None:
        old = parse(current)
        new = (old - self.remove) | self.add
        if new == old:
            return current
        if self.limit is not None and new - old:
            why = over(self.name, self.sizes, self.limit, old, new)
            if why:
                raise Refused(why)
        return encode(new, self.sizes)


UPDATES[SetUpdate.KIND] = SetUpdate


def over(name: str, sizes: bool, limit, old: frozenset, new: frozenset) -> str:
    """Why ``new`` passes ``limit`` (a growing set only), or ""."""
    if sizes:
        u, before = usage(new), usage(old)
        if u.vcpus > limit[0] or u.memory_mib > limit[1]:
            return (
                f"host {name!r} has {limit[1] - before.memory_mib} MiB and "
                f"{limit[0] - before.vcpus:g} vCPUs unreserved, "
                f"{u.memory_mib - before.memory_mib} MiB and {u.vcpus - before.vcpus} "
                "vCPUs asked"
            )
        return ""
    if len(new) > limit and len(new) > len(old):
        return (
            f"user {name!r} has a quota of {limit} VMs, holds {len(old)} and asked for "
            f"{len(new) - len(old)} more"
        )
    return ""


class Ledger:
    """What this host knows of the capacity keys: the replica's values, with the updates of
    operations in flight at this host applied on top (a placement here sees what the requests
    before it are about to reserve)."""

    def __init__(self, read: Callable[[str], str | None]):
        self.read = read
        self._pending: dict[str, list] = {}

    def value(self, key: str) -> str | None:
        value = self.read(key)
        for u in self._pending.get(key, ()):
            value = encode(u.entries(value), u.sizes)
        return value

    def entries(self, key: str) -> frozenset:
        return parse(self.value(key))

    def begin(self, ops: dict) -> None:
        for k, (u, _) in ops.items():
            if isinstance(u, SetUpdate):
                self._pending.setdefault(k, []).append(u)

    def end(self, ops: dict) -> None:
        for k, (u, _) in ops.items():
            lst = self._pending.get(k)
            if lst and u in lst:
                lst.remove(u)
                if not lst:
                    del self._pending[k]

    def change(self, view: dict | None = None) -> "Change":
        return Change(self, view or {})


class Change:
    """One compare-and-set over host and owner sets. ``view`` holds the values a conflict just
    reported (the truth a moment ago: they win over the ledger's)."""

    def __init__(self, ledger: Ledger, view: dict):
        self.ledger = ledger
        self.view = view
        self._adds: dict[str, set] = {}
        self._dels: dict[str, set] = {}

    def base(self, key: str) -> frozenset:
        return parse(self.view[key]) if key in self.view else self.ledger.entries(key)

    def entries(self, key: str) -> frozenset:
        """The set as it will be after this change."""
        return (self.base(key) - self._dels.get(key, set())) | self._adds.get(key, set())

    def usage(self, host: str) -> Usage:
        return usage(self.entries(cap_key(host)))

    def find(self, vm_id: str, hosts) -> dict[str, Entry]:
        """Where ``vm_id`` is reserved among ``hosts``: ``{host: entry}``."""
        out = {}
        for h in hosts:
            for e in self.entries(cap_key(h)):
                if e.vm == vm_id:
                    out[h] = e
        return out

    def _add(self, key: str, e: Entry) -> None:
        self._dels.get(key, set()).discard(e)
        self._adds.setdefault(key, set()).add(e)

    def _del(self, key: str, e: Entry) -> None:
        self._adds.get(key, set()).discard(e)
        self._dels.setdefault(key, set()).add(e)

    def reserve(self, vm_id: str, host: str, vcpus: int, mem: int, owner: str, token: str) -> None:
        """A new VM on ``host`` (its creation ``token``), counted in ``owner``'s quota."""
        self._add(cap_key(host), Entry(vm_id, token, vcpus, mem))
        self._add(quota_key(owner), Entry(vm_id, token))

    def unreserve(self, vm_id: str, token: str, hosts, owner: str | None) -> None:
        """The VM (creation ``token``) is gone from ``hosts`` (and from ``owner``'s quota)."""
        for h in hosts:
            for e in self.entries(cap_key(h)):
                if e.vm == vm_id and e.token == token:
                    self._del(cap_key(h), e)
        if owner is not None:
            self._del(quota_key(owner), Entry(vm_id, token))

    def move(
        self,
        vm_id: str,
        token: str,
        vcpus: int,
        mem: int,
        source: str,
        dest: str,
        keep_source: bool,
        owner: str | None = None,
        new_token: str | None = None,
    ) -> None:
        """The VM goes to ``dest``; with ``keep_source`` the source stays reserved too (a
        migration under way, settled by :meth:`unreserve` on the host it left), else the source
        is freed (a re-placement off a dead host, which also gives the VM ``new_token``)."""
        tok = new_token or token
        self._add(cap_key(dest), Entry(vm_id, tok, vcpus, mem))
        if not keep_source:
            self.unreserve(vm_id, token, [source], None)
            if owner is not None and tok != token:
                self._del(quota_key(owner), Entry(vm_id, token))
                self._add(quota_key(owner), Entry(vm_id, tok))

    def adjust(self, key: str, add=(), remove=()) -> None:
        """Adds and removes entries of one set as they are (the sweep's repairs)."""
        for e in remove:
            self._del(key, e)
        for e in add:
            self._add(key, e)

    def applied(self, seen: dict) -> bool:
        """Was this change decided after all (a conflict can be reported for an operation a
        repair completed, whose keys moved on since)? True when every entry it adds is in the
        values seen and every entry it removes is not."""
        if not self._adds and not self._dels:
            return False
        for k, es in self._adds.items():
            if k not in seen or not es <= parse(seen[k]):
                return False
        for k, es in self._dels.items():
            if k not in seen or es & parse(seen[k]):
                return False
        return True

    def ops(
        self,
        capacity: Callable[[str], tuple[float, int] | None] = lambda h: None,
        quota: Callable[[str], int | None] = lambda o: None,
    ) -> dict:
        """The operation: ``{key: (SetUpdate, None)}``, each update bounded by ``capacity(host)``
        (vCPUs with overcommit, MiB) or ``quota(owner)`` (VMs). Judged here first on the values
        this change sees: a set that would grow past its limit raises NoCapacity or
        QuotaExceeded naming the host or owner (nothing is proposed); the proposer judges it
        again on the decided value (a Conflict on that key if it no longer fits). A set that
        only shrinks is never refused."""
        out = {}
        for k in sorted(set(self._adds) | set(self._dels)):
            add = frozenset(self._adds.get(k, ()))
            remove = frozenset(self._dels.get(k, ()))
            sizes = k.startswith(CAP_PREFIX)
            name = k[len(CAP_PREFIX) :] if sizes else k[len(QUOTA_PREFIX) :]
            limit = capacity(name) if sizes else quota(name)
            old = self.base(k)
            new = (old - remove) | add
            if new == old:
                continue
            if limit is not None and new - old:
                why = over(name, sizes, limit, old, new)
                if why:
                    raise NoCapacity(why) if sizes else QuotaExceeded(why)
            out[k] = (SetUpdate(add, remove, sizes, limit, name), None)
        return out
