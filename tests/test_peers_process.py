"""Several real vmwebd processes on loopback forming one grid with no master (mutual TLS, gossip)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lxml import etree

from tests.procs import Daemon, admin_client, bootstrap_admin, create_users, free_port
from vmwebd.client import ApiClient
from vmwebd.demo import write_host_config
from vmwebd.gossip import pki

SIZES = [(16, 32768), (8, 16384), (4, 8192)]


def wait_until(pred, timeout: float, what: str, every: float = 0.2):
    """Polls ``pred`` until it returns a true value; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # a host may be restarting
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


class Grid:
    def __init__(self, base: Path, n: int, api_tls: str = "off"):
        """``n`` hosts; ``api_tls="grid"`` serves their user APIs over TLS with their grid
        certificates (clients trust ``self.ca``)."""
        self.base = base
        ca = base / "ca"
        pki.init_ca(ca, grid_name="test-grid")
        self.ca = ca / "ca.crt"
        scheme = "http" if api_tls == "off" else "https"
        self.api = [free_port() for _ in range(n)]
        self.peer = [free_port() for _ in range(n)]
        self.daemons = []
        members = " ".join(f"host{i + 1}" for i in range(n))
        for i in range(n):
            hid = f"host{i + 1}"
            cert = base / hid / "pki"
            pki.issue_host_cert(ca, hid, cert, ["127.0.0.1"])
            cpus, mem = SIZES[i % len(SIZES)]
            cfg = write_host_config(
                base / hid,
                hid,
                self.api[i],
                self.peer[i],
                cpus,
                mem,
                reconcile_interval=0.5,
                api_tls=api_tls,
                extra=f'<peers seeds="127.0.0.1:{self.peer[0]}" cert-dir="{cert}" '
                f'timing="local" members="{members}"/>',
            )
            bootstrap_admin(base / hid / "state")
            self.daemons.append(Daemon(cfg, api_port=self.api[i], scheme=scheme))
        for d in self.daemons:
            d.start()
        self.clients = [admin_client(d.url, ca=self.ca) for d in self.daemons]

    def client(self, i) -> ApiClient:
        """A client of host ``i`` logged in as the test admin."""
        return admin_client(self.daemons[i].url, ca=self.ca)

    def liveness(self, i) -> dict:
        return {h["id"]: h["liveness"] for h in self.client(i).call("ListHosts")}

    def close(self):
        for d in self.daemons:
            d.close()


@pytest.fixture
def grid(tmp_path):
    g = Grid(tmp_path, 3)
    try:
        wait_until(
            lambda: all(
                set(g.liveness(i).values()) == {"alive"} and len(g.liveness(i)) == 3 for i in range(3)
            ),
            30,
            "three hosts to see each other alive",
        )
        create_users(g.client(0))  # acknowledged once the other hosts have the accounts too
        yield g
    finally:
        g.close()


def all_running(client, name, n):
    c = client.call("GetCluster", name)
    vms = [v for v in c["vms"] if v["state"] == "running"]
    return c if len(vms) == n else None


@pytest.mark.slow
def test_cluster_created_at_one_host_runs_on_several_and_reads_the_same_everywhere(grid):
    """A cluster created at host2 is placed on several hosts, each runs its VMs, all hosts agree."""
    grid.client(1).call("CreateCluster", "spread1", "hpc", "alice", 7)
    views = [
        wait_until(
            lambda i=i: all_running(grid.client(i), "spread1", 7), 30, f"spread1 running at host{i + 1}"
        )
        for i in range(3)
    ]
    assert views[0] == views[1] == views[2]
    hosts = {v["host"] for v in views[0]["vms"]}
    assert len(hosts) >= 2, hosts
    ips = [v["ip"] for v in views[0]["vms"]]
    assert len(set(ips)) == 7
    # destroy at a third host: every host gives back its VMs, and the name is free again everywhere
    assert grid.client(2).call("DestroyCluster", "spread1") == "destroyed"
    for i in range(3):
        wait_until(
            lambda i=i: grid.client(i).call("ListClusters", None) in ([], None),
            20,
            f"spread1 gone at host{i + 1}",
        )
    dom = etree.fromstring(grid.client(0).call("GetDom").encode())
    live_leases = [e for e in dom.iter("{urn:vmweb:dom:1}lease") if e.get("deleted") != "true"]
    assert live_leases == []


@pytest.mark.slow
def test_killed_host_is_declared_dead_then_rejoins_and_catches_up(grid):
    """kill -9 of a host: the others mark it dead; restarted, it rejoins and gets what it missed."""
    grid.daemons[2].kill()
    for i in (0, 1):
        wait_until(lambda i=i: grid.liveness(i).get("host3") == "dead", 30, f"host{i + 1} to see host3 dead")
    c = grid.client(0).call("CreateCluster", "missed", "lab", "bob", 4)
    assert "host3" not in {v["host"] for v in c["vms"]}  # no VM placed on a dead host
    grid.daemons[2].start()
    wait_until(
        lambda: all(grid.liveness(i).get("host3") == "alive" for i in (0, 1)), 30, "host3 seen alive again"
    )
    caught_up = wait_until(lambda: all_running(grid.client(2), "missed", 4), 30, "host3 to learn of 'missed'")
    assert caught_up["owner"] == "bob"


@pytest.mark.slow
def test_cleanly_stopped_host_is_seen_as_left(grid):
    """A host stopped with SIGTERM tells the others it left (not dead)."""
    assert grid.daemons[1].terminate() == 0
    wait_until(lambda: grid.liveness(0).get("host2") == "left", 20, "host1 to see host2 left")


@pytest.mark.slow
def test_host_killed_right_after_acknowledging_leaves_no_half_made_cluster(grid):
    """The host that took a request dies right after answering: the other hosts still build their part."""
    c = grid.client(0).call("CreateCluster", "orphaned", "lab", "carol", 6)
    grid.daemons[0].kill()
    elsewhere = [v["name"] for v in c["vms"] if v["host"] != "host1"]
    assert elsewhere, "placement put every VM on the requesting host"

    def others_built():
        cl = grid.client(1).call("GetCluster", "orphaned")
        states = {v["name"]: v["state"] for v in cl["vms"]}
        return all(states.get(n) == "running" for n in elsewhere) and len(states) == 6

    wait_until(others_built, 30, "host2 and host3 to run their VMs of 'orphaned'")


@pytest.mark.slow
def test_membership_changes_through_consensus_one_host_at_a_time(grid):
    """RemoveHost/AddHost change the consensus members at every host; quorum follows the members."""
    assert grid.client(0).call("RemoveHost", "host3") == ["host1", "host2"]
    for i in range(3):
        wait_until(
            lambda i=i: (
                {h["id"]: h["member"] for h in grid.client(i).call("ListHosts")}
                == {"host1": True, "host2": True, "host3": False}
            ),
            20,
            f"host{i + 1} to see 2 members",
        )
    grid.daemons[2].kill()  # not a member: leases go on with 2 of 2
    grid.client(1).call("CreateCluster", "after-remove", "lab", "dave", 2)
    grid.daemons[1].kill()  # now 1 of 2 members: no quorum, a clear error, reads keep working
    with pytest.raises(Exception) as e:
        grid.client(0).call("CreateCluster", "no-quorum", "lab", "dave", 1)
    assert getattr(e.value, "code", "") == "Server.NoQuorum", e.value
    assert "2 needed" in e.value.message
    assert [c["name"] for c in grid.client(0).call("ListClusters", None)] == ["after-remove"]
    grid.daemons[1].start()
    wait_until(
        lambda: grid.client(0).call("CreateCluster", "resumed", "lab", "dave", 1),
        30,
        "leases to resume once host2 is back",
    )
    grid.daemons[2].start()
    assert grid.client(0).call("AddHost", "host3") == ["host1", "host2", "host3"]


def traces(client, prefix: str) -> list[str]:
    """Entities (live or tombstones) whose id names ``prefix``, in a host's DOM."""
    dom = etree.fromstring(client.call("GetDom").encode())
    return [
        f"{etree.QName(e).localname}:{e.get('id')}{' (deleted)' if e.get('deleted') == 'true' else ''}"
        for c in dom
        for e in c
        if prefix in (e.get("id") or "")
    ]


@pytest.mark.slow
def test_tombstones_of_a_destroyed_cluster_are_collected_everywhere_and_stay_gone_after_kill_9(grid):
    """With the settle time at 0, a destroyed cluster leaves no tombstone (but its leases') at any
    host once every host holds them; a host killed with -9 and restarted does not bring them (or
    the cluster) back."""
    grid.client(0).call("SetSetting", "dom.tombstone-settle", "0")
    grid.client(1).call("CreateCluster", "gcme", "lab", "alice", 4)
    for i in range(3):
        wait_until(lambda i=i: all_running(grid.client(i), "gcme", 4), 30, f"gcme running at host{i + 1}")
    assert grid.client(2).call("DestroyCluster", "gcme") == "destroyed"
    assert any("(deleted)" in t for t in traces(grid.client(0), "gcme"))

    def left(i):  # lease records keep their tombstones (vmwebd/dom/gc.py: NEVER_COLLECTED)
        found = traces(grid.client(i), "gcme")
        assert all(t.endswith("(deleted)") for t in found if t.startswith("lease:")), found
        return [t for t in found if not t.startswith("lease:")]

    for i in range(3):
        wait_until(lambda i=i: left(i) == [], 90, f"no trace of gcme at host{i + 1}")
    grid.daemons[2].kill()
    grid.daemons[2].start()
    wait_until(lambda: all(grid.liveness(i).get("host3") == "alive" for i in (0, 1)), 30, "host3 back")
    assert left(2) == []
    for i in range(3):
        assert grid.client(i).call("ListClusters", None) in ([], None)
    # The name is free again and a new cluster under it works.
    grid.client(2).call("CreateCluster", "gcme", "lab", "bob", 2)
    wait_until(lambda: all_running(grid.client(0), "gcme", 2), 30, "the new gcme running")
