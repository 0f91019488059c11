"""Collecting tombstones (vmwebd/dom/gc.py): only once every host holds them, and never bringing a
deleted entity back — checked on hand-made replicas and in the deterministic simulator with drops,
duplicates, delays, partitions and crashes."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmwebd.dom.document import Dom
from vmwebd.dom.gc import collectable, forgotten, format_cvv, parse_cvv
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import HostRec, VmRec, VmStatus
from vmwebd.gossip.core import LOCAL_TEST
from vmwebd.gossip.domport import DomPortAdapter
from vmwebd.gossip.sim import Simulation

origins = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
stamps = st.tuples(st.integers(0, 10**15 - 1), st.integers(0, 10**9 - 1))


@given(st.dictionaries(origins, stamps, max_size=20))
def test_vector_text_round_trips(cvv):
    assert parse_cvv(format_cvv(cvv)) == cvv


def test_malformed_vector_entries_only_cover_less():
    assert parse_cvv("h1:5.0 junk h2:x.1 H3:1.1 h4:7.2") == {"h1": (5, 0), "h4": (7, 2)}


class Clock:
    def __init__(self, ms=1_000_000):
        self.ms = ms

    def __call__(self):
        return self.ms


def replica(me="h1", clock=None):
    return Dom(HybridClock(me, clock or Clock()))


def test_a_tombstone_is_collected_only_once_old_enough_and_held_by_every_host():
    clock = Clock()
    dom = replica("h1", clock)
    dom.put(VmRec(id="c/pc0", cluster="c", name="pc0"))
    dom.put(VmStatus(id="c/pc0", host="h1", state="running"))
    dom.put(VmRec(id="c/pc1", cluster="c", name="pc1"))
    dom.delete("vm", "c/pc0")
    everything = dom.version_vector()
    dom.put(HostRec(id="h1", cvv=format_cvv(everything)))
    dom.put(HostRec(id="h2", cvv=""))  # h2 has published nothing yet
    clock.ms += 60_000
    mine = dom.version_vector()
    assert collectable(dom, mine, clock.ms, settle_ms=1000) == []  # h2 may lack it
    dom.put(HostRec(id="h2", cvv=format_cvv({"h1": (everything["h1"][0], everything["h1"][1] - 1)})))
    assert collectable(dom, mine, clock.ms, settle_ms=1000) == []  # h2 lacks the last part
    dom.put(HostRec(id="h2", cvv=format_cvv(everything)))
    assert collectable(dom, mine, clock.ms, settle_ms=120_000) == []  # too young
    assert collectable(dom, {}, clock.ms, settle_ms=1000) == []  # our own vector is behind
    assert collectable(dom, mine, clock.ms, settle_ms=1000) == []  # nothing from h2 yet: an older
    mine["h2"] = mine["h1"]  # state may come from it
    assert collectable(dom, mine, clock.ms, settle_ms=1000) == [("vm", "c/pc0")]  # never c/pc1: live
    assert dom.forget("vm", "c/pc0") and not dom.forget("vm", "c/pc1") and not dom.forget("vm", "nope")
    assert dom.version_of("vm", "c/pc0") is None and dom.get(VmRec, "c/pc1") is not None


def test_a_state_of_a_collected_entity_is_dropped_but_news_are_not():
    clock = Clock()
    dom = replica("h1", clock)
    live = copy.deepcopy(dom.put(VmRec(id="c/pc0", cluster="c", name="pc0")))
    dom.delete("vm", "c/pc0")
    mine = dom.version_vector()  # what we held (the gossip core keeps it; the DOM forgets)
    dom.forget("vm", "c/pc0")
    port = DomPortAdapter(dom, complete=lambda: mine)
    assert forgotten(dom, mine, live)
    assert port.merge([live]) == [] and dom.version_of("vm", "c/pc0") is None and port.forgotten == 1
    # An entity written elsewhere, newer than what we hold: merged as usual.
    other = replica("h2", clock)
    clock.ms += 5
    fresh = other.put(VmRec(id="c/pc9", cluster="c", name="pc9"))
    assert not forgotten(dom, mine, fresh)
    assert len(port.merge([fresh])) == 1 and dom.get(VmRec, "c/pc9") is not None


def heartbeat_and_collect(sim, published, settle_ms, forgot):
    """Each live host publishes the vector it had one heartbeat ago, then collects what it may."""
    for h in sim.live():
        sim.write(h.id, HostRec(id=h.id, cvv=format_cvv(published.get(h.id, {}))))
        published[h.id] = dict(h.core.cvv)
        for kind, id_ in collectable(h.dom, h.core.cvv, sim._now_ms(), settle_ms, h.core.members):
            if h.dom.forget(kind, id_):
                forgot.add(id_)


def assert_nothing_came_back(sim, forgot, deleted):
    for h in sim.hosts.values():  # crashed hosts too: their durable replica counts
        # The replica's own list of tombstones (what a collection pass scans) is exact.
        assert {(k, i) for k, i in h.dom._tombstones} == {
            (etree.QName(e).localname, e.get("id")) for e in h.dom.entities() if e.get("deleted") == "true"
        }
        for id_ in forgot:
            assert h.dom.get(VmRec, id_) is None, (h.id, id_, "live again after being collected")
        for id_ in deleted.get(h.id, ()):
            assert h.dom.get(VmRec, id_) is None, (h.id, id_, "live again after its deletion was seen")


events = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "create",
                "create",
                "status",
                "delete",
                "delete",
                "crash",
                "restart",
                "partition",
                "heal",
                "run",
                "collect",
                "collect",
            ]
        ),
        st.integers(0, 99),
        st.integers(0, 99),
        st.floats(0.0, 2.0),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 6),
    seed=st.integers(0, 2**32),
    drop=st.floats(0, 0.3),
    dup=st.floats(0, 0.2),
    slow=st.floats(0.002, 0.5),
    schedule=events,
)
def test_collection_under_faults_never_resurrects_and_ends_with_no_tombstones(
    n, seed, drop, dup, slow, schedule
):
    """Creates, status writes and deletions under faults with hosts collecting as they go: no entity
    is ever live again at a host once that host saw it deleted, nor anywhere once any host collected
    it. Healed and restarted, every host collects every tombstone and the replicas agree."""
    sim = Simulation(n, seed, LOCAL_TEST, drop=drop, dup=dup, delay=(0.001, slow))
    ids = list(sim.hosts)
    published, forgot, deleted = {}, set(), {}
    created = []
    states = {}  # id -> its live state as first written (a stale copy to replay at the end)
    settle = 300
    for action, x, y, dt in schedule:
        live = [h.id for h in sim.live()]
        if action == "create" and live:
            vid = f"c/pc{len(created)}"
            created.append(vid)
            states[vid] = copy.deepcopy(
                sim.write(live[x % len(live)], VmRec(id=vid, cluster="c", name=vid[2:]))[0]
            )
        elif action in ("status", "delete") and live and created:
            h = sim.hosts[live[x % len(live)]]
            vid = created[y % len(created)]
            if h.dom.get(VmRec, vid) is not None:
                if action == "status":
                    sim.write(h.id, VmStatus(id=vid, host=h.id, state="running", restarts=y))
                else:
                    el = h.dom.delete("vm", vid)
                    sim._carry(h.id, h.core.local_changes([el], sim.now))
        elif action == "collect":
            heartbeat_and_collect(sim, published, settle, forgot)
        else:
            sim.fault(action, x, y)
        sim.run(dt)
        for h in sim.live():
            for vid in created:
                if h.dom.version_of("vm", vid) is not None and h.dom.get(VmRec, vid) is None:
                    deleted.setdefault(h.id, set()).add(vid)
        assert_nothing_came_back(sim, forgot, deleted)

    # Heal, restart everyone: every tombstone goes everywhere, and nothing else changes.
    sim.heal()
    for i in ids:
        if sim.hosts[i].crashed:
            sim.restart(i)
    gone = {
        vid
        for vid in created
        if any(
            h.dom.version_of("vm", vid) is not None and h.dom.get(VmRec, vid) is None
            for h in sim.hosts.values()
        )
    } | forgot
    kept = {vid for vid in created if vid not in gone}
    bound = 40 * LOCAL_TEST.sync_interval

    def all_collected():
        heartbeat_and_collect(sim, published, settle, forgot)
        return all(h.dom.version_of("vm", vid) is None for h in sim.hosts.values() for vid in gone) and all(
            h.dom.get(VmRec, vid) is not None for h in sim.hosts.values() for vid in kept
        )

    t0 = sim.now
    while sim.now - t0 < bound and not all_collected():
        sim.run(1.0)
    assert all_collected(), [
        (h.id, sorted(v for v in gone if h.dom.version_of("vm", v) is not None)) for h in sim.hosts.values()
    ]
    assert_nothing_came_back(sim, forgot, deleted)
    for h in sim.hosts.values():
        assert {vid for vid in created if h.dom.get(VmRec, vid) is not None} == kept
    # A stale copy of a collected entity, delivered late, changes nothing anywhere.
    for h in sim.live():
        assert h.core.dom.merge([copy.deepcopy(states[v]) for v in sorted(gone)]) == []
        assert all(h.dom.version_of("vm", v) is None for v in gone)


def test_lease_tombstones_are_never_collected_nor_lease_states_dropped():
    """Lease records carry their Paxos ballot as version (a host may record an old commit after
    newer writes it already claimed), so a vector proves nothing about them: kept, never dropped."""
    from vmwebd.dom.hlc import Version
    from vmwebd.dom.records import LeaseRec

    clock = Clock()
    dom = replica("h1", clock)
    granted = Version(1_000, 0, "h2")
    dom.put(LeaseRec(id="ip/lab/10.0.0.5", holder="vm:c/pc0#t"), version=granted)
    dom.delete("lease", "ip/lab/10.0.0.5", version=Version(2_000, 0, "h3"))
    mine = {"h1": (clock.ms, 0), "h2": (clock.ms, 0), "h3": (clock.ms, 0)}
    dom.put(HostRec(id="h1", cvv=format_cvv(mine)))
    clock.ms += 10**9
    assert collectable(dom, mine, clock.ms, settle_ms=0) == []
    late = Dom(HybridClock("h4", clock)).put(
        LeaseRec(id="ip/lab/10.0.0.6", holder="vm:c/pc1#t"), version=Version(1_500, 0, "h2")
    )
    assert not forgotten(dom, mine, late)  # unknown here, "covered", yet merged: it is a lease
