"""Replicas converge: three real daemons reach the same GetDigest, and a host killed with -9
while the others change the DOM catches up to the same digest once restarted on its state dir."""

from __future__ import annotations

import pytest

# The three-host grid of the peer tests is the fixture here too (shared rather than copied).
from tests.test_peers_process import grid, wait_until  # noqa: F401

#: Bound for a restarted host to catch up (anti-entropy runs every 2 s with timing="local").
CATCH_UP_S = 60


class Disagree(list):
    """Digests that are not all the same (falsy; shown by wait_until when it times out)."""

    def __bool__(self):
        return False


def same_digest(grid, hosts=(0, 1, 2)):
    """Every host's GetDigest answer when their digests are all equal, else (falsy) the answers."""
    answers = [grid.client(i).call("GetDigest") for i in hosts]
    if len({a["digest"] for a in answers}) == 1:
        return answers
    return Disagree(answers)


def names(client) -> set[str]:
    return {c["name"] for c in client.call("ListClusters", None) or []}


@pytest.mark.slow
def test_digests_agree_and_a_host_killed_with_9_catches_up_after_restart(grid):
    c1 = grid.client(0)
    c1.call("CreateCluster", "conv1", "lab", "alice", 3)
    grid.client(1).call("CreateCluster", "conv2", "hpc", "bob", 4)
    answers = wait_until(lambda: same_digest(grid), 60, "the three hosts' digests to agree")
    assert [a["host"] for a in answers] == ["host1", "host2", "host3"]
    assert len({a["entities"] for a in answers}) == 1
    assert answers[0]["entities"] > 0
    assert len(answers[0]["digest"]) == 64 and int(answers[0]["digest"], 16) >= 0  # sha256 hex

    grid.daemons[2].kill()
    for i in (0, 1):
        wait_until(lambda i=i: grid.liveness(i).get("host3") == "dead", 30, f"host{i + 1} to see host3 dead")
    # Changes host3 misses: a cluster created, another created and destroyed, an account.
    c1.call("CreateCluster", "conv3", "lab", "carol", 2)
    grid.client(1).call("CreateCluster", "conv4", "lab", "dave", 2)
    assert grid.client(1).call("DestroyCluster", "conv4") == "destroyed"  # none of its VMs on host3
    c1.call("CreateUser", "erin", "erin-test-password", "user", 4)
    missed = wait_until(lambda: same_digest(grid, (0, 1)), 60, "host1 and host2 to agree")
    assert names(c1) == {"conv1", "conv2", "conv3"}

    grid.daemons[2].notify.close()  # a restart gets a fresh notify socket
    grid.daemons[2].start()
    caught_up = wait_until(
        lambda: same_digest(grid),
        CATCH_UP_S,
        f"the restarted host3's digest to equal the others' (within {CATCH_UP_S} s)",
    )
    assert len({a["entities"] for a in caught_up}) == 1, caught_up
    assert caught_up[2]["entities"] >= missed[0]["entities"]
    c3 = grid.client(2)
    assert names(c3) == {"conv1", "conv2", "conv3"}
    assert "erin" in {u["name"] for u in c3.call("ListUsers")}
