"""The DOM's caches and indexes (decoded records, secondary indexes, versions by origin, the
incremental digest) always say what a scan of the document says, whatever the writes, merges,
deletions and collections that led there."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmwebd.cluster import HostUsage, host_usage
from vmwebd.dom.document import Dom, _part_children, _version, entity_bytes
from vmwebd.dom.hlc import HybridClock, Version
from vmwebd.dom.records import NS, VClusterRec, VmRec, VmStatus

Q = "{%s}" % NS
HOSTS = ["a", "b", "c"]
IDS = ["x", "y", "c1/n0", "c1/n1"]


@st.composite
def operations(draw):
    """A sequence of operations on one replica: local writes, merges from peers, deletions,
    status writes and collections of tombstones."""
    ops = []
    for i in range(draw(st.integers(1, 40))):
        op = draw(st.sampled_from(["put", "merge", "delete", "status", "forget"]))
        kind = draw(st.sampled_from(["vcluster", "vm"]))
        id_ = draw(st.sampled_from(IDS))
        value = draw(st.sampled_from(["p", "q", "r"]))
        stamp = (draw(st.integers(0, 6)), i)
        origin = draw(st.sampled_from(HOSTS))
        deleted = draw(st.integers(0, 3)) == 0
        ops.append((op, kind, id_, value, stamp, origin, deleted))
    return ops


def run(ops) -> Dom:
    dom = Dom(HybridClock("z", lambda: 0))
    for op, kind, id_, value, stamp, origin, deleted in ops:
        if op == "put":
            if kind == "vm":
                dom.put(
                    VmRec(
                        id=id_,
                        cluster=value,
                        host=value,
                        name=id_,
                        vcpus=stamp[0] + 1,
                        desired="absent" if deleted else "running",
                    )
                )
            else:
                dom.put(VClusterRec(id=id_, owner=value))
        elif op == "merge":
            el = etree.Element(Q + kind)
            el.set("id", id_)
            el.set("v", str(Version(stamp[0], stamp[1], origin)))
            if deleted:
                el.set("deleted", "true")
            else:
                el.set("owner" if kind == "vcluster" else "host", value)
                if kind == "vm":
                    el.set("cluster", value)
            dom.merge(el)
        elif op == "delete":
            dom.delete(kind, id_)
        elif op == "status":
            if kind == "vm" and dom.get(VmRec, id_) is not None:
                dom.put(VmStatus(id=id_, host=value, state="running"))
        elif op == "forget":
            dom.forget(kind, id_)
        # Reads in between fill the caches, so stale entries would show.
        dom.all(VmRec), dom.all(VClusterRec), dom.all(VmStatus), dom.digest()
        for host in ["p", "q", "r"]:
            host_usage(dom, host)
    return dom


def scanned_vector(dom):
    vv = {}
    for el in dom.entities():
        for part in [el, *_part_children(el).values()]:
            v = _version(part)
            vv[v.origin] = max(vv.get(v.origin, (-1, -1)), v.stamp)
    return vv


def decoded_afresh(dom, cls):
    fresh = Dom(HybridClock("z", lambda: 0))
    for el in dom.entities():
        fresh.merge(el, validate=False)
    return sorted(fresh.all(cls), key=lambda r: r.id)


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(operations())
def test_cached_records_and_indexes_match_a_scan(ops):
    """Records read through the cache, the secondary indexes and the version vector equal what a
    fresh decode and a scan of the document give."""
    dom = run(ops)
    for cls in (VmRec, VClusterRec, VmStatus):
        assert sorted(dom.all(cls), key=lambda r: r.id) == decoded_afresh(dom, cls)
    vms = dom.all(VmRec)
    for value in ["p", "q", "r", ""]:
        assert sorted(v.id for v in dom.select(VmRec, "host", value)) == sorted(
            v.id for v in vms if v.host == value
        )
        assert sorted(v.id for v in dom.select(VmRec, "cluster", value)) == sorted(
            v.id for v in vms if v.cluster == value
        )
        assert dom.count("vm", "host", value) == sum(1 for v in vms if v.host == value)
        on_host = [v for v in vms if v.host == value]
        live = [v for v in on_host if v.desired != "absent"]
        assert host_usage(dom, value) == HostUsage(
            len(on_host), sum(v.vcpus for v in live), sum(v.memory_mib for v in live)
        )
        assert sorted(c.id for c in dom.select(VClusterRec, "owner", value)) == sorted(
            c.id for c in dom.all(VClusterRec) if c.owner == value
        )
    assert dom.version_vector() == scanned_vector(dom)
    assert dom.size() == sum(1 for _ in dom.entities())


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(operations())
def test_incremental_digest_equals_a_fresh_replicas(ops):
    """The digest kept up to date change by change equals the digest of a replica built at once
    from the same content; and a replica differing in one entity has another digest."""
    dom = run(ops)
    fresh = Dom(HybridClock("z", lambda: 0))
    for el in dom.entities():
        fresh.merge(el, validate=False)
    assert dom.digest() == fresh.digest()
    extra = etree.Element(Q + "vcluster")
    extra.set("id", "never-seen")
    extra.set("v", str(Version(99, 0, "a")))
    fresh.merge(extra)
    assert dom.digest() != fresh.digest()


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(
    operations(),
    st.dictionaries(st.sampled_from(HOSTS + ["z"]), st.tuples(st.integers(-1, 6), st.integers(-1, 45))),
)
def test_delta_from_the_index_sends_every_entity_with_a_part_they_lack(ops, theirs):
    """With an ample budget, anti-entropy's delta holds exactly the entities with a part newer
    than the other side's vector (the index finds what a scan finds)."""
    dom = run(ops)
    ents, _claims = dom.delta(theirs, scanned_vector(dom), budget_bytes=1 << 30)
    expect = set()
    for el in dom.entities():
        for part in [el, *_part_children(el).values()]:
            v = _version(part)
            if v.stamp > theirs.get(v.origin, (-1, -1)):
                expect.add(entity_bytes(el))
    assert sorted(entity_bytes(e) for e in ents) == sorted(expect)


@pytest.mark.property
@settings(max_examples=200, deadline=None)
@given(
    operations(),
    st.sampled_from(HOSTS + ["z"]),
    st.tuples(st.integers(-1, 6), st.integers(-1, 45)),
    st.tuples(st.integers(-1, 6), st.integers(-1, 45)),
    st.sampled_from(IDS),
)
def test_wrote_between_matches_a_scan(ops, origin, after, upto, skip_id):
    """wrote_between (from the versions-by-origin index) says what a scan of every part says."""
    dom = run(ops)
    skip = ("vm", skip_id)
    expect = any(
        v.origin == origin and after < v.stamp <= upto
        for el in dom.entities()
        if (etree.QName(el).localname, el.get("id")) != skip
        for v in [_version(p) for p in [el, *_part_children(el).values()]]
    )
    assert dom.wrote_between(origin, after, upto, skip=skip) == expect


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(operations(), operations())
def test_a_state_the_replica_holds_changes_nothing_when_merged(ops, others):
    """holds(el) — the shortcut that lets duplicate rumors skip validation and merging — is only
    ever true of a state whose merge would change nothing; and a replica holds its own entities."""
    dom = run(ops)
    for el in list(dom.entities()):
        assert dom.holds(el)
    for el in list(run(others).entities()):
        if dom.holds(el):
            before = dom.canonical_digest()
            assert not dom.merge(el, validate=False)
            assert dom.canonical_digest() == before
