"""Hosts that do not answer never get new work, never hold up an acknowledgement, and never keep a
VM that never ran on them waiting: one real host in-process (libvirt test driver, real gossip over
mutual TLS), and a second "host" that exists only as gossip membership, set by the test — a TCP
listener that accepts connections and never answers stands for a frozen (SIGSTOPped) daemon."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task

from vmwebd.dom.records import HostRec, LeaseRec, MigrationRec, SettingRec, VmRec, VmStatus, status_of
from vmwebd.errors import NoCapacity
from vmwebd.gossip import pki
from vmwebd.gossip.core import ALIVE, DEAD, SUSPECT
from vmwebd.gossip.messages import Envelope, Gossip, MemberState
from vmwebd.hv.naming import domain_name
from vmwebd.migrate.manager import replace_holder, replace_key

WAIT = 30.0
FROZEN = "hostz"


class _Silent(protocol.Protocol):
    def dataReceived(self, data):
        pass  # reads nothing, answers nothing: a stopped process's socket


class FrozenPeer(protocol.Factory):
    """Accepts TCP connections (the kernel does so for a SIGSTOPped daemon) and never answers."""

    def __init__(self):
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return _Silent()


@pytest.fixture
def frozen():
    from twisted.internet import reactor

    factory = FrozenPeer()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.addr = f"127.0.0.1:{port.getHost().port}"
    yield factory
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def gossiping(start_node, tmp_path):
    """Starts host1 with a grid certificate, so it runs gossip (it is its own consensus group)."""
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    cert = tmp_path / "host1-pki"
    pki.issue_host_cert(ca, "host1", cert, ["127.0.0.1"])

    def start(**kw):
        return start_node(extra=f'<peers cert-dir="{cert}" timing="local"/>', **kw)

    return start


def announce(node, addr: str, incarnation: int, status: str = ALIVE):
    """Feeds host1's gossip a rumor about the frozen host (as a peer's message would)."""
    by = node.host_id if status == SUSPECT else ""
    env = Envelope(
        FROZEN, addr, node.host_id, Gossip(), members=(MemberState(FROZEN, addr, incarnation, status, by),)
    )
    return node.gossip.receive(env)


class Refuting:
    """While started, the frozen host "refutes" every 0.1 s (an alive rumor at a new incarnation),
    as its first answers would: probing would otherwise soon suspect it and then declare it dead
    (and a dead host gets no pushes). ``incarnation`` is the last one announced."""

    def __init__(self, node, addr: str):
        from twisted.internet import reactor

        self.node, self.addr, self.incarnation = node, addr, 10
        self.loop = task.LoopingCall(self.again)
        self.loop.clock = reactor

    def again(self):
        self.incarnation += 1
        return announce(self.node, self.addr, self.incarnation, ALIVE)

    def __enter__(self):
        self.loop.start(0.1)
        return self

    def __exit__(self, *exc):
        self.loop.stop()


class Suspecting(Refuting):
    """While started, the frozen host is suspected afresh (a new incarnation) every 0.1 s: it
    stays suspect, its suspicion never running out into dead."""

    def __init__(self, node, addr: str, incarnation: int):
        super().__init__(node, addr)
        self.incarnation = incarnation

    def again(self):
        self.incarnation += 1
        return announce(self.node, self.addr, self.incarnation, SUSPECT)

    def __enter__(self):
        self.again()
        return super().__enter__()


def frozen_host_record(addr: str) -> HostRec:
    """The frozen host's own record as it spread before it stopped: bigger and emptier than host1,
    so placement would prefer it."""
    return HostRec(
        id=FROZEN,
        api="127.0.0.1:1",
        peer=addr,
        liveness="alive",
        cpus=64,
        memory_mib=262144,
        free_memory_mib=262144,
    )


def until(pred, timeout: float, what: str, every: float = 0.05) -> defer.Deferred:
    """Polls ``pred`` on the reactor until it holds; fails naming ``what`` after ``timeout`` s."""
    from twisted.internet import reactor

    @defer.inlineCallbacks
    def run():
        deadline = reactor.seconds() + timeout
        while True:
            value = pred()
            if value:
                return value
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            yield task.deferLater(reactor, every, lambda: None)

    return run()


@pytest_twisted.inlineCallbacks
def test_suspect_and_dead_hosts_get_no_new_vms_no_migrations_and_no_balancer_moves(gossiping, frozen):
    """A suspect host stays a live host (waits go on) but takes no VMs, no migration and no
    balancer move; alive again, it takes them (so the check can fail)."""
    h = yield gossiping()
    node = h.node
    node.migrations.replace_grace_s = 3600
    yield node.domsvc.put(frozen_host_record(frozen.addr))
    vms = [(f"x/pc{i}", 1, 512) for i in range(8)]

    yield announce(node, frozen.addr, 1, ALIVE)
    assert FROZEN in node.placeable_hosts()
    assert FROZEN in set(node.manager._place(vms).values())  # the bigger host takes VMs

    yield announce(node, frozen.addr, 1, SUSPECT)
    assert node.liveness(FROZEN) == "suspect"
    assert FROZEN in node.live_hosts() and FROZEN not in node.placeable_hosts()
    assert set(node.manager._place(vms).values()) == {"host1"}
    c = yield node.manager.create("fresh", "lab", "alice", 4)
    assert {v.host for v in c.vms} == {"host1"}
    vm = node.domsvc.dom.get(VmRec, "fresh/pc0")
    with pytest.raises(NoCapacity) as e:
        node.migrations.choose_dest(vm, FROZEN)
    assert "suspect" in str(e.value)
    hosts, _, _ = node.migrations.balancer_inputs()
    assert {x.host_id: x.live for x in hosts} == {"host1": True, FROZEN: False}

    yield announce(node, frozen.addr, 1, DEAD)
    assert FROZEN not in node.live_hosts() and FROZEN not in node.placeable_hosts()
    assert set(node.manager._place(vms).values()) == {"host1"}


@pytest_twisted.inlineCallbacks
def test_an_acknowledgement_waits_for_no_frozen_peer(gossiping, frozen):
    """Writes and a whole create at a healthy host with a frozen peer are acknowledged once the
    push wait runs out, never after the transport's timeout: every push round that included the
    frozen peer was cut by the bound once, and none waited on it longer."""
    h = yield gossiping()
    node, domsvc = h.node, h.node.domsvc
    node.migrations.replace_grace_s = 3600
    client_timeout = node.gossip.client.timeout
    assert domsvc.push_wait < client_timeout / 5
    with Refuting(node, frozen.addr):
        yield writes_with_a_frozen_peer(node, domsvc, frozen)


@defer.inlineCallbacks
def writes_with_a_frozen_peer(node, domsvc, frozen):
    """Three writes, then a create, each pushed to the frozen peer among others."""
    rounds, cut = domsvc.push_rounds, domsvc.push_waits_cut
    for i in range(3):
        yield domsvc.put(SettingRec(id=f"test.{i}", value=str(i)))
    assert domsvc.push_rounds - rounds >= 3
    yield all_cut(domsvc, rounds, cut)
    assert frozen.accepted >= 1  # the pushes did go to it

    rounds, cut = domsvc.push_rounds, domsvc.push_waits_cut
    c = yield node.manager.create("quick", "lab", "alice", 3)
    assert len(c.vms) == 3
    assert domsvc.push_rounds - rounds >= 1
    yield all_cut(domsvc, rounds, cut)


def all_cut(domsvc, rounds: int, cut: int) -> defer.Deferred:
    """Every push round since (ours, and background writes meanwhile) ends by the bound, none by
    an answer — the frozen peer's send fails only at the transport's timeout, which would count
    as answered, not cut: polled for less than that timeout."""
    return until(
        lambda: domsvc.push_waits_cut - cut == domsvc.push_rounds - rounds,
        domsvc.push_wait * 4,
        "every push round to be cut by the bound",
    )


@pytest_twisted.inlineCallbacks
def test_pending_vms_say_which_host_they_wait_for_and_why(gossiping, frozen):
    """A VM placed on a host that then stops answering shows, in GetCluster, the host's state as
    seen here and what to do; the answer cache follows liveness changes."""
    h = yield gossiping()
    node = h.node
    node.migrations.replace_grace_s = 3600
    yield node.domsvc.put(frozen_host_record(frozen.addr))
    with Refuting(node, frozen.addr) as refuting:
        yield h.call("CreateCluster", "slow", "lab", "alice", 6)
        # Read in the reactor turn of a refutation: the frozen host is alive here now.
        yield refuting.again()
        z = [v for v in node.manager.cluster("slow").vms if v.host == FROZEN]
        assert z and all(
            (v.state, v.detail) == ("pending", f"waiting for host {FROZEN} to start it") for v in z
        ), z
    with Suspecting(node, frozen.addr, refuting.incarnation):
        shown = yield h.call("GetCluster", "slow")
        z = [v for v in shown["vms"] if v["host"] == FROZEN]
        assert z and all(f"host {FROZEN} is suspect" in v["detail"] for v in z), z

    yield announce(node, frozen.addr, refuting.incarnation + 1000, DEAD)
    shown = yield h.call("GetCluster", "slow")  # not the cached answer from before
    z = [v for v in shown["vms"] if v["host"] == FROZEN]
    assert z and all(
        f"host {FROZEN} is dead" in v["detail"] and f"vmweb host evacuate {FROZEN}" in v["detail"] for v in z
    ), z
    # VMs on this (alive) host that run say nothing more.
    assert all(not v["detail"] for v in shown["vms"] if v["host"] == "host1" and v["state"] == "running")


@pytest_twisted.inlineCallbacks
def test_vms_that_never_ran_on_a_dead_host_are_placed_elsewhere_and_one_that_ran_stays(gossiping, frozen):
    """Once the frozen host is declared dead, its VMs with no status or a pending one boot on a
    live host with the same IP and MAC (a new token, under a re-placement lease, recorded as an
    evacuation); a VM it had reported running stays there for an admin's evacuate."""
    h = yield gossiping()
    node = h.node
    dom = node.domsvc.dom
    node.migrations.replace_grace_s = 0  # at once when declared dead
    yield node.domsvc.put(frozen_host_record(frozen.addr))
    yield announce(node, frozen.addr, 1, ALIVE)
    yield node.manager.create("boot", "lab", "alice", 8)
    before = {vm.id: vm for vm in dom.select(VmRec, "cluster", "boot")}
    on_z = sorted(i for i, vm in before.items() if vm.host == FROZEN)
    assert len(on_z) >= 3, {i: vm.host for i, vm in before.items()}
    ran, pending, silent = on_z[0], on_z[1], on_z[2:]
    # What the frozen host had reported before it stopped: one VM running, one pending.
    yield node.domsvc.put(
        VmStatus(id=ran, host=FROZEN, state="running", token=before[ran].token),
        VmStatus(id=pending, host=FROZEN, state="pending", token=before[pending].token),
    )

    yield announce(node, frozen.addr, 1, DEAD)

    def replaced():
        out = {}
        for i in [pending] + silent:
            vm = dom.get(VmRec, i)
            st = status_of(dom, vm)
            if vm.host == FROZEN or st is None or st.state != "running":
                return None
            out[i] = vm
        return out

    moved = yield until(replaced, WAIT, "the VMs that never ran to run on host1")
    for i, vm in moved.items():
        old = before[i]
        assert (vm.host, vm.ip, vm.mac) == ("host1", old.ip, old.mac)
        assert vm.token != old.token
        move = next(m for m in dom.all(MigrationRec) if m.vm == i)
        assert dom.get(LeaseRec, replace_key(old)).holder == replace_holder(i, move.id)
    domains = {d.name for d in (yield node.driver.list_domains())}
    assert {domain_name(i) for i in moved} <= domains
    moves = [m for m in dom.all(MigrationRec) if m.vm in moved]
    assert sorted(m.vm for m in moves) == sorted(moved)  # one move each
    assert {(m.mode, m.source, m.dest, m.phase) for m in moves} == {("evacuate", FROZEN, "host1", "done")}
    assert node.migrations.replaced == len(moved)
    # The one that had run stays with its host (its disk is there).
    assert dom.get(VmRec, ran) == before[ran]
    # Asked again (the next sweep), nothing more moves.
    assert (yield node.migrations.replace_never_ran()) == []


@pytest_twisted.inlineCallbacks
def test_a_creation_is_re_placed_at_most_once_even_by_a_stale_replica(gossiping, frozen):
    """The re-placement lease is per creation and stays held: a host whose replica has not yet
    heard of the first re-placement (here: the record put back as it was) cannot do it again."""
    h = yield gossiping()
    node = h.node
    dom = node.domsvc.dom
    node.migrations.replace_grace_s = 3600
    yield node.domsvc.put(frozen_host_record(frozen.addr))
    yield announce(node, frozen.addr, 1, ALIVE)
    yield node.manager.create("once", "lab", "alice", 6)
    on_z = sorted(vm.id for vm in dom.select(VmRec, "cluster", "once") if vm.host == FROZEN)
    assert on_z
    old = {i: dom.get(VmRec, i) for i in on_z}
    yield announce(node, frozen.addr, 1, DEAD)
    node.migrations.replace_grace_s = 0
    first = yield node.migrations.replace_never_ran()
    assert sorted(m.vm for m in first) == on_z
    # A stale view: the VMs back on the dead host with their old tokens.
    yield node.domsvc.put(*old.values())
    again = yield node.migrations.replace_never_ran()
    assert again == []
    assert all(dom.get(VmRec, i) == old[i] for i in on_z)  # untouched: another host did it
    # The leases stay while the VMs live, and are given back (after a grace, 0 here) once gone.
    held = [replace_key(old[i]) for i in on_z]
    node.migrations.replaced_grace_ms = 0
    yield node.migrations.release_replaced()
    assert all(dom.get(LeaseRec, k) is not None for k in held)
    yield node.manager.destroy("once")
    yield node.migrations.evacuate(FROZEN)  # deletes what waited on the dead host
    assert all(dom.get(VmRec, i) is None for i in on_z)
    yield node.migrations.release_replaced()
    assert [k for k in held if dom.get(LeaseRec, k) is not None] == []
    yield node.reconciler.idle()  # the destroy's last pass, before the host stops


@pytest_twisted.inlineCallbacks
def test_the_old_host_removes_its_copy_once_it_learns_the_vm_was_re_placed(start_node):
    """Back from being frozen, a host whose VM was re-placed elsewhere (new host, new token)
    removes its domain as an orphan, and its old status does not count for the new creation."""
    h = yield start_node(reconcile_interval=3600)
    node, rec = h.node, h.node.reconciler
    dom = node.domsvc.dom
    yield h.call("CreateCluster", "back", "lab", "alice", 2)
    yield rec.settled()
    vm = dom.get(VmRec, "back/pc0")
    assert status_of(dom, vm).state == "running"
    # What gossip brings on its return: the VM now on host2, a new creation token.
    elsewhere = dataclasses.replace(vm, host="host2", token="0a0b0c0d")
    yield node.domsvc.put(elsewhere)
    yield rec.idle()
    names = {d.name for d in (yield node.driver.list_domains())}
    assert domain_name(vm.id) not in names and domain_name("back/pc1") in names
    assert status_of(dom, dom.get(VmRec, vm.id)) is None  # host1's old status is not its
    assert dom.get(VmStatus, vm.id).token == vm.token


@pytest_twisted.inlineCallbacks
def test_a_proposer_suspected_briefly_is_still_asked_and_one_suspected_long_is_not(gossiping, frozen):
    """The grid's proposer is the first consensus member that is alive — or suspect for less
    than a few seconds: a loaded proposer is suspected and cleared again and again, and hosts
    switching proposers at every suspicion made several proposers duel over the same keys."""
    h = yield gossiping()
    node = h.node
    node.leases.core.set_members(("host0", "host1"))

    def rumor(status, inc):
        by = node.host_id if status == SUSPECT else ""
        return node.gossip.receive(
            Envelope(
                FROZEN,
                frozen.addr,
                node.host_id,
                Gossip(),
                members=(MemberState("host0", frozen.addr, inc, status, by),),
            )
        )

    yield rumor(ALIVE, 1)
    assert node._proposer_for() == "host0"
    yield rumor(SUSPECT, 1)
    assert node.liveness("host0") == "suspect"
    patience = node.PROPOSER_PATIENCE_S
    t = node.gossip.core.suspected_since("host0")  # when the suspicion began
    assert node._proposer_for(now=t) == "host0"
    assert node._proposer_for(now=t + patience / 2) == "host0"
    assert node._proposer_for(now=t + patience) is None  # too long: run here
    yield rumor(ALIVE, 2)  # it refuted
    assert node._proposer_for(now=t + 20) == "host0"
    yield rumor(SUSPECT, 2)
    t2 = node.gossip.core.suspected_since("host0")
    assert node._proposer_for(now=t2 + 1) == "host0"  # a new suspicion, counted afresh
    yield rumor(DEAD, 2)
    assert node._proposer_for(now=t2 + 1.5) is None
