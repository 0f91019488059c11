"""Moving a VM between hosts, in phases recorded in the DOM (see docs/migration.md).

Any host takes the request (:meth:`MigrationManager.request`): it checks the VM and the
destination's capacity, takes the VM's ``migration/<vm>`` lease by consensus (so no VM is moved by
two hosts at once), and writes a migration entity in phase ``prepare``. From there the two hosts
concerned drive it by reacting to that entity as it reaches them through gossip:

- the **destination**, on ``prepare``: makes sure it holds the base image (fetching it from a peer
  and checking its hash), the cluster's network and an empty overlay over its own base, then
  writes ``ready`` (with the paths it chose);
- the **source**, on ``ready``: *live* mode (``LIVE | PEER2PEER | NON_SHARED_INC | PERSIST_DEST |
  UNDEFINE_SOURCE``: libvirt copies the overlay, then the memory) writes ``migrating``, then the VM's
  new host and ``done``; *cold* mode (drivers without live migration, or a stopped VM) saves the
  VM's memory to a file and writes ``saved``;
- the destination, on ``saved`` (cold only): copies the state file and the overlay from the source,
  defines the domain and restores it, writes ``restored``;
- the source, on ``restored``: records the VM's new host, removes its copy, writes ``done``.

Which of these a host does, and when it gives up (a silent or dead destination, a restart in
the middle, an error), is decided by the pure phase machine :func:`vmwebd.migrate.phases.decide`;
this module carries out its answers. Whoever writes ``done`` or ``failed`` gives the lease back. A failure in any phase writes
``failed`` naming the phase; the VM keeps running at the source (a cold move restores it there).
While a migration is in flight both hosts' reconcilers leave that VM alone.

A dead host's VMs cannot be migrated (nobody can read their memory or overlay). An admin's
:meth:`MigrationManager.evacuate` re-places them on live hosts instead, booted afresh from their
base image with the same addresses, each recorded as a migration of mode ``evacuate``. VMs that
never ran on a dead host (nothing of theirs can be lost) are re-placed the same way without
asking anyone (:meth:`MigrationManager.replace_never_ran`). Each creation of a VM is re-placed at
most once, by whichever host wins its ``replaced/<vm>/<token>`` lease.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from vmwebd.blocking import ThreadPoolRunner
from vmwebd.cluster import capacity_limits, host_loads, reserved_loads
from vmwebd.dom.records import HostRec, LeaseRec, MigrationRec, VClusterRec, VmRec, status_of
from vmwebd.errors import (
    HostAlive,
    HypervisorError,
    InvalidArgument,
    MigrationBusy,
    NoCapacity,
    NoQuorum,
    NoSuchHost,
    NoSuchMigration,
    NoSuchVm,
    VmwebError,
)
from vmwebd.hv.images import fetch_file
from vmwebd.hv.naming import domain_name, volume_name
from vmwebd.hv.xmlrewrite import retarget_xml
from vmwebd.lease.allocator import parse_holder
from vmwebd.lease.table import LeaseConflict
from vmwebd.migrate import balancer as bal
from vmwebd.migrate import phases
from vmwebd.migrate.phases import (
    Abort,
    CleanUp,
    Finish,
    FinishForSource,
    MigrateMemory,
    Moved,
    Observations,
    PrepareDest,
    RestoreDest,
    SaveMemory,
    Trigger,
)
from vmwebd.migrate.state import (
    FAIL,
    RESTORE,
    TERMINAL,
    expired,
    handover_holder,
    handover_key,
    held_by_dest,
    in_flight,
    lease_holder,
    lease_key,
)
from vmwebd.placement import HostLoad, place
from vmwebd.settings import all_settings, drain_record, drained_hosts
from vmwebd.wiring import BlockingRunner, HostSet, Liveness, PeerDirectory

log = Logger()
#: How long a host must have been dead (or gone) here before the VMs that never ran on it are
#: re-placed without an admin: a loaded host flaps to "dead" and back within seconds.
REPLACE_GRACE_S = 10.0
#: A destination that could not take a cold move's hand-over for want of a majority tries again
#: after this long (the VM waits, saved, at its source).
HANDOVER_RETRY_S = 5.0
#: A restarted source whose live move libvirt is still carrying out looks again after this long.
JOB_RECHECK_S = 2.0
REPLACED_PREFIX = "replaced/"
#: A re-placement lease whose VM is gone is given back after this long (as the reconciler does
#: for addresses whose holder never came to be): a replica may hold the lease before the VM.
REPLACED_GRACE_MS = 300_000
#: Re-placement leases given back per sweep at most (a sweep stays short).
REPLACED_PER_SWEEP = 64


def replace_key(vm: VmRec) -> str:
    """The consensus lease that lets one host, once, re-place this creation of ``vm`` (its
    token): held for as long as the VM lives, so a second re-placement of the same creation
    (another host, or a replica that has not yet heard of the first) is refused by Paxos."""
    return f"{REPLACED_PREFIX}{vm.id}/{vm.token}"


def replace_holder(vm_id: str, mid: str) -> str:
    """Who holds a re-placement lease: that move (unique: a lease is granted again to the same
    holder, so two hosts must never ask with equal holders)."""
    return f"replaced:{vm_id}#{mid}"


def never_ran(dom, vm: VmRec) -> bool:
    """Has ``vm`` (this creation of it) never been reported running? No status for its token,
    or a status still ``pending``: nothing of it can be lost by booting it elsewhere."""
    st = status_of(dom, vm)
    return st is None or st.state == "pending"


def _replace(rec, **kw):
    return dataclasses.replace(rec, **kw)


class MigrationManager:
    """The migration side of one host. ``reconciler`` builds domain specs the same way it does
    for new VMs; ``images`` makes base images usable here; ``table`` is the lease table.
    ``run_blocking`` carries out the file work around a move (fetching the state and disk files,
    the state file's directory, size and removal): the reactor's thread pool by default, an
    inline runner in a test on a ``task.Clock``; ``clock`` schedules its reactions to the DOM."""

    def __init__(
        self,
        host_id,
        domsvc,
        driver,
        images,
        reconciler,
        table,
        storage,
        now_ms,
        live_hosts: HostSet,
        peer_address_of: PeerDirectory,
        cert_dir,
        overcommit=lambda: 4.0,
        clock=None,
        liveness: Liveness | None = None,
        placeable_hosts: HostSet | None = None,
        allocator=None,
        placement: Callable[[], str] | None = None,
        migrate_uri: str = "",
        push_to: Callable[[Iterable[str]], object] | None = None,
        run_blocking: BlockingRunner | None = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        if run_blocking is None:
            # The reactor's own pool, as ``threads.deferToThread`` uses, whatever ``clock`` is.
            from twisted.internet import reactor

            run_blocking = ThreadPoolRunner(reactor)
        self.run_blocking: BlockingRunner = run_blocking
        self.host_id = host_id
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.driver = driver
        self.images = images
        self.reconciler = reconciler
        self.table = table
        self.storage = storage
        self.now_ms = now_ms
        self.live_hosts = live_hosts
        self.peer_address_of = peer_address_of
        self.cert_dir = cert_dir
        self.overcommit = overcommit
        self.migrate_uri = migrate_uri  # what this host publishes for live migrations to it
        #: When migrations are given up (prepare timeout, grace for a dead peer, abandonment).
        self.limits = phases.DEFAULT_LIMITS
        self._working: set[str] = set()
        self._again: set[str] = set()
        self.new_id = lambda: secrets.token_hex(6)
        self.push_to = push_to or (lambda hosts: None)  # gossip's direct push, with peers
        self.liveness = liveness or (lambda host: "unknown")  # the failure detector's word on a host
        #: Leases addresses and keeps the capacity ledger.
        self.allocator = allocator
        self.placement = placement or (lambda: "spread")
        self._down_since: dict[str, int] = {}
        #: Hosts that may receive VMs (the failure detector's alive, not suspect ones).
        self.placeable_hosts = placeable_hosts or live_hosts
        self.replace_grace_s = REPLACE_GRACE_S
        self.replaced_grace_ms = REPLACED_GRACE_MS
        self._dead_since: dict[str, int] = {}
        self._replacing = False
        self.replaced = 0  # VMs this host re-placed because they never ran on a dead host

    # -- requests (any host) ---------------------------------------------------------------
    def _vm(self, cluster: str, vm: str) -> VmRec:
        rec = self.dom.get(VmRec, f"{cluster}/{vm}") if isinstance(vm, str) else None
        if rec is None or rec.desired == "absent":
            raise NoSuchVm(str(cluster), str(vm))
        c = self.dom.get(VClusterRec, cluster)
        if c is None or c.state == "destroying":
            raise InvalidArgument("cluster", f"cluster {cluster!r} is being destroyed")
        return rec

    def _transact(self, build) -> defer.Deferred:
        """One consensus operation through the allocator's ledger (reservations with it)."""
        return self.allocator.transact(build)

    def _loads(self, exclude: str, change=None) -> dict[str, HostLoad]:
        loads = host_loads(self.dom, self.placeable_hosts(), exclude, placing=True)
        if change is not None:
            # The capacity sets hold what is promised, migrations under way included.
            return reserved_loads(loads, change)
        # Capacity already promised to migrations under way counts as used.
        for m in in_flight(self.dom, self.now_ms()).values():
            vm = self.dom.get(VmRec, m.vm)
            if vm is not None and m.dest in loads:
                loads[m.dest].used_vcpus += vm.vcpus
                loads[m.dest].used_memory_mib += vm.memory_mib
        return loads

    def choose_dest(self, vm: VmRec, dest: str | None, change=None) -> str:
        oc = self.overcommit()
        loads = self._loads(exclude=vm.host, change=change)
        if dest:
            if self.dom.get(HostRec, dest) is None:
                raise NoSuchHost(dest)
            if dest == vm.host:
                raise InvalidArgument("to", f"VM {vm.id!r} is already on host {dest!r}")
            if dest in drained_hosts(self.dom):
                raise NoCapacity(f"host {dest!r} is being drained, so VM {vm.id!r} cannot move there")
            if dest not in loads:
                raise NoCapacity(
                    f"host {dest!r} is not alive ({self.liveness(dest)} as host "
                    f"{self.host_id} sees it), so VM {vm.id!r} cannot move there"
                )
            if not loads[dest].fits(oc, vm.vcpus, vm.memory_mib):
                h = loads[dest]
                raise NoCapacity(
                    f"host {dest!r} cannot take VM {vm.id!r} ({vm.vcpus} vCPUs, "
                    f"{vm.memory_mib} MiB): {h.memory_mib - h.used_memory_mib} MiB free"
                )
            return dest
        fitting = [h for h in loads.values() if h.fits(oc, vm.vcpus, vm.memory_mib)]
        if not fitting:
            raise NoCapacity(
                f"no other live host can take VM {vm.id!r} ({vm.vcpus} vCPUs, {vm.memory_mib} MiB)"
            )
        return min(fitting, key=lambda h: (h.utilisation(oc, vm.vcpus, vm.memory_mib), h.host)).host

    def mode_for(self, vm: VmRec, dest: str) -> str:
        src, dst = self.dom.get(HostRec, vm.host), self.dom.get(HostRec, dest)
        st = status_of(self.dom, vm)
        return phases.choose_mode(
            st is not None and st.state == "running",
            src.migrate_uri if src is not None else "",
            dst.migrate_uri if dst is not None else "",
        )

    @defer.inlineCallbacks
    def request(self, cluster: str, vm: str, dest: str | None = None, requested_by: str = "") -> MigrationRec:
        """Starts moving ``cluster/vm`` (to ``dest``, or the least loaded host that fits);
        fires with the migration entity once its lease is held and the request is durable."""
        rec = self._vm(cluster, vm)
        if rec.id in in_flight(self.dom, self.now_ms()):
            raise MigrationBusy(f"VM {rec.id!r} is already being moved")
        if self.dom.get(HostRec, rec.host) is None or rec.host not in self.live_hosts():
            raise NoCapacity(
                f"VM {rec.id!r} is on host {rec.host!r}, which is not alive: it cannot be migrated from there"
            )
        asked = dest
        dest = self.choose_dest(rec, asked)
        mid = self.new_id()
        chosen = {}

        def build(change):
            # The destination is reserved in the same operation as the migration lease (the
            # source stays reserved too until the move ends), chosen again from the sets
            # found if they moved meanwhile.
            to = self.choose_dest(rec, asked, change)
            chosen["dest"] = to
            change.move(rec.id, rec.token, rec.vcpus, rec.memory_mib, rec.host, to, keep_source=True)
            ops = change.ops(*capacity_limits(self.dom))
            ops[lease_key(rec.id)] = (None, lease_holder(rec.id, mid))
            return ops

        try:
            yield self._transact(build)
            dest = chosen.get("dest", dest)
        except LeaseConflict as e:
            raise MigrationBusy(f"VM {rec.id!r} is already being moved ({e.holder})") from None
        m = MigrationRec(
            id=mid,
            vm=rec.id,
            source=rec.host,
            dest=dest,
            phase="prepare",
            mode=self.mode_for(rec, dest),
            requested_by=requested_by or "",
            started_at=int(self.now_ms()),
        )
        try:
            yield self.domsvc.put(m)
            self.push_to([dest, rec.host])
        except Exception:
            yield self._release(m)
            raise
        log.info(
            "migration {mid}: {vm} {src} -> {dst} ({mode}) requested by {who}",
            mid=mid,
            vm=rec.id,
            src=rec.host,
            dst=dest,
            mode=m.mode,
            who=requested_by or "?",
        )
        return m

    # -- draining a live host for maintenance (an admin's call) ------------------------------
    @defer.inlineCallbacks
    def drain(self, host: str, requested_by: str = ""):
        """Marks ``host`` as draining (no new VMs, no balancer moves to it) and starts moving each
        of its VMs to the least loaded host that fits. Fires with ``(started, refused)``: the
        migrations started, and ``(vm id, reason)`` for VMs that could not be moved now (no
        capacity, already moving); drain again to retry them. ``undrain`` ends it."""
        rec = self.dom.get(HostRec, host) if isinstance(host, str) else None
        if rec is None:
            raise NoSuchHost(str(host))
        if host not in self.live_hosts():
            raise InvalidArgument(
                "host",
                f"host {host!r} is not alive: its VMs cannot be migrated "
                "(vmweb host evacuate re-places the VMs of a dead host)",
            )
        yield self.domsvc.put(drain_record(host, True))
        started, refused = [], []
        flying = in_flight(self.dom, self.now_ms())
        for vm in sorted(
            (v for v in self.dom.select(VmRec, "host", host) if v.desired != "absent"), key=lambda v: v.id
        ):
            m = flying.get(vm.id)
            if m is not None:
                refused.append((vm.id, f"already moving to {m.dest}"))
                continue
            cluster, _, name = vm.id.partition("/")
            try:
                started.append((yield self.request(cluster, name, None, requested_by=requested_by)))
            except VmwebError as e:
                refused.append((vm.id, str(e)))
        log.info(
            "host {host} draining ({who}): {n} moves started, {r} VMs not movable now",
            host=host,
            who=requested_by or "?",
            n=len(started),
            r=len(refused),
        )
        return started, refused

    def undrain(self, host: str) -> defer.Deferred:
        """``host`` takes new VMs again (VMs moved away stay where they are)."""
        if not isinstance(host, str) or self.dom.get(HostRec, host) is None:
            raise NoSuchHost(str(host))
        return self.domsvc.put(drain_record(host, False))

    # -- evacuation of a dead host (an admin's call) ------------------------------------------
    @defer.inlineCallbacks
    def evacuate(self, host: str, requested_by: str = "") -> list[MigrationRec]:
        """Gives the VMs of dead ``host`` to live hosts: each keeps its name and addresses and
        boots afresh from its base image at its new host (its disk writes stayed on ``host``).

        Only for a host the failure detector here calls dead or left: a host that is merely slow
        may still run its VMs, and two copies of a VM would share an address. Moves from ``host``
        still in flight are failed first (their source cannot finish them); VMs that were being
        removed are deleted and their addresses given back (their host cannot do it any more).
        Each re-placed VM is recorded as a migration of mode ``evacuate``, under its migration
        lease. Should ``host`` come back, its reconciler removes its old copies (orphans).

        Fires with the moves it ended (cold moves to ``host`` that ``host`` held: see below),
        as they ended, followed by the ``evacuate`` moves."""
        rec = self.dom.get(HostRec, host) if isinstance(host, str) else None
        if rec is None:
            raise NoSuchHost(str(host))
        state = "left" if rec.liveness == "left" else self.liveness(host)
        if host == self.host_id or state not in ("dead", "left"):
            raise HostAlive(
                f"host {host!r} is {'this host' if host == self.host_id else state} "
                f"as host {self.host_id} sees it: only a dead host is evacuated (move "
                "the VMs of a live host with vm migrate)"
            )
        now = int(self.now_ms())
        # Cold moves to the dead host that it holds (never abandoned, see held_by_dest): saved,
        # the move fails and its source restores the VM; restored, the VM ran there, so the
        # move ends there and the VM is re-placed with the others below.
        ended = []
        for m in sorted(in_flight(self.dom, now).values(), key=lambda m: m.id):
            if m.dest != host or not held_by_dest(self.dom, m):
                continue
            if phases.phase_of(m) is phases.Phase.SAVED:
                yield self._take_back(m, requested_by)
            elif phases.phase_of(m) is phases.Phase.RESTORED and self._vm_rec(m) is not None:
                elapsed = now - m.started_at
                yield self._done(m, self._vm_rec(m), total_ms=elapsed, downtime_ms=elapsed)
            else:
                continue
            ended.append(self.dom.get(MigrationRec, m.id) or m)
        on_host = sorted(self.dom.select(VmRec, "host", host), key=lambda v: v.id)
        flying = in_flight(self.dom, now)
        for vm in on_host:
            m = flying.get(vm.id)
            if m is not None and m.source == host:
                yield self._fail(m, m.phase, f"its source host {host} was evacuated")
        keep = [vm for vm in on_host if vm.desired != "absent"]
        gone = [vm for vm in on_host if vm.desired == "absent"]
        try:
            moves = yield self._re_place(host, keep, requested_by, now) if keep else []
        except LeaseConflict as e:
            raise MigrationBusy(
                f"a VM of host {host!r} is being moved ({e.holder}); evacuate again once that move has ended"
            ) from None
        for vm in gone:
            c = self.dom.get(VClusterRec, vm.cluster)
            yield self.allocator.release_vm(vm, c.token if c else "", owner=c.owner if c else None)
            yield self.domsvc.delete(("vm", vm.id))
        self.push_to(sorted({m.dest for m in moves}))
        self.reconciler.kick()
        log.info(
            "host {host} evacuated by {who}: {n} VMs re-placed ({where}), {g} being removed deleted",
            host=host,
            who=requested_by or "?",
            n=len(moves),
            where=", ".join(f"{m.vm}->{m.dest}" for m in moves) or "none",
            g=len(gone),
        )
        return ended + moves

    def waiting(self, m: MigrationRec) -> str:
        """What migration ``m`` waits on, for people: the host and what it is to do, whether
        this host's failure detector sees that host alive, and what an admin can do about a
        destination that holds a saved VM and is dead ("" once the move ended)."""
        now = int(self.now_ms())
        held = held_by_dest(self.dom, m)
        got = phases.awaited(m, now, self.limits, held)
        if got is None:
            if phases.phase_of(m) in (None, *phases.TERMINAL):
                return ""
            return f"nothing: abandoned, unfinished after {self.limits.stale_ms // 60_000} min"
        host, what = got
        line = f"host {host} {what}"
        state = self.liveness(host)
        if state != "alive":
            line += f"; it is {state} as host {self.host_id} sees it"
            if held and phases.phase_of(m) is phases.Phase.SAVED and state in ("dead", "left"):
                line += f" (evacuate {host} if it is gone for good: the VM is then restored at {m.source})"
        return line

    @defer.inlineCallbacks
    def _take_back(self, m: MigrationRec, requested_by: str):
        """Fails cold move ``m``, saved at its source, whose destination (being evacuated: dead
        here, an admin's judgement) took the hand-over: the lease goes from the destination's
        restore to a failure, by consensus, and the source restores the VM from its saved state
        (nothing else would: such a move is never abandoned). Should the destination come back,
        it finds the move failed and removes whatever it restored."""
        try:
            yield self.table.cas(
                {handover_key(m.id): (handover_holder(RESTORE, m.id), handover_holder(FAIL, m.id))}
            )
        except LeaseConflict as e:
            if e.current != handover_holder(FAIL, m.id):
                raise MigrationBusy(
                    f"migration {m.id} of VM {m.vm!r}: its hand-over changed meanwhile "
                    f"({e.current}); evacuate again"
                ) from None
        yield self._fail(
            m,
            m.phase,
            f"its destination {m.dest} was evacuated by {requested_by or '?'} holding the saved VM",
        )

    @defer.inlineCallbacks
    def _claim(
        self, vms: list[VmRec], mids: dict[str, str], host: str, tokens: dict[str, str], plan: dict[str, str]
    ):
        """Takes, in one consensus round, each VM's migration lease and its re-placement lease
        (:func:`replace_key`), and moves each VM's reservation from gone ``host`` to its new
        host (with its new creation token); ``plan`` is filled with the new hosts, placed from
        the capacity sets (again if they moved meanwhile). A VM whose re-placement lease is
        taken already was re-placed by another host: it is dropped and the round retried
        without it (at most once per VM). Fires with (the claims held, the VMs kept); a
        migration lease held by someone else fails with LeaseConflict, no room with NoCapacity."""
        keep = list(vms)
        for _ in range(len(vms) + 1):
            claims = {}
            for vm in keep:
                claims[lease_key(vm.id)] = lease_holder(vm.id, mids[vm.id])
                # Held while the VM lives (given back by release_replaced once it is gone): no
                # later replica can re-place this creation again.
                claims[replace_key(vm)] = replace_holder(vm.id, mids[vm.id])
            if not claims:
                return {}, []

            def build(change, keep=keep, claims=claims):
                placed = place(
                    list(self._loads(exclude=host, change=change).values()),
                    [(vm.id, vm.vcpus, vm.memory_mib) for vm in keep],
                    self.placement(),
                    self.overcommit(),
                )
                plan.clear()
                plan.update(placed)
                for vm in keep:
                    c = self.dom.get(VClusterRec, vm.cluster)
                    change.move(
                        vm.id,
                        vm.token,
                        vm.vcpus,
                        vm.memory_mib,
                        host,
                        placed[vm.id],
                        keep_source=False,
                        owner=c.owner if c else None,
                        new_token=tokens[vm.id],
                    )
                ops = change.ops(*capacity_limits(self.dom))
                ops.update({k: (None, h) for k, h in claims.items()})
                return ops

            try:
                yield self.allocator.transact(build)
                return claims, keep
            except LeaseConflict as e:
                if not e.key.startswith(REPLACED_PREFIX):
                    raise
                log.info(
                    "{key} is held by {holder}: that VM was re-placed already", key=e.key, holder=e.holder
                )
                keep = [vm for vm in keep if replace_key(vm) != e.key]
        return {}, []

    @defer.inlineCallbacks
    def _re_place(
        self, host: str, vms: list[VmRec], requested_by: str, now: int, still=lambda vm: True
    ) -> list[MigrationRec]:
        """Gives ``vms`` of gone ``host`` live hosts (placed under their leases, with their
        reservations): each keeps its name and addresses and gets a new token (the status the
        old host wrote is not this creation's), recorded with a migration of mode ``evacuate``,
        phase ``done``. Only VMs
        that, under the leases, our replica still puts on ``host`` with the same token (and for
        which ``still(vm)`` holds) are moved. Fires with the moves."""
        mids = {vm.id: self.new_id() for vm in vms}
        tokens = {vm.id: secrets.token_hex(4) for vm in vms}
        plan: dict[str, str] = {}
        claims, keep = yield self._claim(vms, mids, host, tokens, plan)
        # Under the leases, what our replica says now.
        moving = [
            cur
            for vm in keep
            if (cur := self.dom.get(VmRec, vm.id)) is not None
            and cur.host == host
            and cur.token == vm.token
            and cur.desired != "absent"
            and still(cur)
        ]
        moved_ids = {vm.id for vm in moving}
        # Leases given back at the end: the migration leases, and the re-placement leases of
        # the VMs not moved after all (those of the moved stay held while the VM lives).
        back = {
            k: h
            for k, h in claims.items()
            if not k.startswith(REPLACED_PREFIX) or parse_holder(h)[1] not in moved_ids
        }
        moves, recs = [], []
        for vm in moving:
            moves.append(
                MigrationRec(
                    id=mids[vm.id],
                    vm=vm.id,
                    source=host,
                    dest=plan[vm.id],
                    phase="done",
                    mode="evacuate",
                    requested_by=requested_by,
                    started_at=now,
                    finished_at=now,
                )
            )
            recs.append(_replace(vm, host=plan[vm.id], token=tokens[vm.id]))
        try:
            if recs:
                # The VMs' new hosts first, then the records of the moves (as _done does).
                yield self.domsvc.put(*recs, *moves)
        except Exception:
            back = claims  # nothing was written: nothing is re-placed
            raise
        finally:
            if back:
                yield self.table.release(back).addErrback(
                    lambda f: log.warn(
                        "re-placing VMs of {host}: leases not given back now ({err}); the reconciler will",
                        host=host,
                        err=f.getErrorMessage(),
                    )
                )
        return moves

    # -- VMs that never ran on a dead host (automatic) ------------------------------------
    def host_down(self, host: str) -> None:
        """The failure detector here just declared ``host`` dead (or it left): its VMs that
        never ran are re-placed once it has stayed so for ``replace_grace_s``."""
        self._dead_since.setdefault(host, int(self.now_ms()))
        self.clock.callLater(self.replace_grace_s, self._replace_later)

    def _replace_later(self) -> None:
        self.replace_never_ran().addErrback(
            lambda f: log.failure("re-placing VMs that never ran, on {host}", failure=f, host=self.host_id)
        )

    @defer.inlineCallbacks
    def replace_never_ran(self):
        """Re-places the VMs that never ran on a host dead here for ``replace_grace_s`` or more
        (see :func:`never_ran`) on live hosts, as :meth:`evacuate` does, without asking anyone.
        A VM that ran there stays (it may have written to its disk: an admin's evacuate).
        Fires with the moves made; VMs that do not fit now are tried again at the next sweep."""
        if self._replacing:
            return []
        self._replacing = True
        moves = []
        try:
            now = int(self.now_ms())
            for rec in sorted(self.dom.all(HostRec), key=lambda h: h.id):
                host = rec.id
                state = "left" if rec.liveness == "left" else self.liveness(host)
                if host == self.host_id or state not in ("dead", "left"):
                    self._dead_since.pop(host, None)
                    continue
                since = self._dead_since.setdefault(host, now)
                if now - since < self.replace_grace_s * 1000:
                    continue
                flying = in_flight(self.dom, now)
                vms = sorted(
                    (
                        vm
                        for vm in self.dom.select(VmRec, "host", host)
                        if vm.desired != "absent" and vm.id not in flying and never_ran(self.dom, vm)
                    ),
                    key=lambda v: v.id,
                )
                if not vms:
                    continue
                try:
                    done = yield self._re_place(
                        host, vms, "auto: never ran", now, still=lambda vm: never_ran(self.dom, vm)
                    )
                except (VmwebError, LeaseConflict) as e:
                    log.warn(
                        "VMs that never ran on dead host {host} not re-placed now: {err}", host=host, err=e
                    )
                    continue
                if done:
                    self.replaced += len(done)
                    self.push_to(sorted({m.dest for m in done}))
                    log.info(
                        "host {host} is dead: {n} VMs that never ran there re-placed by {me} ({where})",
                        host=host,
                        n=len(done),
                        me=self.host_id,
                        where=", ".join(f"{m.vm}->{m.dest}" for m in done),
                    )
                moves += done
        finally:
            self._replacing = False
        if moves:
            self.reconciler.kick()
        return moves

    def get(self, mid: str) -> MigrationRec:
        m = self.dom.get(MigrationRec, mid) if isinstance(mid, str) else None
        if m is None:
            raise NoSuchMigration(str(mid))
        return m

    def wait(self, mid: str, timeout: float) -> defer.Deferred:
        """Fires with the migration once it is done or failed (or as it is after ``timeout``)."""

        def finished():
            m = self.dom.get(MigrationRec, mid)
            return m is None or m.phase in TERMINAL

        return self.domsvc.wait_for(finished, timeout).addCallback(lambda _: self.get(mid))

    # -- reacting to the DOM ---------------------------------------------------------------
    def start(self) -> None:
        self.dom.subscribe(self._on_change)
        self.resume()

    def resume(self) -> defer.Deferred:
        """After a restart: migrations this host was in the middle of as a source are taken up
        as :data:`phases.SOURCE_LOST_ON_RESTART` says (a saved state is not trusted; of a live
        move libvirt is asked whether it finished, goes on, or did nothing); the others are
        taken up again. Then the memory states left here by moves that ended meanwhile (or are
        gone from the DOM) are removed. Fires once that is done; never fails (what fails is
        logged)."""
        ds = [
            self._after_restart(m).addErrback(
                lambda f, mid=m.id: log.failure(
                    "migration {mid}: taking it up after the restart did not succeed", failure=f, mid=mid
                )
            )
            for m in self.dom.all(MigrationRec)
        ]
        d = defer.gatherResults(ds).addCallback(lambda _: self._remove_left_states())
        return d.addErrback(lambda f: log.failure("leftover migration states not removed", failure=f))

    @defer.inlineCallbacks
    def _after_restart(self, m: MigrationRec, again: bool = False):
        """What this host, restarted, does about ``m``: as the phase machine answers with what
        libvirt says of a live move this host was the source of (``again``: looked at before)."""
        domain = ""
        if m.source == self.host_id and phases.phase_of(m) is phases.Phase.MIGRATING:
            domain = yield self._source_domain(m)
        action = self._decide(m, self.now_ms(), Trigger.RESTARTED, source_domain=domain)
        if isinstance(action, Abort):
            yield self._fail(m, action.phase, action.reason)
        elif isinstance(action, Moved):
            yield self._moved(m)
        elif isinstance(action, phases.Wait) and domain in (phases.DOMAIN_MIGRATING, phases.DOMAIN_UNKNOWN):
            # libvirt's job goes on without the daemon that started it (or libvirt did not say:
            # _source_domain warned): look again later (the machine stops asking once the move
            # is abandoned).
            if domain == phases.DOMAIN_MIGRATING:
                (log.debug if again else log.info)(
                    "migration {mid} of {vm}: libvirt is still moving it; looking again in {s:.0f} s",
                    mid=m.id,
                    vm=m.vm,
                    s=JOB_RECHECK_S,
                )
            self.clock.callLater(JOB_RECHECK_S, self._recheck, m.id)
        elif not isinstance(action, phases.Nothing):
            self.kick(m.id)  # acts (or waits) as on any change, one step at a time

    def _recheck(self, mid: str) -> None:
        m = self.dom.get(MigrationRec, mid)
        if m is None or phases.phase_of(m) is not phases.Phase.MIGRATING:
            return
        self._after_restart(m, again=True).addErrback(
            lambda f: log.failure("migration {mid}: looking at libvirt's job again", failure=f, mid=mid)
        )

    @defer.inlineCallbacks
    def _source_domain(self, m: MigrationRec):
        """What this host's libvirt says of the domain of live move ``m`` (see
        ``Observations.source_domain``); DOMAIN_UNKNOWN if it did not answer.

        Two calls (the domain's state, then its job): the move may end between them, libvirt
        undefining the domain, and the job lookup then fails; the state is read again, so a move
        that just ended is seen as such (it was once taken for a failure, and the destination
        removed the guest that had arrived)."""
        name = domain_name(m.vm)
        try:
            info = yield self.driver.state(name)
            if info.state == "missing":
                return phases.DOMAIN_GONE
            try:
                running = yield self.driver.job_running(name)
            except VmwebError:
                info = yield self.driver.state(name)
                if info.state == "missing":
                    return phases.DOMAIN_GONE
                raise
        except VmwebError as e:
            log.warn(
                "migration {mid}: libvirt did not say what became of {name} ({err}); looking again",
                mid=m.id,
                name=name,
                err=e,
            )
            return phases.DOMAIN_UNKNOWN
        return phases.DOMAIN_MIGRATING if running else phases.DOMAIN_HERE

    @defer.inlineCallbacks
    def _moved(self, m: MigrationRec):
        """libvirt finished live move ``m`` while this host's daemon was down: the end is
        recorded as the executor would have (without libvirt's figures, gone with its caller)."""
        vm = self._vm_rec(m)
        log.info(
            "migration {mid} of {vm}: libvirt finished the move while this host was down",
            mid=m.id,
            vm=m.vm,
        )
        yield self._done(m, vm, total_ms=int(self.now_ms() - m.started_at))
        yield self.driver.delete_volume(self.storage.pool, volume_name(vm.id))

    @defer.inlineCallbacks
    def _remove_left_states(self):
        """Removes the memory states (``.migrate-ID.state``, saved by a cold move's source or
        fetched by its destination) of migrations that ended, or are gone from the DOM, while
        this host was down: their own clean-up ran without this host (a restarted host does not
        clean up after failures again, see the phase machine), and a state is as big as the VM's
        memory. A VM whose move failed that way is booted afresh by the reconciler."""
        found = yield self.run_blocking(_left_states, Path(self.storage.dir))
        for mid, path in found:
            m = self.dom.get(MigrationRec, mid)
            if m is None or phases.phase_of(m) in phases.TERMINAL:
                yield self.run_blocking(_unlink, path)
                log.info(
                    "migration {mid}: removed its memory state left here ({path})", mid=mid, path=str(path)
                )

    def sweep(self) -> defer.Deferred:
        """The source fails its migrations stuck on a destination that is gone or silent, and
        deletes its ended migrations older than HISTORY_MS (their tombstones are collected later).

        Only the source does: it alone knows whether libvirt moved the VM, so a destination that
        gave up on a source it believed dead could destroy a guest that had just arrived. A dead
        source's migration is abandoned by everyone after STALE_MS instead, but for a cold move
        the destination restored: the VM runs there, and the destination records the end in the
        source's stead (:class:`FinishForSource`)."""
        now = self.now_ms()
        live = self.live_hosts()
        for h in list(self._down_since):
            if h in live:
                del self._down_since[h]
        ds = []
        migrations = self.dom.all(MigrationRec)
        for m in migrations:
            peer = phases.watched_peer(m, self.host_id, now, self.limits, held_by_dest(self.dom, m))
            if peer is None:
                continue
            # The grace starts when this sweep first finds the peer out of the live set.
            since = self._down_since.setdefault(peer, now) if peer not in live else None
            action = self._decide(m, now, Trigger.SWEEP, peer_down_since=since)
            if isinstance(action, Abort):
                ds.append(_swept(self._fail(m, action.phase, action.reason), m.id, "failing it"))
            elif isinstance(action, FinishForSource):
                down_ms = now - since if since is not None else 0
                ds.append(_swept(self._finish_for_source(m, down_ms), m.id, "recording its end"))
        old = expired(migrations, self.host_id, now, self.dom)
        if old:
            ds.append(self.domsvc.delete(*(("migration", m.id) for m in old[:256])))
        ds.append(self.release_replaced())
        return defer.DeferredList(ds, consumeErrors=True)

    def release_replaced(self) -> defer.Deferred:
        """Gives back re-placement leases whose VM is gone (after REPLACED_GRACE_MS): any host
        may (a release is a compare-and-set on the holder, so two hosts doing it is harmless)."""
        now = self.now_ms()
        stale = {}
        for key in self.dom.ids("lease"):
            if not key.startswith(REPLACED_PREFIX):
                continue
            lease = self.dom.get(LeaseRec, key)
            if lease is None or not lease.holder or now - lease.granted_at < self.replaced_grace_ms:
                continue
            if self.dom.get(VmRec, parse_holder(lease.holder)[1]) is None:
                stale[key] = lease.holder
                if len(stale) >= REPLACED_PER_SWEEP:
                    break
        if not stale:
            return defer.succeed(None)
        return self.table.release(stale)

    # -- the load balancer (docs/balancer.md) ---------------------------------------------
    def balancer_inputs(self):
        """Hosts and VMs as this replica sees them, in the balancer's terms."""
        live = self.placeable_hosts()
        hosts = {h.id: h for h in self.dom.all(HostRec) if h.liveness != "left" and h.cpus > 0}
        used = {h: [0, 0] for h in hosts}
        last_moved: dict[str, int] = {}
        for m in self.dom.all(MigrationRec):
            if m.phase == "done":
                last_moved[m.vm] = max(last_moved.get(m.vm, 0), m.finished_at)
        vms = []
        for vm in self.dom.all(VmRec):
            if vm.desired == "absent" or vm.host not in hosts:
                continue
            used[vm.host][0] += vm.vcpus
            used[vm.host][1] += vm.memory_mib
            vms.append(bal.VmLoad(vm.id, vm.host, vm.vcpus, vm.memory_mib, 0, last_moved.get(vm.id)))
        drained = drained_hosts(self.dom)
        loads = [
            bal.HostLoad(
                h.id,
                h.cpus,
                h.memory_mib,
                used[h.id][0],
                used[h.id][1],
                live=h.id in live and h.liveness == "alive" and h.id not in drained,
            )
            for h in hosts.values()
        ]
        flying = [
            bal.Move(m.vm, m.source, m.dest, 0.0, 0, "in flight")
            for m in in_flight(self.dom, self.now_ms()).values()
        ]
        return loads, vms, flying

    @defer.inlineCallbacks
    def balance(self, policy):
        """One look of this host at its load; starts at most one migration. Fires with the
        migration started, or None."""
        if not policy.enabled:
            return None
        now = int(self.now_ms())
        hosts, vms, flying = self.balancer_inputs()
        move = bal.choose_move(self.host_id, hosts, vms, policy, now, flying)
        if move is None:
            return None
        # Costs of our own VMs for real (overlay bytes on disk) before choosing among them.
        mine = []
        for v in vms:
            if v.host_id == self.host_id:
                size = (
                    yield self.driver.volume_allocation(self.storage.pool, volume_name(v.vm_id))
                    if self.driver.volumes_on_disk
                    else defer.succeed(0)
                )
                v = dataclasses.replace(v, overlay_bytes=size)
            mine.append(v)
        move = bal.choose_move(self.host_id, hosts, mine, policy, now, flying)
        if move is None:
            return None
        cluster, _, name = move.vm_id.partition("/")
        log.info(
            "balancer on {host}: moving {vm} to {dst}: {why}",
            host=self.host_id,
            vm=move.vm_id,
            dst=move.dst,
            why=move.reason,
        )
        try:
            m = yield self.request(cluster, name, move.dst, requested_by="balancer")
        except VmwebError as e:
            log.info("balancer on {host}: {vm} not moved now: {err}", host=self.host_id, vm=move.vm_id, err=e)
            return None
        return m

    def _check_balancer_move(self, m: MigrationRec, vm: VmRec) -> None:
        """The destination's own look at a balancer's proposal, with its own fresh load."""
        policy = bal.policy_from_settings(all_settings(self.dom))
        hosts, vms, flying = self.balancer_inputs()
        flying = [f for f in flying if f.vm_id != m.vm]
        busy = sum(1 for f in flying if m.dest in (f.src, f.dst))
        if busy >= policy.max_concurrent:
            raise VmwebError(
                f"host {self.host_id} declines the balancer's move: already in "
                f"{busy} migration(s) (balancer max {policy.max_concurrent})"
            )
        by_id = bal.loads_after(hosts, vms, flying)
        vm_load = next((v for v in vms if v.vm_id == vm.id), None)
        if vm_load is None or m.source not in by_id or m.dest not in by_id:
            return
        ideal = bal.grid_load(list(by_id.values()), policy.cpu_overcommit)
        # Judge by the state before this move (the VM still at its source).
        verdict = bal.assess(vm_load, by_id[m.source], by_id[m.dest], ideal, policy, int(self.now_ms()))
        if not isinstance(verdict, bal.Move):
            raise VmwebError(f"host {self.host_id} declines the balancer's move: {verdict}")

    def resolve_file(self, peer: str, parts: list[str]) -> Path | None:
        """The files of a cold migration its destination may pull: ``MID/state``, ``MID/disk``."""
        if len(parts) != 2 or parts[1] not in ("state", "disk"):
            return None
        m = self.dom.get(MigrationRec, parts[0])
        if not phases.serves_file(m, self.host_id, peer):
            return None
        if parts[1] == "state":
            return self._state_path(m)
        return Path(self.storage.dir) / volume_name(m.vm)

    def _on_change(self, kind: str, id_: str) -> None:
        # Called in the middle of a DOM merge (a peer's delivery being processed): act in a
        # later reactor turn, never re-entering gossip or the DOM from inside their own call.
        if kind == "migration":
            self.clock.callLater(0, self.kick, id_)

    def kick(self, mid: str) -> None:
        if mid in self._working:
            self._again.add(mid)
            return
        self._working.add(mid)
        d = defer.maybeDeferred(self._step, mid)
        d.addErrback(
            lambda f: log.failure("migration {mid} step on {host}", failure=f, mid=mid, host=self.host_id)
        )

        def done(_):
            self._working.discard(mid)
            if mid in self._again:
                self._again.discard(mid)
                self.kick(mid)

        d.addBoth(done)

    def _decide(
        self,
        m: MigrationRec,
        now,
        trigger: Trigger = Trigger.CHANGED,
        peer_down_since: int | None = None,
        source_domain: str = "",
    ) -> phases.Action:
        """The phase machine's answer for ``m`` here, with what this host observes."""
        dest = self.dom.get(HostRec, m.dest)
        obs = Observations(
            trigger=trigger,
            peer_down_since=peer_down_since,
            dest_migrate_uri=dest.migrate_uri if dest is not None else "",
            volumes_on_disk=bool(self.driver.volumes_on_disk),
            source_domain=source_domain,
            held_by_dest=held_by_dest(self.dom, m),
        )
        return phases.decide(m, self.dom.get(VmRec, m.vm), self.host_id, int(now), obs, self.limits)

    @defer.inlineCallbacks
    def _step(self, mid: str):
        """Carries out the phase machine's answer for migration ``mid`` here."""
        m = self.dom.get(MigrationRec, mid)
        if m is None:
            return
        me = self.host_id
        action = self._decide(m, self.now_ms())
        if isinstance(action, (*phases.ACTING, Abort)):
            log.info(
                "migration {mid} of {vm}: host {host} acts on phase {phase}",
                mid=m.id,
                vm=m.vm,
                host=me,
                phase=m.phase,
            )
        if isinstance(action, Abort):
            yield self._fail(m, action.phase, action.reason)
            return
        try:
            if isinstance(action, PrepareDest):
                yield self._prepare(m, action)
            elif isinstance(action, MigrateMemory):
                yield self._live(m, action)
            elif isinstance(action, SaveMemory):
                yield self._save(m, action)
            elif isinstance(action, RestoreDest):
                yield self._restore(m, action)
            elif isinstance(action, Finish):
                yield self._finish_cold(m)
            elif isinstance(action, CleanUp):
                yield self._cleanup_failed(m, action)
        except VmwebError as e:
            after = phases.after_error(m, self.dom.get(MigrationRec, mid), me, str(e))
            if isinstance(after, Abort):
                yield self._fail(self.dom.get(MigrationRec, mid), after.phase, after.reason)

    def _vm_rec(self, m: MigrationRec) -> VmRec:
        """The VM being moved (the phase machine checked it is there before an action)."""
        return self.dom.get(VmRec, m.vm)

    # -- destination -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def _prepare(self, m: MigrationRec, action: PrepareDest):
        vm = self._vm_rec(m)
        if action.check_balancer:
            self._check_balancer_move(m, vm)
        cluster = self.dom.get(VClusterRec, vm.cluster)
        if cluster is None:
            raise VmwebError(f"cluster {vm.cluster!r} is gone")
        image = yield self.images.ensure(vm.image)
        # The cluster's segment first (the migration makes this host one of its holders).
        yield self.reconciler.apply_network()
        net_error = self.reconciler.segment_error(cluster)
        if net_error:
            raise HypervisorError(net_error)
        seed = yield self.reconciler.write_seed(vm)
        vol = volume_name(vm.id)
        # A leftover overlay (an earlier failed move) must not be mirrored into: start empty.
        yield self.driver.destroy(domain_name(vm.id))
        yield self.driver.undefine(domain_name(vm.id))
        yield self.driver.delete_volume(self.storage.pool, vol)
        disk = yield self.driver.create_overlay(
            self.storage.pool, vol, image.path, image.size_mib, image.format
        )
        spec = self.reconciler.spec_for(vm, cluster, image, disk, seed)
        yield self._advance(
            m, "ready", dest_disk=disk, dest_console=spec.serial_log or "", dest_seed=seed or ""
        )

    @defer.inlineCallbacks
    def _restore(self, m: MigrationRec, action: RestoreDest):
        try:
            mine = yield self._take_handover(m, RESTORE)
        except NoQuorum as e:
            # Nothing is lost by waiting: the VM stays saved at its source, and the source does
            # not fail the move without the same lease either.
            log.warn(
                "migration {mid}: restoring {vm} waits for a majority ({err}); trying again in {s:.0f} s",
                mid=m.id,
                vm=m.vm,
                err=e,
                s=HANDOVER_RETRY_S,
            )
            self.clock.callLater(HANDOVER_RETRY_S, self.kick, m.id)
            return
        if not mine:
            log.info(
                "migration {mid}: not restoring {vm} here: the move was failed first (its hand-over "
                "is taken), the VM goes back to {src}",
                mid=m.id,
                vm=m.vm,
                src=m.source,
            )
            return
        vm = self._vm_rec(m)
        cluster = self.dom.get(VClusterRec, vm.cluster)
        image = yield self.images.ensure(vm.image)
        src_addr = self.peer_address_of(m.source)
        work = Path(self.storage.dir)
        state = None
        if action.fetch_disk:
            yield self.run_blocking(
                fetch_file, src_addr, f"/migration/{m.id}/disk", Path(m.dest_disk), self.cert_dir, m.source
            )
        if action.fetch_state:  # a memory state was saved
            state = _state_file(work, m.id)
            yield self.run_blocking(
                fetch_file, src_addr, f"/migration/{m.id}/state", state, self.cert_dir, m.source
            )
        seed = yield self.reconciler.write_seed(vm)
        spec = self.reconciler.spec_for(vm, cluster, image, m.dest_disk, seed)
        yield self.driver.define(spec)
        if state is not None:
            try:
                yield self.driver.restore(str(state))
            finally:
                yield self.run_blocking(_unlink, state)
        yield self._advance(m, "restored")

    # -- source ----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _live(self, m: MigrationRec, action: MigrateMemory):
        vm = self._vm_rec(m)
        name = domain_name(vm.id)
        overlay = yield self.driver.volume_allocation(self.storage.pool, volume_name(vm.id))
        xml = yield self.driver.domain_xml(name)
        dest_xml = retarget_xml(xml, m.dest_disk, m.dest_console, m.dest_seed)
        if not phases.still_ready(self.dom.get(MigrationRec, m.id)):
            return  # failed (or abandoned) while we looked at the domain: do not start
        m = yield self._advance(m, "migrating", disk_bytes=overlay)
        stats = yield self.driver.migrate_live(name, action.uri, dest_xml)
        moved = stats.memory_bytes + max(stats.disk_bytes, overlay)
        yield self._done(m, vm, bytes=moved, total_ms=stats.total_ms, downtime_ms=stats.downtime_ms)
        yield self.driver.delete_volume(self.storage.pool, volume_name(vm.id))

    @defer.inlineCallbacks
    def _save(self, m: MigrationRec, action: SaveMemory):
        vm = self._vm_rec(m)
        name = domain_name(vm.id)
        info = yield self.driver.state(name)
        overlay = 0
        if action.measure_overlay:
            overlay = yield self.driver.volume_allocation(self.storage.pool, volume_name(vm.id))
            overlay = max(overlay, 1)  # says "a disk file follows" even for an empty overlay
        state_bytes = 0
        if info.state in ("running", "paused"):
            path = self._state_path(m)
            yield self.run_blocking(path.parent.mkdir, parents=True, exist_ok=True)
            yield self.driver.save(name, str(path))
            state_bytes = yield self.run_blocking(lambda: os.path.getsize(path))
        yield self._advance(m, "saved", disk_bytes=overlay, bytes=overlay + state_bytes)

    @defer.inlineCallbacks
    def _finish_cold(self, m: MigrationRec):
        vm = self._vm_rec(m)
        name = domain_name(vm.id)
        yield self._done(
            m, vm, total_ms=int(self.now_ms() - m.started_at), downtime_ms=int(self.now_ms() - m.started_at)
        )
        yield self.driver.undefine(name)
        yield self.driver.delete_volume(self.storage.pool, volume_name(vm.id))
        yield self.run_blocking(_unlink, self._state_path(m))

    @defer.inlineCallbacks
    def _finish_for_source(self, m: MigrationRec, down_ms: int):
        log.info(
            "migration {mid} of {vm}: its source {src} has not been alive for {s:.0f} s; the VM "
            "runs here, so this host records the end",
            mid=m.id,
            vm=m.vm,
            src=m.source,
            s=down_ms / 1000,
        )
        elapsed = int(self.now_ms() - m.started_at)
        yield self._done(m, self._vm_rec(m), total_ms=elapsed, downtime_ms=elapsed)

    def _state_path(self, m: MigrationRec) -> Path:
        return _state_file(Path(self.storage.dir), m.id)

    @defer.inlineCallbacks
    def _done(self, m: MigrationRec, vm: VmRec, **stats):
        # The VM's new host first, then the migration's end (versions in this order): a host
        # that sees the migration finished already knows where the VM now runs.
        now = int(self.now_ms())
        done = _replace(m, phase="done", finished_at=now, **stats)
        yield self.domsvc.put(_replace(vm, host=m.dest), done)
        self._nudge(None, done)
        log.info(
            "migration {mid}: {vm} now on {dst} ({mode}, {ms} ms, downtime {dt} ms, {b} bytes)",
            mid=m.id,
            vm=vm.id,
            dst=m.dest,
            mode=m.mode,
            ms=done.total_ms,
            dt=done.downtime_ms,
            b=done.bytes,
        )
        self.reconciler.kick()
        yield self._release(m, home=m.dest)

    # -- either side -----------------------------------------------------------------------
    def _advance(self, m: MigrationRec, phase: str, **kw) -> defer.Deferred:
        new = _replace(m, phase=phase, **kw)
        return self.domsvc.put(new).addCallback(self._nudge, new).addCallback(lambda _: new)

    def _nudge(self, _, m: MigrationRec):
        """The other host acts next: send it the change now, even if our failure detector
        currently thinks it dead (a loaded host flaps)."""
        others = [h for h in (m.source, m.dest) if h != self.host_id]
        self.push_to(others)

    @defer.inlineCallbacks
    def _take_handover(self, m: MigrationRec, side: str):
        """Takes cold move ``m``'s hand-over lease for ``side``: RESTORE, the destination runs
        the saved VM; FAIL, the move is failed and the VM restored at its source. Fires True if
        this host may go on. Paxos gives the key to one side only, so a destination restoring
        while the source gives up on it (a slow or cut-off destination) never leaves the VM
        running at both. A destination failing its own restore may go on too: its clean-up
        removes its copy."""
        try:
            yield self.table.acquire({handover_key(m.id): handover_holder(side, m.id)})
        except LeaseConflict as e:
            if side != FAIL:
                return False
            # Failed already (by another host, or an evacuation of the destination), or our own
            # restore that we fail: failing it (again) is harmless.
            own_restore = e.current == handover_holder(RESTORE, m.id) and self.host_id == m.dest
            return own_restore or e.current == handover_holder(FAIL, m.id)
        return True

    @defer.inlineCallbacks
    def _fail(self, m: MigrationRec, phase: str, message: str):
        now = self.dom.get(MigrationRec, m.id)
        if not phases.may_fail(m, now, self.dom.get(VmRec, m.vm)):
            return  # it ended (the source records the VM's new host first): nothing to fail
        if now is not None and phases.phase_of(now) is phases.Phase.SAVED:
            mine = yield self._take_handover(m, FAIL)
            if not mine:
                log.info(
                    "migration {mid} of {vm}: not failed ({msg}): its destination {dest} took the "
                    "hand-over and restores the VM there",
                    mid=m.id,
                    vm=m.vm,
                    msg=message,
                    dest=m.dest,
                )
                return
        log.warn(
            "migration {mid} of {vm} failed in phase {phase}: {msg}",
            mid=m.id,
            vm=m.vm,
            phase=phase,
            msg=message,
        )
        yield self._advance(
            m, "failed", error=f"phase {phase}: {message}"[:4000], finished_at=int(self.now_ms())
        )
        yield self._release(m, home=m.source)

    def _release(self, m: MigrationRec, home: str | None = None) -> defer.Deferred:
        """Gives back the migration lease and, in the same operation, frees the host the VM
        did not end on (``home`` is where it is now)."""
        lease = {lease_key(m.vm): (lease_holder(m.vm, m.id), None)}

        def build(change, with_lease=True):
            ops = dict(lease) if with_lease else {}
            vm = self.dom.get(VmRec, m.vm)
            if home is not None and vm is not None:
                other = m.source if home == m.dest else m.dest
                change.unreserve(vm.id, vm.token, [other], None)
                ops.update(change.ops())
            return ops

        def lease_gone(f):
            # The lease is not ours any more (given back already): settle without it.
            f.trap(LeaseConflict)
            if f.value.key not in lease:
                return f
            return self._transact(lambda c: build(c, with_lease=False))

        d = self._transact(build).addErrback(lease_gone)
        d.addErrback(
            lambda f: log.warn(
                "migration {mid}: lease not given back now ({err}); the reconciler will",
                mid=m.id,
                err=f.getErrorMessage(),
            )
        )
        return d

    @defer.inlineCallbacks
    def _cleanup_failed(self, m: MigrationRec, action: CleanUp):
        if action.remove_dest_copy:
            yield self.driver.destroy(domain_name(m.vm))
            yield self.driver.undefine(domain_name(m.vm))
            yield self.driver.delete_volume(self.storage.pool, volume_name(m.vm))
        if action.source_side:
            state = self._state_path(m)
            exists = yield self.run_blocking(state.exists)
            if exists and action.restore_saved:
                # A cold move failed after the save: bring the VM back as it was.
                try:
                    yield self.driver.restore(str(state))
                except VmwebError as e:
                    log.warn(
                        "migration {mid}: restoring {vm} here failed ({err}); the reconciler will boot it",
                        mid=m.id,
                        vm=m.vm,
                        err=e,
                    )
            yield self.run_blocking(_unlink, state)
            self.reconciler.kick()


#: A migration's memory state file is named ``.migrate-ID.state`` (at the source and the destination).
_STATE_PREFIX, _STATE_SUFFIX = ".migrate-", ".state"


def _swept(d: defer.Deferred, mid: str, what: str) -> defer.Deferred:
    """Says why a sweep's step on migration ``mid`` did not happen (it is tried again at the
    next sweep): without a majority, or any other error; the sweep itself goes on."""

    def failed(f):
        if f.check(VmwebError):
            log.warn(
                "migration {mid}: {what} at this sweep failed ({err}); the next sweep tries again",
                mid=mid,
                what=what,
                err=f.getErrorMessage(),
            )
        else:
            log.failure("migration {mid}: {what} at this sweep", failure=f, mid=mid, what=what)

    return d.addErrback(failed)


def _state_file(directory: Path, mid: str) -> Path:
    return directory / f"{_STATE_PREFIX}{mid}{_STATE_SUFFIX}"


def _left_states(directory: Path) -> list[tuple[str, Path]]:
    """(migration id, path) of each memory state file in ``directory``."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    prefix, suffix = _STATE_PREFIX, _STATE_SUFFIX
    return [
        (n[len(prefix) : -len(suffix)], directory / n)
        for n in sorted(names)
        if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix) + len(suffix)
    ]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
