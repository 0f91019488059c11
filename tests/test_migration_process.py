"""Migration and base images across three real vmwebd processes (libvirt test driver, mutual TLS).

The test driver has no migration API, so these moves are cold (save, move, restore); the live
path runs against real libvirtd hosts in tests/test_realhosts_vmweb.py.
"""

from __future__ import annotations

import os
import signal
import struct

import pytest
from lxml import etree

from tests.procs import user_client
from tests.test_peers_process import grid, wait_until  # noqa: F401  (grid is a fixture)
from vmwebd.client import ApiFault

NS = "{urn:vmweb:dom:1}"


def finished(client, mid):
    m = client.call("GetMigration", mid)
    return m if m["phase"] in ("done", "failed") else None


def vm_of(client, cluster, name):
    return next(v for v in client.call("GetCluster", cluster)["vms"] if v["name"] == name)


def migration_leases(client):
    dom = etree.fromstring(client.call("GetDom").encode())
    return [
        e.get("id")
        for e in dom.iter(f"{NS}lease")
        if e.get("deleted") != "true" and e.get("id", "").startswith("migration/")
    ]


def running_everywhere(grid, cluster, n, hosts=range(3)):
    """Waits until ``hosts`` (default: all three) see ``n`` VMs of ``cluster`` running; their views."""

    def check():
        views = [grid.client(i).call("GetCluster", cluster) for i in hosts]
        return all(sum(v["state"] == "running" for v in c["vms"]) == n for c in views) and views

    return wait_until(check, 30, f"{cluster}: {n} VMs running, seen at hosts {list(hosts)}")


def write_qcow2(path, virtual_bytes: int, payload: bytes) -> None:
    """A minimal file that passes as qcow2 (header magic and size), followed by payload."""
    header = b"QFI\xfb" + struct.pack(">I", 3) + b"\0" * 16 + struct.pack(">Q", virtual_bytes)
    path.write_bytes(header + payload)


@pytest.mark.slow
def test_cold_migration_requested_at_a_third_host_moves_the_vm_and_every_host_agrees(grid):
    c = grid.client(0).call("CreateCluster", "mig1", "lab", "alice", 3)
    running_everywhere(grid, "mig1", 3)
    vm = c["vms"][0]
    src = vm["host"]
    dest = next(h for h in ("host1", "host2", "host3") if h != src)
    third = next(i for i, h in enumerate(("host1", "host2", "host3")) if h not in (src, dest))
    m = grid.client(third).call("MigrateVm", "mig1", vm["name"], dest)
    assert (m["source"], m["dest"], m["mode"]) == (src, dest, "cold")
    m = wait_until(lambda: finished(grid.client(third), m["id"]), 60, "the migration to end")
    assert m["phase"] == "done", m["error"]
    assert m["bytes"] > 0 and m["total_ms"] >= 0
    for i in range(3):
        moved = wait_until(
            lambda i=i: (
                (v := vm_of(grid.client(i), "mig1", vm["name"]))["host"] == dest
                and v["state"] == "running"
                and v
            ),
            30,
            f"host{i + 1} to see the VM on {dest}",
        )
        assert moved["ip"] == vm["ip"] and moved["mac"] == vm["mac"]  # addresses move with it
    wait_until(lambda: migration_leases(grid.client(0)) == [], 20, "the migration lease given back")
    # The VM keeps being looked after at its new host: stop and start it there.
    assert grid.client(0).call("StopVm", "mig1", vm["name"])["state"] == "shutoff"
    assert grid.client(1).call("StartVm", "mig1", vm["name"])["state"] == "running"
    # And it can move again (the lease is free), back where it came from.
    m2 = grid.client(0).call("MigrateVm", "mig1", vm["name"], src)
    m2 = wait_until(lambda: finished(grid.client(0), m2["id"]), 60, "the second migration")
    assert m2["phase"] == "done", m2["error"]
    wait_until(lambda: vm_of(grid.client(2), "mig1", vm["name"])["host"] == src, 30, "VM back")


@pytest.mark.slow
def test_bad_migration_requests_get_specific_faults_and_change_nothing(grid):
    c = grid.client(0).call("CreateCluster", "mig2", "lab", "bob", 2)
    running_everywhere(grid, "mig2", 2)
    vm = c["vms"][0]
    cases = [
        (("nosuch", vm["name"], ""), "Client.NoSuchCluster"),
        (("mig2", "pc99", ""), "Client.NoSuchVm"),
        (("mig2", vm["name"], "host9"), "Client.NoSuchHost"),
        (("mig2", vm["name"], vm["host"]), "Client.InvalidArgument"),
    ]
    for args, code in cases:
        with pytest.raises(ApiFault) as e:
            grid.client(1).call("MigrateVm", *args)
        assert e.value.code == code, (args, e.value)
    # another user's VM: not visible to carol
    with pytest.raises(ApiFault) as e:
        user_client(grid.daemons[1].address, "carol").call("MigrateVm", "mig2", vm["name"], "")
    assert e.value.code == "Client.NotAuthorized"
    # two moves of one VM at once: the second finds the lease taken. The first move's
    # destination is frozen (SIGSTOP) while both are asked, so that move cannot end and give its
    # lease back first, however slow the machine (host1, the grid's proposer, stays up).
    dest = "host3" if vm["host"] == "host2" else "host2"
    other = next(i for i, h in enumerate(("host1", "host2", "host3")) if h not in (dest, "host1"))
    # On a loaded machine host1 may already suspect the frozen host when the first move is asked,
    # and rightly refuses it as a destination: thaw, wait until it is seen alive, and ask again.
    frozen = grid.daemons[int(dest[-1]) - 1].proc
    first = None
    for _attempt in range(5):
        frozen.send_signal(signal.SIGSTOP)
        try:
            try:
                first = grid.client(0).call("MigrateVm", "mig2", vm["name"], dest)
                assert first["waiting"].startswith(f"host {dest} to prepare"), first
            except ApiFault as refused:
                assert refused.code == "Server.NoCapacity" and "not alive" in str(refused), refused
                continue
            with pytest.raises(ApiFault) as e:
                grid.client(other).call("MigrateVm", "mig2", vm["name"], "")
            assert e.value.code == "Client.MigrationBusy"
            break
        finally:
            frozen.send_signal(signal.SIGCONT)
            if first is None:
                wait_until(lambda: grid.liveness(0).get(dest) == "alive", 30, f"{dest} alive again")
    assert first is not None, f"host1 suspected the frozen {dest} at each of 5 attempts"
    done = wait_until(lambda: finished(grid.client(0), first["id"]), 60, "the first migration")
    assert done["phase"] == "done"


@pytest.mark.slow
def test_content_image_is_fetched_by_the_destination_and_a_corrupt_copy_is_refused(grid, tmp_path):
    c = grid.client(0).call("CreateCluster", "mig3", "lab", "alice", 3)
    running_everywhere(grid, "mig3", 3)
    # Register debian-12 by content at host1 (it was a blank image until now).
    src_file = tmp_path / "upload.qcow2"
    write_qcow2(src_file, 256 << 20, os.urandom(300_000))
    img = grid.client(0).call("AddImage", "debian-12", str(src_file), "qcow2", "", "", "")
    assert img["hosts"] == ["host1"] and len(img["sha256"]) == 64
    with pytest.raises(ApiFault) as e:  # not an admin
        user_client(grid.daemons[0].address, "alice").call(
            "AddImage", "other", str(src_file), "qcow2", "", "", ""
        )
    assert e.value.code == "Client.NotAuthorized"
    # A VM moving to a host without the image: the destination fetches it from host1 first.
    vm = next(v for v in c["vms"] if v["host"] != "host1")
    dest = next(h for h in ("host2", "host3") if h != vm["host"])
    m = grid.client(0).call("MigrateVm", "mig3", vm["name"], dest)
    m = wait_until(lambda: finished(grid.client(0), m["id"]), 60, "the migration")
    assert m["phase"] == "done", m["error"]
    holders = wait_until(
        lambda: (
            set(next(i for i in grid.client(0).call("ListImages") if i["name"] == "debian-12")["hosts"])
            >= {"host1", dest}
            and True
        ),
        30,
        f"{dest} to report it holds the image",
    )
    assert holders
    fetched = grid.base / dest / "images" / img["file"]
    assert fetched.read_bytes() == src_file.read_bytes()
    # Corrupt host1's copy behind its back: the next host to fetch refuses it (hash), the move
    # fails naming its phase, and the VM stays where it was, running.
    other = next(h for h in ("host2", "host3") if h != dest)
    held = grid.base / "host1" / "images" / img["file"]
    data = bytearray(held.read_bytes())
    data[-1] ^= 0xFF
    st = held.stat()
    held.write_bytes(bytes(data))
    os.utime(held, ns=(st.st_atime_ns, st.st_mtime_ns))
    vm2 = next((v for v in grid.client(0).call("GetCluster", "mig3")["vms"] if v["host"] == dest), None)
    if vm2 is None:
        pytest.skip("placement left no VM on the fetching host")
    # Leave host1's corrupt copy as the only one served: dest's copy is hidden (its server then
    # answers 404 although the DOM says it holds the image).
    hidden = fetched.with_suffix(".hidden")
    fetched.rename(hidden)  # dest still claims it in the DOM; its server now answers 404
    m = grid.client(1).call("MigrateVm", "mig3", vm2["name"], other)
    m = wait_until(lambda: finished(grid.client(1), m["id"]), 60, "the failing migration")
    assert m["phase"] == "failed"
    assert m["error"].startswith("phase prepare"), m["error"]
    assert "debian-12" in m["error"] or "image" in m["error"], m["error"]
    for i in range(3):
        v = wait_until(lambda i=i: vm_of(grid.client(i), "mig3", vm2["name"]), 10, "vm view")
        assert v["host"] == dest
    wait_until(
        lambda: vm_of(grid.client(0), "mig3", vm2["name"])["state"] == "running",
        20,
        "the VM running at its source",
    )
    wait_until(lambda: migration_leases(grid.client(0)) == [], 20, "the lease given back")
    assert not (grid.base / other / "images" / img["file"]).exists()


def host_loads(client) -> dict[str, float]:
    hs = client.call("ListHosts")
    return {
        h["id"]: max(h["used_vcpus"] / (h["cpus"] * 4.0), h["used_memory_mib"] / h["memory_mib"]) for h in hs
    }


@pytest.mark.slow
def test_balancer_spreads_a_packed_grid_without_moving_any_vm_back(grid):
    """All VMs packed onto host1; with the balancer on, hosts move VMs (cold here) until host1 is
    within the threshold of the grid's load, and no VM ever returns to a host it left."""
    admin = grid.client(0)
    admin.call("SetSetting", "placement", "pack")
    c = admin.call("CreateCluster", "bal", "lab", "alice", 12)
    assert {v["host"] for v in c["vms"]} == {"host1"}
    running_everywhere(grid, "bal", 12)
    hs = admin.call("ListHosts")
    ideal = max(
        sum(h["used_vcpus"] for h in hs) / (sum(h["cpus"] for h in hs) * 4.0),
        sum(h["used_memory_mib"] for h in hs) / sum(h["memory_mib"] for h in hs),
    )
    threshold = 0.05
    for key, value in (
        ("balancer.threshold", str(threshold)),
        ("balancer.interval", "1"),
        ("balancer.min-residence", "3600"),
        ("balancer.enabled", "true"),
    ):
        admin.call("SetSetting", key, value)

    def balanced():
        loads = host_loads(grid.client(1))
        busy = [
            m for m in grid.client(1).call("ListMigrations") or [] if m["phase"] not in ("done", "failed")
        ]
        return not busy and loads["host1"] <= ideal + threshold and loads

    loads = wait_until(balanced, 120, "host1 to shed VMs down to the grid load + threshold")
    admin.call("SetSetting", "balancer.enabled", "false")
    migrations = admin.call("ListMigrations") or []
    done = [m for m in migrations if m["phase"] == "done"]
    assert done and all(m["requested_by"] == "balancer" for m in migrations)
    # Bounded: no more moves than VMs, and no VM went back to a host it left.
    assert len(done) <= 12
    visited: dict[str, list[str]] = {}
    for m in sorted(done, key=lambda m: m["finished_at"]):
        path = visited.setdefault(m["vm"], [m["source"]])
        assert m["source"] == path[-1]
        assert m["dest"] not in path, (m["vm"], path, m["dest"])
        path.append(m["dest"])
    assert max(loads.values()) <= ideal + threshold + 1e-9, loads
    running_everywhere(grid, "bal", 12)


@pytest.mark.slow
def test_dead_hosts_vms_are_evacuated_and_its_old_copies_go_when_it_returns(grid):
    """host3 stops answering (SIGSTOP): its VMs cannot be migrated; an admin's EvacuateHost at
    host2 re-places them on live hosts with their addresses, finishes a destroy that was waiting
    on host3, and when host3 comes back it removes its old copies."""
    import signal
    import subprocess
    import sys

    from tests.procs import ADMIN, child_env

    admin_file = grid.base / "admin-credentials"
    admin_file.write_text(f"{ADMIN[0]}:{ADMIN[1]}\n")
    keep = grid.client(0).call("CreateCluster", "evac", "lab", "alice", 7)
    doomed = grid.client(0).call("CreateCluster", "evac2", "lab", "bob", 7)
    running_everywhere(grid, "evac", 7)
    running_everywhere(grid, "evac2", 7)
    on3 = {v["name"]: v for v in keep["vms"] if v["host"] == "host3"}
    doomed_on3 = [v["name"] for v in doomed["vms"] if v["host"] == "host3"]
    assert on3 and doomed_on3, "spread placement puts VMs of both clusters on host3"
    # A live host is not evacuated; nor by a user; nor a host that does not exist.
    for client, host, code in [
        (grid.client(1), "host3", "Client.HostAlive"),
        (grid.client(1), "host2", "Client.HostAlive"),
        (grid.client(1), "host9", "Client.NoSuchHost"),
        (user_client(grid.daemons[1].address, "alice"), "host3", "Client.NotAuthorized"),
    ]:
        with pytest.raises(ApiFault) as e:
            client.call("EvacuateHost", host)
        assert e.value.code == code, (host, e.value)
    host3 = grid.daemons[2].proc
    host3.send_signal(signal.SIGSTOP)
    try:
        for i in (0, 1):
            wait_until(
                lambda i=i: grid.liveness(i).get("host3") == "dead", 30, f"host{i + 1} to see host3 dead"
            )
        # Its VMs cannot be migrated away, and a destroy cannot finish while one of them is there.
        with pytest.raises(ApiFault) as e:
            grid.client(0).call("MigrateVm", "evac", next(iter(on3)), "")
        assert e.value.code == "Server.NoCapacity" and "not alive" in e.value.message
        # The destroy answers once only host3's VMs are left (not after its time-out), and the
        # CLI says what it waits for.
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "vmwebd.cli",
                "--host",
                grid.daemons[0].url,
                "--credentials",
                str(admin_file),
                "cluster",
                "destroy",
                "evac2",
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "cluster evac2 destroying" in out.stdout and "vmweb host evacuate host3" in out.stdout, (
            out.stdout
        )
        assert {v["name"] for v in grid.client(1).call("GetCluster", "evac2")["vms"]} == set(doomed_on3)
        moves = grid.client(1).call("EvacuateHost", "host3")
        assert sorted(m["vm"] for m in moves) == sorted(f"evac/{n}" for n in on3)
        assert {m["mode"] for m in moves} == {"evacuate"} and {m["source"] for m in moves} == {"host3"}
        assert {m["dest"] for m in moves} <= {"host1", "host2"}
        for i in (0, 1):
            c = running_everywhere(grid, "evac", 7, hosts=(i,))[0]
            for v in c["vms"]:
                assert v["host"] != "host3", v
                if v["name"] in on3:  # same addresses, a fresh VM
                    assert (v["ip"], v["mac"]) == (on3[v["name"]]["ip"], on3[v["name"]]["mac"])
                    assert v["restarts"] == 0 and not v["detail"], v
        for i in (0, 1):  # host3's VMs of evac2 were deleted: the destroy finished
            wait_until(
                lambda i=i: grid.client(i).call("ListClusters", "bob") in ([], None),
                30,
                f"evac2 gone at host{i + 1}",
            )
        assert all(
            m["phase"] == "done" for m in grid.client(0).call("ListMigrations") if m["mode"] == "evacuate"
        )
        wait_until(lambda: migration_leases(grid.client(0)) == [], 20, "the evacuation's leases given back")
    finally:
        host3.send_signal(signal.SIGCONT)
    # host3 is back: it learns where its VMs went and removes its own copies (orphans).
    wait_until(
        lambda: all(grid.liveness(i).get("host3") == "alive" for i in range(3)), 30, "host3 alive again"
    )
    running_everywhere(grid, "evac", 7)
    gone = [f"vmweb-evac-{n}" for n in on3] + [f"vmweb-evac2-{n}" for n in doomed_on3]
    wait_until(
        lambda: all(f"removing orphan domain {d} on host3" in grid.daemons[2].log() for d in gone),
        30,
        f"host3 to remove {gone}",
    )
    assert {v["host"] for v in grid.client(2).call("GetCluster", "evac")["vms"]} <= {"host1", "host2"}
    assert grid.client(2).call("ListClusters", "bob") in ([], None)


@pytest.mark.slow
def test_draining_a_host_moves_its_vms_away_and_keeps_new_ones_off_until_undrained(grid):
    c = grid.client(0).call("CreateCluster", "drn", "lab", "alice", 7)
    running_everywhere(grid, "drn", 7)
    on1 = sorted(f"drn/{v['name']}" for v in c["vms"] if v["host"] == "host1")
    assert on1, "spread placement puts VMs on host1"
    for client, host, code in [
        (user_client(grid.daemons[1].address, "alice"), "host1", "Client.NotAuthorized"),
        (grid.client(1), "host9", "Client.NoSuchHost"),
    ]:
        with pytest.raises(ApiFault) as e:
            client.call("DrainHost", host)
        assert e.value.code == code, (host, e.value)
    ms = grid.client(1).call("DrainHost", "host1")  # asked at host2
    assert sorted(m["vm"] for m in ms) == on1 and all(m["id"] and m["source"] == "host1" for m in ms)
    assert all(m["dest"] in ("host2", "host3") for m in ms)
    for m in ms:
        done = wait_until(lambda m=m: finished(grid.client(1), m["id"]), 60, f"the move of {m['vm']}")
        assert done["phase"] == "done", done["error"]
    running_everywhere(grid, "drn", 7)
    for i in range(3):
        wait_until(
            lambda i=i: (
                not any(v["host"] == "host1" for v in grid.client(i).call("GetCluster", "drn")["vms"])
                and next(h for h in grid.client(i).call("ListHosts") if h["id"] == "host1")["draining"]
            ),
            30,
            f"host{i + 1} to see host1 drained and draining",
        )
    # No new VM goes to a draining host, not even when asked there or by name.
    new = grid.client(0).call("CreateCluster", "drn2", "lab", "bob", 3)
    assert "host1" not in {v["host"] for v in new["vms"]}
    with pytest.raises(ApiFault) as e:
        grid.client(2).call("MigrateVm", "drn", on1[0].partition("/")[2], "host1")
    assert e.value.code == "Server.NoCapacity" and "drained" in e.value.message
    # Undrained, host1 (the biggest, now empty) takes new VMs again.
    assert grid.client(2).call("UndrainHost", "host1") is True
    wait_until(
        lambda: not next(h for h in grid.client(0).call("ListHosts") if h["id"] == "host1")["draining"],
        30,
        "host1 to see its drain ended",
    )
    again = grid.client(0).call("CreateCluster", "drn3", "lab", "bob", 4)
    assert "host1" in {v["host"] for v in again["vms"]}


@pytest.mark.slow
def test_vms_placed_on_a_host_frozen_just_before_a_create_run_elsewhere_once_it_is_dead(grid):
    """host3 stops answering (SIGSTOP) just before a create at host1 that still places VMs on it:
    the create is answered without waiting for host3, its VMs there never ran and, once host3 is
    dead, each is re-placed by exactly one host with its IP and MAC; VMs that ran on host3 stay."""
    import signal

    grid.client(0).call("CreateCluster", "ran", "lab", "alice", 7)
    ran_on3 = {v["name"]: v for v in running_everywhere(grid, "ran", 7)[0]["vms"] if v["host"] == "host3"}
    assert ran_on3, "spread placement puts VMs of 'ran' on host3"
    host3 = grid.daemons[2].proc
    host3.send_signal(signal.SIGSTOP)
    try:
        c = grid.client(0).call("CreateCluster", "fresh", "lab", "alice", 12)
        fresh_on3 = {v["name"]: v for v in c["vms"] if v["host"] == "host3"}
        assert fresh_on3, "host3 was still alive at host1 when the create placed its VMs"
        c = running_everywhere(grid, "fresh", 12, hosts=(0, 1))[0]
        for v in c["vms"]:
            assert v["host"] in ("host1", "host2"), v
            if v["name"] in fresh_on3:
                assert (v["ip"], v["mac"]) == (fresh_on3[v["name"]]["ip"], fresh_on3[v["name"]]["mac"])
        moves = [m for m in grid.client(1).call("ListMigrations") or [] if m["vm"].startswith("fresh/")]
        assert sorted(m["vm"] for m in moves) == sorted(f"fresh/{n}" for n in fresh_on3)  # one each
        assert {(m["mode"], m["source"], m["phase"], m["requested_by"]) for m in moves} == {
            ("evacuate", "host3", "done", "auto: never ran")
        }
        # What ran on host3 waits for it (or an admin's evacuate), with its host named.
        for v in grid.client(0).call("GetCluster", "ran")["vms"]:
            if v["name"] in ran_on3:
                assert v["host"] == "host3" and "host host3, which is dead" in v["detail"], v
    finally:
        host3.send_signal(signal.SIGCONT)
