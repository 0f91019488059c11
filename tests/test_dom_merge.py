"""Merge laws of the cluster DOM (a state-based CRDT per entity part), checked with hypothesis."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock, Version
from vmwebd.dom.records import NS, VClusterRec, VmRec, VmStatus

Q = "{%s}" % NS
HOSTS = ["a", "b", "c"]


def fresh(origin="z"):
    return Dom(HybridClock(origin, lambda: 0))


@st.composite
def updates(draw):
    """A list of entity states, each with versions unique to it (as real writers produce)."""
    n = draw(st.integers(min_value=1, max_value=25))
    out = []
    for i in range(n):
        kind = draw(st.sampled_from(["vcluster", "vm"]))
        id_ = draw(st.sampled_from(["x", "y", "c1/n0"]))
        origin = draw(st.sampled_from(HOSTS))
        v = Version(draw(st.integers(0, 5)), i, origin)
        el = etree.Element(Q + kind)
        el.set("id", id_)
        el.set("v", str(v))
        if draw(st.booleans()) and draw(st.booleans()):
            el.set("deleted", "true")
        else:
            el.set("owner" if kind == "vcluster" else "host", draw(st.sampled_from(["p", "q", "r"])))
        if kind == "vm" and draw(st.booleans()):
            s = etree.SubElement(el, Q + "status")
            s.set("v", str(Version(draw(st.integers(0, 5)), 100 + i, origin)))
            s.set("state", draw(st.sampled_from(["running", "shutoff"])))
        out.append(el)
    return out


def merged(els):
    d = fresh()
    for el in els:
        d.merge(el)
    return d


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(updates(), st.randoms(use_true_random=False))
def test_any_order_gives_same_document(ups, rnd):
    """Merging the same updates in any order gives the same canonical document."""
    shuffled = list(ups)
    rnd.shuffle(shuffled)
    assert merged(ups).canonical_digest() == merged(shuffled).canonical_digest()


@pytest.mark.property
@settings(max_examples=200, deadline=None)
@given(updates(), st.randoms(use_true_random=False))
def test_duplicates_change_nothing(ups, rnd):
    """Receiving some updates two or three times gives the same document as receiving them once."""
    dup = list(ups) + [rnd.choice(ups) for _ in range(len(ups))]
    rnd.shuffle(dup)
    assert merged(ups).canonical_digest() == merged(dup).canonical_digest()


@pytest.mark.property
@settings(max_examples=200, deadline=None)
@given(updates(), st.randoms(use_true_random=False))
def test_any_grouping_gives_same_document(ups, rnd):
    """Merging groups into separate replicas and then the replicas together equals merging all."""
    k = rnd.randint(1, 4)
    groups = [[] for _ in range(k)]
    for el in ups:
        groups[rnd.randrange(k)].append(el)
    replicas = [merged(g) for g in groups]
    rnd.shuffle(replicas)
    total = fresh()
    for r in replicas:
        for el in r.entities():
            total.merge(el)
    assert total.canonical_digest() == merged(ups).canonical_digest()


@pytest.mark.property
@settings(max_examples=100, deadline=None)
@given(updates())
def test_merging_own_state_is_idempotent(ups):
    """Merging a replica's own entities into it reports no change and keeps the digest."""
    d = merged(ups)
    before = d.canonical_digest()
    assert not any(d.merge(el) for el in list(d.entities()))
    assert d.canonical_digest() == before


def test_equal_versions_with_different_content_resolve_deterministically():
    """Two states with the same version but different content merge to the same winner either way."""
    a = etree.Element(Q + "vcluster", id="x", v="5.0@a", owner="p")
    b = etree.Element(Q + "vcluster", id="x", v="5.0@a", owner="q")
    assert merged([a, b]).canonical_digest() == merged([b, a]).canonical_digest()


def test_newer_write_wins_and_tombstone_hides_entity():
    """A later put replaces the record; a delete hides it from typed reads but keeps a tombstone."""
    t = itertools.count(1)
    d = Dom(HybridClock("h1", lambda: next(t)))
    d.put(VClusterRec(id="c1", owner="alice"))
    d.put(VClusterRec(id="c1", owner="bob"))
    assert d.get(VClusterRec, "c1").owner == "bob"
    d.delete("vcluster", "c1")
    assert d.get(VClusterRec, "c1") is None
    assert d.ids("vcluster") == []
    assert d.version_of("vcluster", "c1") is not None


def test_status_part_has_its_own_writer():
    """A host's status write and a concurrent desired-state write on the same VM both survive."""
    a = Dom(HybridClock("api", lambda: 10))
    el = a.put(VmRec(id="c/n0", cluster="c", name="n0", host="h1"))
    h = Dom(HybridClock("h1", lambda: 10))
    h.merge(el)
    status = h.put(VmStatus(id="c/n0", host="h1", state="running"))
    desired = a.put(VmRec(id="c/n0", cluster="c", name="n0", host="h1", desired="stopped"))
    a.merge(status)
    h.merge(desired)
    for d in (a, h):
        assert d.get(VmRec, "c/n0").desired == "stopped"
        assert d.get(VmStatus, "c/n0").state == "running"
    assert a.canonical_digest() == h.canonical_digest()


def test_remote_entity_not_matching_schema_is_refused():
    """An entity with an attribute outside the schema is refused and the replica is unchanged."""
    d = fresh()
    before = d.canonical_digest()
    bad = etree.Element(Q + "vcluster", id="x", v="1.0@a", colour="red")
    try:
        d.merge(bad)
    except Exception as e:
        assert "vcluster 'x'" in str(e)
    else:
        raise AssertionError("merge accepted an invalid entity")
    assert d.canonical_digest() == before


def test_version_vector_and_newer_than_select_only_missing_entities():
    """newer_than(vv) returns exactly the entities the holder of vv has not seen."""
    d = fresh()
    e1 = etree.Element(Q + "vcluster", id="x", v="1.0@a", owner="p")
    e2 = etree.Element(Q + "vcluster", id="y", v="2.0@b", owner="p")
    d.merge(e1)
    d.merge(e2)
    assert d.version_vector() == {"a": (1, 0), "b": (2, 0)}
    assert [e.get("id") for e in d.newer_than({"a": (1, 0)})] == ["y"]
    assert d.newer_than(d.version_vector()) == []
