"""Reads repeated while nothing they read has changed are answered from the response cache, and
never with a stale or another caller's answer. Real daemon parts in-process, real SOAP (zeep)."""

import pytest_twisted

from vmwebd.api.soap import ResponseCache


def cache_of(node) -> ResponseCache:
    return node.site.resource.children[b"soap"].inner._cache


def states(cluster):
    return sorted((v["name"], v["desired"], v["state"]) for v in cluster["vms"])


@pytest_twisted.inlineCallbacks
def test_repeated_reads_come_from_the_cache_until_what_they_read_changes(start_node):
    """The second identical ListClusters/GetCluster is a cache hit with the same answer; a change
    to a VM makes the next read fresh; a heartbeat (a host record) does not."""
    h = yield start_node()
    node = h.node
    yield h.call("CreateCluster", "lab1", "hpc", "alice", 3)
    yield node.reconciler.settled()
    cache = cache_of(node)
    first = yield h.call("ListClusters", None)
    hits = cache.hits
    again = yield h.call("ListClusters", None)
    assert cache.hits == hits + 1 and again == first
    yield node.heartbeat()
    yield h.call("ListClusters", None)
    assert cache.hits == hits + 2

    before = yield h.call("GetCluster", "lab1")
    assert ("compute0", "running", "running") in states(before)
    assert (yield h.call("GetCluster", "lab1")) == before
    stopped = yield h.call("StopVm", "lab1", "compute0")
    assert stopped["state"] == "shutoff"
    after = yield h.call("GetCluster", "lab1")
    assert ("compute0", "stopped", "shutoff") in states(after)
    listed = yield h.call("ListClusters", None)
    assert ("compute0", "stopped", "shutoff") in states(listed[0])


@pytest_twisted.inlineCallbacks
def test_each_caller_gets_its_own_view(start_node):
    """An admin's cached list is never given to a user, who sees only their own clusters."""
    h = yield start_node()
    yield h.call("CreateCluster", "mine", "hpc", "alice", 2)
    yield h.call("CreateCluster", "theirs", "hpc", "bob", 2)
    admin_view = yield h.call("ListClusters", None)
    assert sorted(c["name"] for c in admin_view) == ["mine", "theirs"]
    yield h.call("ListClusters", None)
    alice = h.as_user("alice")
    assert [c["name"] for c in (yield alice.call("ListClusters", None))] == ["mine"]
    assert [c["name"] for c in (yield alice.call("ListClusters", None))] == ["mine"]


def test_the_cache_keeps_within_its_size_dropping_the_least_recently_used():
    """Past max_bytes the least recently used answers go; an answer larger than all is not kept."""
    cache = ResponseCache(lambda r, b: None, max_bytes=10)
    cache.put("a", b"t", b"1234")
    cache.put("b", b"t", b"1234")
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", b"t", b"1234")
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", b"t", b"x" * 11)
    assert cache.get("huge") is None
