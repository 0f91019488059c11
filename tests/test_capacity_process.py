"""Capacity under concurrency with real daemons: three hosts take creates at the same moment
until the grid is full, and no host is promised more than it has."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
from lxml import etree

from tests.test_peers_process import grid, wait_until  # noqa: F401  (the 3-daemon fixture)
from vmwebd.client import ApiFault
from vmwebd.errors import NoCapacity
from vmwebd.lease.capacity import parse
from vmwebd.placement import HostLoad, place

NS = "{urn:vmweb:dom:1}"


def race_until_full(grid, clients_per_host: int = 2, template: str = "bigdata", size: int = 3):
    """Clients at every host create clusters at once, each until the grid refuses it twice in a
    row; returns the faultcodes seen and the clusters made."""
    faults: dict[str, int] = defaultdict(int)
    made: list[str] = []
    lock = threading.Lock()

    def client(t: int):
        c = grid.client(t % 3)
        refused = 0
        for i in range(40):
            try:
                c.call("CreateCluster", f"race{t}x{i}", template, "alice", size)
                with lock:
                    made.append(f"race{t}x{i}")
                refused = 0
            except ApiFault as e:
                with lock:
                    faults[e.code] += 1
                refused += 1
                if refused >= 2:
                    return

    threads = [threading.Thread(target=client, args=(t,)) for t in range(3 * clients_per_host)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    return faults, made


def promised(grid) -> tuple[dict, dict, dict]:
    """Per host: memory and vCPUs the DOM places there, the host's capacity, and what its
    capacity set holds."""
    dom = etree.fromstring(grid.client(0).call("GetDom").encode())
    placed = defaultdict(lambda: [0, 0])
    for vm in dom.iter(f"{NS}vm"):
        if vm.get("deleted") != "true" and vm.get("desired") != "absent":
            placed[vm.get("host")][0] += int(vm.get("memory-mib"))
            placed[vm.get("host")][1] += int(vm.get("vcpus"))
    hosts = {h["id"]: h for h in grid.client(0).call("ListHosts")}
    sets = {}
    for lease in dom.iter(f"{NS}lease"):
        if lease.get("id", "").startswith("cap/") and lease.get("deleted") != "true":
            sets[lease.get("id")[4:]] = parse(lease.get("holder"))
    return placed, hosts, sets


@pytest.mark.slow
def test_concurrent_creates_at_three_hosts_never_promise_a_host_more_than_it_has(grid):
    """Six clients, two at each host, create 3-VM clusters at once until the grid is full: every
    refusal is Server.NoCapacity naming the hosts' free memory, and no host's VMs add up to more
    memory (or vCPUs, with the overcommit) than it has; each host's capacity set holds exactly
    the VMs placed there."""
    faults, made = race_until_full(grid)
    assert made, faults
    assert set(faults) <= {"Server.NoCapacity"}, dict(faults)
    assert faults["Server.NoCapacity"] >= 6, dict(faults)  # every client ended on a full grid
    placed, hosts, sets = promised(grid)
    overcommit = 4.0
    for h, (mem, vcpus) in placed.items():
        assert mem <= hosts[h]["memory_mib"], (h, mem, hosts[h]["memory_mib"])
        assert vcpus <= hosts[h]["cpus"] * overcommit, (h, vcpus)
    # the grid is really full: one more cluster of the race's shape fits nowhere
    loads = [HostLoad(h, hosts[h]["cpus"], hosts[h]["memory_mib"], placed[h][1], placed[h][0]) for h in hosts]
    with pytest.raises(NoCapacity):
        place(loads, [("m", 2, 2048), ("w1", 2, 1536), ("w2", 2, 1536)], "spread", overcommit)
    dom = etree.fromstring(grid.client(0).call("GetDom").encode())
    on = defaultdict(set)
    for vm in dom.iter(f"{NS}vm"):
        if vm.get("deleted") != "true":
            on[vm.get("host")].add((vm.get("id"), vm.get("token")))
    for h in hosts:
        assert {(e.vm, e.token) for e in sets.get(h, ())} == on[h], h
    # destroying gives everything back: the sets empty again
    for name in made:
        grid.client(len(name) % 3).call("DestroyCluster", name)
    wait_until(lambda: not any(promised(grid)[2].values()), 60, "capacity sets emptied")
