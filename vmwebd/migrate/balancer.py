"""The decentralised load balancer's rule: which VM, if any, a host moves, and where.

Pure code: no I/O, no clock, no reactor. Every host runs :func:`choose_move` on its own replica of
the DOM at its own pace; the destination checks the proposal again with :func:`assess` on its own,
fresh load before it accepts. The move itself runs under the VM's ``migration/<vm>`` lease (one
mover per VM) and is carried out by the migration code; see docs/balancer.md.

Loads
    A host's *load* is the share of its capacity in use on its busiest resource,
    ``max(used_vcpus / (cpus * cpu_overcommit), used_mem_mib / mem_mib)`` — the same measure
    :mod:`vmwebd.placement` spreads by. It grows when a VM arrives and shrinks when one leaves
    (the only property the no-return argument below needs). The *grid load* ``M`` is the same
    measure over the whole grid, ``max(Σ used vCPUs / Σ vCPU capacity, Σ used mem / Σ mem)`` over
    every member host, live or not: no placement can keep every host below ``M``, so ``M`` is
    the ideal each host is compared with ("the grid mean"). Every replica knows it exactly:
    each VM record names one host, so the sums do not depend on how stale the replica is.

The rule, with threshold ``θ``, ``H = M + θ`` and ``F = M - θ``
    A host ``s`` moves one of its VMs to a live, accepting host ``d`` with room for it when

    1. either ``s`` is *overloaded*, ``L_s > H``, and ``d`` stays at or below ``H`` after the
       move; or ``s`` is above the grid load, ``L_s > M``, ``d`` is *much less loaded*,
       ``L_d < F``, and ``d`` stays at or below ``M`` after the move;
    2. ``s`` stays at or above ``F`` after the move, and its load drops;
    3. ``d`` after the move stays below ``s`` after the move (no overshoot);
    4. the move lowers the imbalance ``Φ = Σ_h (L_h - M)²`` by at least ``hysteresis``;
    5. the VM has not moved in the last ``min_residence_ms``.

    Among the allowed moves it takes the one with the most benefit (the drop of ``Φ``) per cost
    (overlay bytes plus memory bytes: what the migration copies); ties go to the smallest VM id,
    then the smallest destination id.

Why VMs do not ping-pong (while no VM is created or removed and no host joins, so ``M`` holds)
    *Receivers stay low.* A host that receives a VM ends at or below ``H``, and its load only rises
    by receiving, each time again capped at ``H``; so it never becomes overloaded, and a VM, once
    moved, is only moved again by the second clause.
    *Senders stay high.* A host that sends ends at or above ``F``, and its load only drops by
    sending, each time again floored at ``F``; so it is never *much less loaded* again.
    Hence a VM that left host ``A`` can only move again towards a host below ``F`` — a host that
    has never sent anything, so never ``A``: no VM goes back to a host it left (A→B→A, nor
    A→B→C→A), whatever the staleness of the views, as long as each destination checks the move
    with its own load (plus the moves already coming to it) and each source with its own load
    (less the moves already leaving it): both only err on the safe side.
    *Bounded number of moves.* Each move lowers ``Φ`` by at least ``hysteresis``, and ``Φ ≥ 0``;
    when each host takes part in one migration at a time (``max_concurrent = 1``), migrations in
    flight touch disjoint pairs of hosts and their drops add up, so a quiet period needs at most
    ``Φ₀ / hysteresis`` migrations. (With more at once a VM still visits each host at most once.)
    *Residence.* The arguments restart when ``M`` changes (new VMs, removed VMs, hosts joining); a
    VM that moved stays ``min_residence_ms`` wherever the new situation finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Collection, Mapping, Sequence

from vmwebd.errors import InvalidArgument
from vmwebd.settings import SETTINGS, checked_setting

MIB = 1 << 20


@dataclass(frozen=True)
class HostLoad:
    """A host's capacity and use as some replica sees it. ``live`` comes from the failure detector,
    ``accepting`` is false for a host being drained or about to leave."""

    host_id: str
    cpus: int
    mem_mib: int
    used_vcpus: int
    used_mem_mib: int
    live: bool
    accepting: bool = True

    def load(self, cpu_overcommit: float) -> float:
        """Share of capacity in use on the busiest resource (vCPUs against cpus × overcommit)."""
        return max(
            _share(self.used_vcpus, self.cpus * cpu_overcommit), _share(self.used_mem_mib, self.mem_mib)
        )

    def fits(self, vm: "VmLoad", cpu_overcommit: float) -> bool:
        return (
            self.used_vcpus + vm.vcpus <= self.cpus * cpu_overcommit
            and self.used_mem_mib + vm.mem_mib <= self.mem_mib
        )

    def plus(self, vm: "VmLoad") -> "HostLoad":
        return replace(
            self, used_vcpus=self.used_vcpus + vm.vcpus, used_mem_mib=self.used_mem_mib + vm.mem_mib
        )

    def minus(self, vm: "VmLoad") -> "HostLoad":
        return replace(
            self, used_vcpus=self.used_vcpus - vm.vcpus, used_mem_mib=self.used_mem_mib - vm.mem_mib
        )


def _share(used: float, capacity: float) -> float:
    if capacity > 0:
        return used / capacity
    return 0.0 if used <= 0 else float("inf")


@dataclass(frozen=True)
class VmLoad:
    """A VM as the balancer sees it; ``last_moved_ms`` is when it last arrived where it is."""

    vm_id: str
    host_id: str
    vcpus: int
    mem_mib: int
    overlay_bytes: int
    last_moved_ms: int | None = None

    @property
    def cost(self) -> int:
        """Bytes a live migration copies: the overlay (pre-copied) and the memory."""
        return self.overlay_bytes + self.mem_mib * MIB


@dataclass(frozen=True)
class BalancerPolicy:
    """The balancer's knobs, from the ``balancer.*`` settings (see :func:`policy_from_settings`).

    ``threshold``: how far above the grid load a host must be to shed VMs (and how far below it a
    host counts as much less loaded). ``hysteresis``: the least drop of ``Φ = Σ (L_h - M)²`` a move
    must bring — 0.002 is one sixty-fourth of a host moved across a gap of about eight points; it
    keeps the balancer from moving VMs for crumbs and bounds the number of moves by ``Φ₀ / 0.002``.
    ``min_residence_ms``: a VM that moved is not moved again for this long. ``max_concurrent``:
    migrations one host takes part in at once (as source or destination). ``interval_ms``: how
    often a host looks. ``cpu_overcommit``: vCPUs per physical CPU, as for placement.
    """

    enabled: bool = False
    threshold: float = 0.2
    hysteresis: float = 0.002
    min_residence_ms: int = 1_800_000
    max_concurrent: int = 1
    interval_ms: int = 60_000
    cpu_overcommit: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise InvalidArgument("threshold", f"{self.threshold!r}: must be between 0 and 1")
        if not 0.0 < self.hysteresis <= 1.0:
            raise InvalidArgument("hysteresis", f"{self.hysteresis!r}: must be above 0 and at most 1")
        if self.min_residence_ms < 0:
            raise InvalidArgument("min_residence_ms", f"{self.min_residence_ms!r}: must not be negative")
        if self.max_concurrent < 1:
            raise InvalidArgument("max_concurrent", f"{self.max_concurrent!r}: must be at least 1")
        if self.interval_ms < 1:
            raise InvalidArgument("interval_ms", f"{self.interval_ms!r}: must be at least 1")
        if not self.cpu_overcommit >= 1.0:
            raise InvalidArgument("cpu_overcommit", f"{self.cpu_overcommit!r}: must be at least 1")


def policy_from_settings(settings: Mapping[str, str]) -> BalancerPolicy:
    """The policy for the current settings (``all_settings(dom)``; a missing key takes its default).

    Values are checked again as SetSetting checks them, so a bad value that reached the DOM some
    other way fails here with an error naming its key.
    """

    def value(key: str) -> str:
        return checked_setting(key, settings.get(key, SETTINGS[key].default)).value

    return BalancerPolicy(
        enabled=value("balancer.enabled") == "true",
        threshold=float(value("balancer.threshold")),
        min_residence_ms=round(float(value("balancer.min-residence")) * 1000),
        interval_ms=max(1, round(float(value("balancer.interval")) * 1000)),
        cpu_overcommit=float(value("cpu_overcommit")),
    )


@dataclass(frozen=True)
class Move:
    """A proposed migration. ``benefit`` is the drop of ``Φ``; ``cost`` the bytes to copy."""

    vm_id: str
    src: str
    dst: str
    benefit: float
    cost: int
    reason: str

    @property
    def score(self) -> float:
        return self.benefit / max(self.cost, 1)


def grid_load(hosts: Sequence[HostLoad], cpu_overcommit: float) -> float:
    """``M``: the load of the grid as one host, over every host given (live or not)."""
    cpu = sum(h.cpus for h in hosts) * cpu_overcommit
    mem = sum(h.mem_mib for h in hosts)
    return max(_share(sum(h.used_vcpus for h in hosts), cpu), _share(sum(h.used_mem_mib for h in hosts), mem))


def imbalance(hosts: Sequence[HostLoad], cpu_overcommit: float, ideal: float | None = None) -> float:
    """``Φ = Σ_h (L_h - M)²`` over every host given; 0 when every host is at the grid load."""
    m = grid_load(hosts, cpu_overcommit) if ideal is None else ideal
    return sum((h.load(cpu_overcommit) - m) ** 2 for h in hosts)


def assess(
    vm: VmLoad, src: HostLoad, dst: HostLoad, ideal: float, policy: BalancerPolicy, now_ms: int
) -> Move | str:
    """The move of ``vm`` from ``src`` to ``dst`` if the rule allows it, else why not (a phrase).

    ``src`` and ``dst`` are the loads to judge by: the source's own less what already leaves it,
    the destination's own plus what already comes to it (see :func:`choose_move`). The
    destination calls this with its own fresh load before it accepts a proposed move.
    """
    oc, th = policy.cpu_overcommit, policy.threshold
    if vm.host_id != src.host_id:
        return f"{vm.vm_id} is on {vm.host_id}, not {src.host_id}"
    if dst.host_id == src.host_id:
        return "destination is the source"
    if vm.last_moved_ms is not None and now_ms - vm.last_moved_ms < policy.min_residence_ms:
        return f"{vm.vm_id} moved {now_ms - vm.last_moved_ms} ms ago"
    if not dst.live:
        return f"{dst.host_id} is not live"
    if not dst.accepting:
        return f"{dst.host_id} does not accept VMs"
    if not dst.fits(vm, oc):
        return f"{dst.host_id} has no room for {vm.vm_id}"
    ls, ld = src.load(oc), dst.load(oc)
    # The loads after the move, without building new records (this runs for every pair).
    ls2 = max(
        _share(src.used_vcpus - vm.vcpus, src.cpus * oc), _share(src.used_mem_mib - vm.mem_mib, src.mem_mib)
    )
    ld2 = max(
        _share(dst.used_vcpus + vm.vcpus, dst.cpus * oc), _share(dst.used_mem_mib + vm.mem_mib, dst.mem_mib)
    )
    high, low = ideal + th, ideal - th
    if ls > high:
        cap, why = high, f"{src.host_id} at {ls:.3f} is above grid load {ideal:.3f} + {th}"
    elif ls > ideal and ld < low:
        cap, why = ideal, f"{dst.host_id} at {ld:.3f} is below grid load {ideal:.3f} - {th}"
    else:
        return f"{src.host_id} at {ls:.3f} need not shed load to {dst.host_id} at {ld:.3f} (grid load {ideal:.3f})"
    if ld2 > cap:
        return f"{dst.host_id} would reach {ld2:.3f}, above {cap:.3f}"
    if ls2 < low:
        return f"{src.host_id} would drop to {ls2:.3f}, below {low:.3f}"
    if not ls2 < ls:
        return f"moving {vm.vm_id} does not lower {src.host_id}'s load"
    if not ld2 < ls2:
        return f"{dst.host_id} would end at {ld2:.3f}, not below {src.host_id} at {ls2:.3f}"
    benefit = (ls - ideal) ** 2 + (ld - ideal) ** 2 - (ls2 - ideal) ** 2 - (ld2 - ideal) ** 2
    if benefit < policy.hysteresis:
        return f"gain {benefit:.5f} is below the hysteresis {policy.hysteresis}"
    return Move(
        vm.vm_id,
        src.host_id,
        dst.host_id,
        benefit,
        vm.cost,
        f"{why}; {dst.host_id} goes {ld:.3f} -> {ld2:.3f}, {src.host_id} {ls:.3f} -> {ls2:.3f}",
    )


def loads_after(
    hosts: Sequence[HostLoad], vms: Sequence[VmLoad], in_flight: Sequence[Move]
) -> dict[str, HostLoad]:
    """Host id -> load, counting each migration in flight as done (source less the VM,
    destination plus it); moves naming an unknown VM or host are left out."""
    by_id = {h.host_id: h for h in hosts}
    vm_by_id = {v.vm_id: v for v in vms}
    for m in in_flight:
        v = vm_by_id.get(m.vm_id)
        if v is None or m.src not in by_id or m.dst not in by_id:
            continue
        by_id[m.src] = by_id[m.src].minus(v)
        by_id[m.dst] = by_id[m.dst].plus(v)
    return by_id


def choose_move(
    me: str,
    hosts: Sequence[HostLoad],
    vms: Sequence[VmLoad],
    policy: BalancerPolicy,
    now_ms: int,
    in_flight: Sequence[Move] = (),
    skip: Collection[str] = (),
) -> Move | None:
    """The move host ``me`` should start now, or None (disabled, balanced, busy, nothing allowed).

    ``hosts``: every member host as ``me``'s replica sees it (its own entry is exact; the grid load
    is taken over all of them). ``vms``: VMs as that replica sees them; only those on ``me`` and
    not in flight are candidates. ``in_flight``: migrations running that ``me`` knows of; they
    count as done for the loads (source less, destination more), against ``max_concurrent`` when
    they involve ``me``, and their VMs are not candidates. ``skip``: VMs not to consider either
    (e.g. one whose ``migration/<vm>`` lease someone else holds). Deterministic: the same inputs, in
    any order, give the same answer.
    """
    if not policy.enabled:
        return None
    if sum(1 for m in in_flight if me in (m.src, m.dst)) >= policy.max_concurrent:
        return None
    by_id = loads_after(hosts, vms, in_flight)
    if me not in by_id:
        return None
    moving = set(skip) | {m.vm_id for m in in_flight}
    oc = policy.cpu_overcommit
    ideal = grid_load(list(by_id.values()), oc)
    mine = by_id[me]
    ls = mine.load(oc)
    dsts = [by_id[h] for h in sorted(by_id) if h != me and by_id[h].live and by_id[h].accepting]
    if not (
        ls > ideal + policy.threshold
        or ls > ideal
        and any(d.load(oc) < ideal - policy.threshold for d in dsts)
    ):
        return None
    # Hosts that no VM of mine may go to, whatever its size (assess would refuse each pair): the
    # destination's load only grows with the VM, and must stay below mine and under the cap.
    high, low = ideal + policy.threshold, ideal - policy.threshold
    dsts = [d for d in dsts if d.load(oc) < ls and (d.load(oc) < high if ls > high else d.load(oc) < low)]
    best: Move | None = None
    for vm in sorted((v for v in vms if v.host_id == me and v.vm_id not in moving), key=lambda v: v.vm_id):
        for dst in dsts:
            m = assess(vm, mine, dst, ideal, policy, now_ms)
            if isinstance(m, Move) and (best is None or m.score > best.score):
                best = m  # strict '>': on a tie the earlier (vm id, destination id) stays
    return best
