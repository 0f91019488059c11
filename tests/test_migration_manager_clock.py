"""Two migration managers on one ``task.Clock``, each over its own host of libvirt's test driver
(``test:///ABS/node.xml``), carrying out a cold move phase by phase as the phase machine answers.

Everything blocking runs at once on the test's thread: the managers' file work and the DOM
store through an inline runner, the drivers' libvirt calls through a pool stand-in that runs
them inline. The two hosts share one DOM replica (standing in for gossip, which would carry
each change from one to the other). Doubles stand in for what the move needs but is not under
test: the image store (a base volume made here), the reconciler's domain spec and seed, and the
allocator's lease and capacity round at the end (recorded, not decided by consensus: the lease
service on a Clock is tests/test_lease_service_clock.py). A cold move's hand-over lease is
decided by a real lease service, a Paxos group of one on the same clock, which both managers ask
(as two hosts ask their grid's). A running VM's cold move fetches its
memory file from the source's peer endpoint over TLS (``vmwebd.hv.images.fetch_file``, called by
name): that cannot be had in process, so the VMs moved here are stopped ones (no memory to carry).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from vmwebd.blocking import InlineRunner
from vmwebd.cluster import HostUsage
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.persist import DomService, load_dom
from vmwebd.dom.records import HostRec, LeaseRec, MigrationRec, VClusterRec, VmRec
from vmwebd.errors import HypervisorError, NoQuorum
from vmwebd.hv.driver import DomainSpec
from vmwebd.hv.libvirt_driver import LibvirtDriver
from vmwebd.hv.naming import domain_name, volume_name
from vmwebd.hv.testhost import write_test_host
from vmwebd.lease.allocator import parse_holder
from vmwebd.lease.service import LeaseService, PaxosLeaseTable
from vmwebd.migrate.manager import MigrationManager
from vmwebd.migrate.state import STALE_MS, handover_key, in_flight
from vmwebd.reconcile import StorageLayout
from vmwebd.reconcile_plan import lease_orphaned

START_S = 1_700_000_000.0
POOL = "vmweb"
VM = "c1/web"


class ClockReactor(task.Clock):
    """A ``task.Clock`` that also takes calls from a "thread" (the pool stand-in's, which is
    the test's own): at once."""

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


class InlinePool:
    """Stands in for the driver's one-thread pool: runs each call at once on the caller's thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kw):
        try:
            result = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def stop(self):
        pass


@dataclass
class Image:
    path: str
    size_mib: int = 64
    format: str = "qcow2"


class Images:
    """The image store's part in a move: the base image is usable here."""

    def __init__(self, path: str):
        self.image = Image(path)

    def ensure(self, name):
        return defer.succeed(self.image)


class Reconciler:
    """The reconciler's part in a move: the cluster's network, the guest's seed, its domain."""

    def __init__(self):
        self.kicks = 0

    def apply_network(self):
        return defer.succeed(None)

    def segment_error(self, cluster):
        return None

    def write_seed(self, vm):
        return defer.succeed(None)

    def spec_for(self, vm, cluster, image, disk, seed=None):
        return DomainSpec(
            name=domain_name(vm.id),
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            disk_path=disk,
            network="default",
            mac=vm.mac,
            domain_type="test",
            metadata={"vm": vm.id, "cluster": cluster.id, "owner": cluster.owner},
        )

    def kick(self):
        self.kicks += 1


class Change:
    def __init__(self):
        self.unreserved = []
        self.moved = []

    def unreserve(self, vm_id, token, hosts, owner):
        self.unreserved.append((vm_id, tuple(hosts)))

    def ops(self, *limits):
        return {}

    def usage(self, host):
        """What the capacity set holds on ``host``: nothing (a grid of two empty hosts)."""
        return HostUsage(0, 0, 0)

    def move(self, vm_id, token, vcpus, memory_mib, source, dest, **kw):
        self.moved.append((vm_id, source, dest))


class Allocator:
    """Records the consensus operations a manager asks for (lease and capacity), decided at once."""

    def __init__(self):
        self.ops = []
        self.unreserved = []

    def transact(self, build):
        change = Change()
        self.ops.append(build(change))
        self.unreserved += change.unreserved
        return defer.succeed(None)


class Grid:
    def __init__(self, tmp_path, started=("host1", "host2")):
        self.clock = ClockReactor()
        self.live = {"host1", "host2"}
        self.clock.advance(START_S)
        self.run = InlineRunner()
        hlc = HybridClock("host1", self.now_ms)
        dom, store, n = load_dom(tmp_path / "dom", hlc, fsync=False)
        self.domsvc = DomService(dom, store, self.clock, journal_records=n, run_blocking=self.run)
        self.dom = dom
        self.allocator = Allocator()
        self.leases = LeaseService(
            "host1",
            self.domsvc,
            tmp_path / "paxos",
            self.clock,
            hlc,
            random.Random(7),
            ("host1",),
            lambda dst, msgs, timeout=None: defer.succeed(False),  # a group of one sends nothing
            fsync=False,
            run_blocking=self.run,
        )
        assert self.done(self.leases.start())
        self.table = PaxosLeaseTable(self.leases)
        self.drivers, self.managers, self.reconcilers = {}, {}, {}
        for h in ("host1", "host2"):
            (tmp_path / h).mkdir()
            uri = write_test_host(tmp_path / h / "node.xml", 8, 16384)
            driver = LibvirtDriver(uri, reactor=self.clock, threadpool=InlinePool())
            images_dir = tmp_path / h / "images"
            assert self.done(driver.ensure_pool(POOL, str(images_dir)))
            base = self.result(driver.create_base_volume(POOL, "debian-12.qcow2", 64))
            self.drivers[h] = driver
            self.reconcilers[h] = Reconciler()
            self.managers[h] = MigrationManager(
                h,
                self.domsvc,
                driver,
                Images(base),
                self.reconcilers[h],
                table=self.table,
                storage=StorageLayout(POOL, str(images_dir)),
                now_ms=self.now_ms,
                live_hosts=lambda: set(self.live),
                liveness=lambda host: "alive" if host in self.live else "dead",
                peer_address_of=lambda host: None,
                cert_dir=tmp_path / "pki",
                clock=self.clock,
                allocator=self.allocator,
                run_blocking=self.run,
            )
        self.put(
            HostRec(id="host1", cpus=8, memory_mib=16384),
            HostRec(id="host2", cpus=8, memory_mib=16384),
            VClusterRec(id="c1", owner="alice", vni=100, token="t1"),
            VmRec(
                id=VM,
                cluster="c1",
                name="web",
                host="host1",
                image="debian-12",
                mac="52:54:00:00:00:01",
                token="v1",
            ),
        )
        # The VM at its source, defined and shut off, over its overlay.
        src = self.drivers["host1"]
        disk = self.result(src.create_overlay(POOL, volume_name(VM), base, 64))
        vm, cluster = self.dom.get(VmRec, VM), self.dom.get(VClusterRec, "c1")
        assert self.done(src.define(self.reconcilers["host1"].spec_for(vm, cluster, None, disk)))
        self.seen: list[tuple] = []
        self.dom.subscribe(self._record)
        for h in started:
            self.managers[h].start()

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def result(self, d):
        """The result of a Deferred that an inline runner fired already (its error raised)."""
        out = []
        d.addBoth(out.append)
        assert out, "blocking work ran inline, so the Deferred has fired"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def done(self, d) -> bool:
        self.result(d)
        return True

    def put(self, *recs):
        assert self.done(self.domsvc.put(*recs))

    def migration(self, mid="m1") -> MigrationRec:
        return self.dom.get(MigrationRec, mid)

    def run_until_quiet(self):
        """Runs what is due on the clock (each host reacting to what it saw) until nothing is,
        without letting any time pass."""
        for _ in range(50):
            if not any(c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)
        raise AssertionError("the hosts kept reacting to each other")

    def _record(self, kind, id_):
        """Notes each migration phase as it is written: the VM's host in the DOM, and the
        domains each host's libvirt holds, at that moment."""
        if kind == "migration" and id_ == "m1":
            m = self.migration()
            host = self.dom.get(VmRec, VM).host
            self.seen.append((m.phase, host, self.domains("host1"), self.domains("host2")))

    def domains(self, host):
        return [i.name for i in self.result(self.drivers[host].list_domains())]

    def volumes(self, host):
        return self.result(self.drivers[host].list_volumes(POOL))

    def close(self):
        for d in self.drivers.values():
            self.result(d.close())
        self.leases.stop()
        self.domsvc.close()


@pytest.fixture
def grid(tmp_path):
    g = Grid(tmp_path)
    yield g
    g.close()


def _move(grid, phase, mode, **kw):
    """Writes move m1 of the VM from host1 to host2 as it stands in ``phase``."""
    m = MigrationRec(
        id="m1", vm=VM, source="host1", dest="host2", phase=phase, mode=mode, started_at=grid.now_ms(), **kw
    )
    grid.put(m)
    return m


def _request(grid):
    """What ``MigrationManager.request`` writes once the lease is held: phase prepare."""
    _move(grid, "prepare", "cold")


def test_a_cold_move_runs_phase_by_phase_to_done(grid):
    name = domain_name(VM)
    assert grid.domains("host1") == [name] and grid.domains("host2") == []
    _request(grid)
    grid.run_until_quiet()
    # Each phase written in turn by the host the phase machine names, what the hosts hold then.
    assert grid.seen == [
        ("prepare", "host1", [name], []),
        ("ready", "host1", [name], []),  # the destination prepared an empty overlay
        ("saved", "host1", [name], []),
        ("restored", "host1", [name], [name]),  # the destination defined the domain
        ("done", "host2", [name], [name]),  # the VM's new host recorded with the end
    ]
    m = grid.migration()
    assert m.dest_disk.endswith(volume_name(VM)) and m.error == "" and m.bytes == 0  # nothing to carry
    # The source removed its domain and overlay, the destination keeps its own.
    assert grid.domains("host1") == [] and volume_name(VM) not in grid.volumes("host1")
    assert grid.domains("host2") == [name] and volume_name(VM) in grid.volumes("host2")
    # The lease given back, and the VM's reservation at its source with it.
    assert grid.allocator.unreserved == [(VM, ("host1",))]
    assert [k for ops in grid.allocator.ops for k in ops] == [f"migration/{VM}"]
    assert grid.clock.seconds() == START_S  # no time passed at all


@pytest.fixture
def grid_dest_dead(tmp_path):
    """host2's manager never runs: host2 died before it could act."""
    g = Grid(tmp_path, started=("host1",))
    yield g
    g.close()


def test_a_destination_declared_dead_fails_the_move_in_phase_prepare_after_its_grace(grid_dest_dead):
    """The destination leaves the live set and never prepares: the source's sweep starts the
    grace when it first finds it gone, and fails the move in phase prepare once the grace
    (60 s of clock time) has passed; the VM stays at its source."""
    grid = grid_dest_dead
    name = domain_name(VM)
    grid.live.discard("host2")
    _request(grid)
    grid.run_until_quiet()
    assert grid.migration().phase == "prepare"
    grid.managers["host1"].sweep()  # the grace starts now
    grid.clock.advance(59.0)
    grid.managers["host1"].sweep()
    assert grid.migration().phase == "prepare"
    grid.clock.advance(1.0)
    grid.managers["host1"].sweep()
    grid.run_until_quiet()
    m = grid.migration()
    assert m.phase == "failed" and m.error == "phase prepare: host host2 has not been alive for 60 s", m.error
    assert [s[:2] for s in grid.seen] == [("prepare", "host1"), ("failed", "host1")]
    assert grid.dom.get(VmRec, VM).host == "host1" and grid.domains("host1") == [name]
    assert grid.allocator.unreserved == [(VM, ("host2",))]  # host2's reservation given back


@pytest.fixture
def grid_stopped(tmp_path):
    """Neither manager started yet: host1 is about to restart with its DOM as it was left."""
    g = Grid(tmp_path, started=())
    yield g
    g.close()


def test_a_restart_removes_the_memory_states_of_moves_that_ended_and_keeps_the_others(grid_stopped):
    """host1 comes back with memory states on its disk: one of a move that failed while it was
    down, one of a migration gone from the DOM, one of a move it was saving (failed now: its
    libvirt job is not to be trusted), and one of a move under way elsewhere. The first three are
    removed, the last kept; the interrupted one is failed."""
    g = grid_stopped
    storage = g.managers["host1"].storage.dir

    def migration(mid, phase, source="host1", dest="host2"):
        return MigrationRec(
            id=mid, vm=VM, source=source, dest=dest, phase=phase, mode="cold", started_at=g.now_ms()
        )

    g.put(
        migration("ended", "failed"),
        migration("saving", "saved"),
        migration("elsewhere", "prepare", source="host2", dest="host1"),
    )
    states = {
        mid: Path(storage) / f".migrate-{mid}.state" for mid in ("ended", "gone", "saving", "elsewhere")
    }
    Path(storage).mkdir(parents=True, exist_ok=True)  # the test driver's pool keeps no files
    for path in states.values():
        path.write_bytes(b"memory")
    resumed = g.managers["host1"].resume()
    g.run_until_quiet()  # failing the move saved here takes its hand-over by consensus
    assert g.result(resumed) is None
    assert {mid for mid, path in states.items() if path.exists()} == {"elsewhere"}
    assert g.migration("saving").phase == "failed"
    assert "host host1 restarted during phase 'saved'" in g.migration("saving").error
    assert g.migration("elsewhere").phase in ("prepare", "ready")


def _saved(grid):
    """The move as its source leaves it once the VM is saved (a stopped VM: nothing to carry),
    with the destination's empty overlay prepared."""
    dest = grid.drivers["host2"]
    base = grid.managers["host2"].images.image.path
    disk = grid.result(dest.create_overlay(POOL, volume_name(VM), base, 64))
    return _move(grid, "saved", "cold", dest_disk=disk)


def _give_up_on_host2(grid):
    """host1's sweep finds host2 out of the live set, and again once the 60 s grace passed."""
    grid.live.discard("host2")
    grid.managers["host1"].sweep()
    grid.clock.advance(60.0)
    grid.managers["host1"].sweep()
    grid.run_until_quiet()


@pytest.fixture
def grid_source_only(tmp_path):
    """Only host1's manager reacts to changes; the test drives host2's by hand, as it would act
    on a replica that has not heard the latest change yet."""
    g = Grid(tmp_path, started=("host1",))
    yield g
    g.close()


def test_a_destination_restoring_a_move_its_source_failed_first_leaves_the_vm_at_the_source(
    grid_source_only,
):
    """host2 is silent for 60 s while the move is saved: host1 fails it, taking the hand-over
    lease, and brings the VM back. host2, acting on its replica's ``saved`` (the failure not
    heard yet), asks for the same lease to restore, is refused, and leaves the VM alone: one
    copy, at the source. Without the lease host2 would define the VM too."""
    grid = grid_source_only
    name = domain_name(VM)
    stale = _saved(grid)
    _give_up_on_host2(grid)
    m = grid.migration()
    assert m.phase == "failed" and "host host2 has not been alive for 60 s" in m.error, m.error
    assert grid.table.holder(handover_key("m1")) == "handover:fail#m1"
    mgr = grid.managers["host2"]
    action = mgr._decide(stale, grid.now_ms())
    assert type(action).__name__ == "RestoreDest"  # what host2 does on its stale replica
    d = mgr._restore(stale, action)
    grid.run_until_quiet()
    grid.result(d)
    assert grid.domains("host2") == [] and grid.domains("host1") == [name]
    assert grid.migration().phase == "failed" and grid.dom.get(VmRec, VM).host == "host1"


def test_a_source_giving_up_after_its_destination_took_the_hand_over_waits_for_the_restore(
    grid_source_only,
):
    """host2 took the hand-over to restore, then fell silent for 60 s (a loaded host): host1's
    sweep does not fail the move (which would restore the VM at host1 while host2 runs it) and
    keeps waiting; once host2 restores, host1 finishes the move: one copy, at the destination."""
    grid = grid_source_only
    name = domain_name(VM)
    m = _saved(grid)
    mgr = grid.managers["host2"]
    took = mgr._take_handover(m, "restore")
    grid.run_until_quiet()
    assert grid.result(took) is True
    _give_up_on_host2(grid)
    assert grid.migration().phase == "saved"  # not failed: the destination has it
    assert grid.domains("host1") == [name] and grid.domains("host2") == []
    grid.live.add("host2")
    mgr.start()  # host2 acts on what it sees: the move saved, the hand-over its own
    grid.run_until_quiet()
    assert [s[:2] for s in grid.seen][-2:] == [("restored", "host1"), ("done", "host2")]
    assert grid.domains("host1") == [] and grid.domains("host2") == [name]
    assert grid.table.holder(handover_key("m1")) == "handover:restore#m1"


def test_a_saved_move_whose_destination_took_the_hand_over_and_died_waits_for_an_evacuation(
    grid_source_only,
):
    """host2 took the hand-over of a saved move, then died. The move is never timed out by its
    source (which could not fail it) nor abandoned after STALE_MS: host2 may be cut off with the
    VM restored, and restarting it at host1 would run it twice. It stays the reconciler's
    business of nobody (in flight, its lease kept) until an admin evacuates host2: the hand-over
    then goes to a failure by consensus, the move fails, and host1 restores the VM."""
    grid = grid_source_only
    name = domain_name(VM)
    m = _saved(grid)
    took = grid.managers["host2"]._take_handover(m, "restore")
    grid.run_until_quiet()
    assert grid.result(took) is True
    _give_up_on_host2(grid)
    grid.clock.advance(STALE_MS / 1000)
    _sweep(grid, grid.managers["host1"])
    now = grid.now_ms()
    m = grid.migration()
    assert m.phase == "saved" and now - m.started_at > STALE_MS
    assert VM in in_flight(grid.dom, now)  # the reconciler leaves the VM to its move
    lease = LeaseRec(id=f"migration/{VM}", holder=f"migration:{VM}#m1", granted_at=m.started_at)
    assert not lease_orphaned(lease, parse_holder(lease.holder), grid.dom, now, 0)  # kept
    assert grid.domains("host1") == [name] and grid.domains("host2") == []
    assert grid.managers["host1"].waiting(m) == (
        "host host2 to restore the saved VM, which it holds; it is dead as host host1 sees it "
        "(evacuate host2 if it is gone for good: the VM is then restored at host1)"
    )
    moves = grid.managers["host1"].evacuate("host2", "admin")
    grid.run_until_quiet()
    m = grid.migration()
    assert grid.result(moves) == [m]  # the move it ended; no VM of host2's to re-place
    assert m.phase == "failed" and "its destination host2 was evacuated by admin" in m.error, m.error
    assert grid.table.holder(handover_key("m1")) == "handover:fail#m1"
    assert grid.dom.get(VmRec, VM).host == "host1" and grid.domains("host1") == [name]
    assert grid.managers["host1"].waiting(m) == ""
    # Back after all, host2 acts on the move as it finds it (failed): nothing of it is defined there.
    grid.live.add("host2")
    grid.managers["host2"].start()
    grid.run_until_quiet()
    assert grid.domains("host2") == [] and grid.migration().phase == "failed"


def test_evacuating_the_destination_of_a_restored_move_ends_it_there_and_re_places_the_vm(grid_dest_only):
    """host2 restored the move (the VM ran there) and died before host1 recorded the end: the
    evacuation of host2 records the move done at host2, then re-places the VM with host2's
    others (at host1, the only live host)."""
    grid = grid_dest_only
    _saved(grid)
    grid.run_until_quiet()
    assert grid.migration().phase == "restored"
    grid.live.discard("host2")
    moves = grid.managers["host1"].evacuate("host2", "admin")
    grid.run_until_quiet()
    moves = grid.result(moves)
    assert grid.migration().phase == "done"
    assert [(m.vm, m.source, m.dest, m.mode, m.phase) for m in moves] == [
        (VM, "host1", "host2", "cold", "done"),  # the move it ended at host2
        (VM, "host2", "host1", "evacuate", "done"),
    ]
    assert grid.dom.get(VmRec, VM).host == "host1"


def test_without_the_hand_over_a_stale_move_is_abandoned_as_before(grid_source_only):
    """The same move saved, its destination silent, but the hand-over not taken: after STALE_MS
    everyone leaves it (its lease is an orphan for the reconciler to give back)."""
    grid = grid_source_only
    _saved(grid)
    grid.clock.advance(STALE_MS / 1000)
    now = grid.now_ms()
    assert VM not in in_flight(grid.dom, now)
    assert grid.managers["host1"].waiting(grid.migration()) == "nothing: abandoned, unfinished after 15 min"
    lease = LeaseRec(id=f"migration/{VM}", holder=f"migration:{VM}#m1", granted_at=now - STALE_MS)
    assert lease_orphaned(lease, parse_holder(lease.holder), grid.dom, now, 0)


def _migrating(grid):
    """A live move as its source's executor leaves it while libvirt's job runs."""
    return _move(grid, "migrating", "live")


def test_a_source_restarted_after_libvirt_finished_its_live_move_records_it_done(grid_stopped):
    """host1's daemon died during a live move; libvirtd finished it meanwhile: the guest runs at
    host2 and host1's domain is undefined (UNDEFINE_SOURCE). Restarted, host1 asks libvirt, finds
    its domain gone and records the move done with the VM on host2, whose guest stays (failing
    the move would have host2 remove the guest that arrived, and its disk)."""
    g = grid_stopped
    name = domain_name(VM)
    _migrating(g)
    # What libvirt did while the daemon was down.
    assert g.done(g.drivers["host1"].undefine(name))
    dest = g.drivers["host2"]
    disk = g.result(dest.create_overlay(POOL, volume_name(VM), g.managers["host2"].images.image.path, 64))
    vm, cluster = g.dom.get(VmRec, VM), g.dom.get(VClusterRec, "c1")
    assert g.done(dest.define(g.reconcilers["host2"].spec_for(vm, cluster, None, disk)))
    assert g.done(dest.start(name))
    resumed = g.managers["host1"].resume()
    g.run_until_quiet()
    assert g.result(resumed) is None
    m = g.migration()
    assert m.phase == "done" and m.error == "", (m.phase, m.error)
    assert g.dom.get(VmRec, VM).host == "host2"
    assert g.domains("host2") == [name] and g.domains("host1") == []
    assert volume_name(VM) not in g.volumes("host1")  # the source's overlay went with the end
    assert g.allocator.unreserved == [(VM, ("host1",))]  # host1's reservation given back


def test_a_source_restarted_when_libvirt_moved_nothing_fails_the_move_and_keeps_the_vm(grid_stopped):
    """Same restart, but host1's domain is still defined and no job runs (libvirt gave up when
    its caller died): the move is failed, the VM stays on host1."""
    g = grid_stopped
    name = domain_name(VM)
    _migrating(g)
    resumed = g.managers["host1"].resume()
    g.run_until_quiet()
    assert g.result(resumed) is None
    m = g.migration()
    assert m.phase == "failed" and "host host1 restarted during phase 'migrating'" in m.error
    assert g.dom.get(VmRec, VM).host == "host1" and g.domains("host1") == [name]


def _arrived_at_host2(g):
    """The guest as libvirt's move leaves it at the destination: defined and running."""
    dest = g.drivers["host2"]
    disk = g.result(dest.create_overlay(POOL, volume_name(VM), g.managers["host2"].images.image.path, 64))
    vm, cluster = g.dom.get(VmRec, VM), g.dom.get(VClusterRec, "c1")
    assert g.done(dest.define(g.reconcilers["host2"].spec_for(vm, cluster, None, disk)))
    assert g.done(dest.start(domain_name(VM)))


def test_a_restarted_source_whose_move_ends_between_its_two_libvirt_calls_records_it_done(
    grid_stopped, monkeypatch
):
    """host1 restarted during a live move asks libvirt for its domain (still defined) and then
    for its job; libvirt finishes the move in between, undefining the domain, and the job lookup
    fails. The state is read again: gone, so the move is done and host2's guest stays. (Taken
    for a failure, the move had host2 remove the guest that had arrived, and host1 boot it
    afresh: seen on real hosts.)"""
    g = grid_stopped
    name = domain_name(VM)
    _migrating(g)
    _arrived_at_host2(g)
    src = g.drivers["host1"]

    def job_running(domain):
        assert g.done(src.undefine(domain))  # the move ends just now
        return defer.fail(HypervisorError(f"get the job of domain {domain!r}: Domain not found"))

    monkeypatch.setattr(src, "job_running", job_running)
    resumed = g.managers["host1"].resume()
    g.run_until_quiet()
    assert g.result(resumed) is None
    m = g.migration()
    assert m.phase == "done" and m.error == "", (m.phase, m.error)
    assert g.dom.get(VmRec, VM).host == "host2" and g.domains("host2") == [name]


def test_a_restarted_source_that_libvirt_does_not_answer_looks_again_and_never_fails_on_that(
    grid_stopped, monkeypatch
):
    """The job lookup fails while the domain is still defined (libvirtd did not answer): the
    move is not failed but looked at again 2 s later; by then libvirt finished it."""
    g = grid_stopped
    name = domain_name(VM)
    _migrating(g)
    src = g.drivers["host1"]
    monkeypatch.setattr(src, "job_running", lambda domain: defer.fail(HypervisorError("libvirtd is busy")))
    resumed = g.managers["host1"].resume()
    g.run_until_quiet()
    assert g.result(resumed) is None
    assert g.migration().phase == "migrating"
    _arrived_at_host2(g)
    assert g.done(src.undefine(name))  # what libvirt did meanwhile
    g.clock.advance(2.0)
    g.run_until_quiet()
    m = g.migration()
    assert m.phase == "done" and g.dom.get(VmRec, VM).host == "host2" and g.domains("host2") == [name]


@pytest.fixture
def grid_dest_only(tmp_path):
    """Only host2's manager runs: host1 died once its cold move was saved."""
    g = Grid(tmp_path, started=("host2",))
    yield g
    g.close()


def test_a_destination_that_restored_a_move_whose_source_died_records_the_end(grid_dest_only):
    """host2 restores a cold move while host1 (its source) is dead: nobody records the VM's new
    host in ``restored`` but the source. host2's sweep starts the grace when it first finds
    host1 out of the live set, and once the grace (60 s) passed records the end in host1's
    stead: the VM on host2, the move done, host1's reservation given back."""
    grid = grid_dest_only
    name = domain_name(VM)
    _saved(grid)
    grid.run_until_quiet()
    assert grid.migration().phase == "restored" and grid.domains("host2") == [name]
    grid.live.discard("host1")
    mgr = grid.managers["host2"]
    mgr.sweep()  # the grace starts now
    grid.clock.advance(59.0)
    mgr.sweep()
    grid.run_until_quiet()
    assert grid.migration().phase == "restored" and grid.dom.get(VmRec, VM).host == "host1"
    grid.clock.advance(1.0)
    mgr.sweep()
    grid.run_until_quiet()
    m = grid.migration()
    assert m.phase == "done" and m.error == "" and m.total_ms >= 60_000, m
    assert grid.dom.get(VmRec, VM).host == "host2" and grid.domains("host2") == [name]
    assert [s[:2] for s in grid.seen][-2:] == [("restored", "host1"), ("done", "host2")]
    assert grid.allocator.unreserved == [(VM, ("host1",))]
    assert [k for ops in grid.allocator.ops for k in ops] == [f"migration/{VM}"]


def test_a_sweep_that_cannot_fail_a_move_says_why_and_tries_again(grid_source_only, monkeypatch):
    """host2 is silent past the grace while the move is saved, and host1 cannot take the
    hand-over (no majority): its sweep logs why the move was not failed, ends without an error,
    and fails the move at its next sweep once the majority is back."""
    grid = grid_source_only
    _saved(grid)
    mgr = grid.managers["host1"]
    take = mgr._take_handover
    monkeypatch.setattr(
        mgr, "_take_handover", lambda m, side: defer.fail(NoQuorum("cannot lease without a majority"))
    )
    events = []

    def observe(event):
        if event.get("log_level") is not None and event["log_level"] >= LogLevel.warn:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        grid.live.discard("host2")
        _sweep(grid, mgr)
        grid.clock.advance(60.0)
        _sweep(grid, mgr)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert grid.migration().phase == "saved"
    said = [e["log_format"].format(**e) for e in events if "at this sweep" in e.get("log_format", "")]
    assert said == [
        "migration m1: failing it at this sweep failed (cannot lease without a majority); "
        "the next sweep tries again"
    ], [e.get("log_format") for e in events]
    monkeypatch.setattr(mgr, "_take_handover", take)
    _sweep(grid, mgr)
    assert grid.migration().phase == "failed"


def _sweep(grid, mgr):
    """One sweep of ``mgr``, run to its end (its steps take leases by consensus on the clock)."""
    d = mgr.sweep()
    grid.run_until_quiet()
    assert grid.result(d) is not None  # the DeferredList's results: it never fails
