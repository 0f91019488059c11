"""The real ``vmweb`` command line, run as a process against one real ``vmwebd`` process.

One daemon serves the whole module (started once: it is the slow part). Tests that need cluster
``c1`` with 3 running VMs get it from the ``c1`` fixture, which restores it if an earlier test
scaled or destroyed it, so the tests do not depend on their order.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from lxml import etree

from procs import ADMIN, REPO, Daemon, admin_client, child_env, create_users, free_port, host_config
from vmwebd.client import ApiClient, ApiFault

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One vmwebd process for the module, killed at the end whatever happened."""
    config, port = host_config(tmp_path_factory.mktemp("cli") / "host1", cpus=16, memory_mib=32768)
    d = Daemon(config, api_port=port)
    try:
        d.start()
        create_users(admin_client(d.address), ("alice", "bob"))
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def api(daemon) -> ApiClient:
    return admin_client(daemon.address)


def vmweb(daemon_or_host, *args: str) -> subprocess.CompletedProcess:
    """Runs ``vmweb --host H ARGS`` to completion (bounded), as the test admin (credentials in
    the environment), and returns its output."""
    host = daemon_or_host if isinstance(daemon_or_host, str) else daemon_or_host.address
    return subprocess.run(
        [sys.executable, "-m", "vmwebd.cli", "--host", host, *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO,
        env=child_env(VMWEB_USER=ADMIN[0], VMWEB_PASSWORD=ADMIN[1]),
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.args, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def wait_until_running(api: ApiClient, name: str) -> dict:
    """Returns cluster ``name`` once every VM runs, without polling: StartVm answers only when
    its VM has reached a final state (the daemon bounds that wait)."""
    for vm in api.call("GetCluster", name)["vms"] or []:
        assert api.call("StartVm", name, vm["name"])["state"] == "running", vm
    c = api.call("GetCluster", name)
    assert c["state"] == "active", c
    return c


@pytest.fixture(scope="module")
def created(daemon):
    """The CLI's own `cluster create c1 --count 3` (run once; test_create_* checks its output)."""
    return vmweb(daemon, "cluster", "create", "c1", "--template", "hpc", "--owner", "alice", "--count", "3")


@pytest.fixture
def c1(created, api) -> dict:
    """Cluster c1 (hpc, alice) with exactly 3 running VMs, restored if a test changed it."""
    try:
        c = api.call("GetCluster", "c1")
    except ApiFault as e:
        assert e.code == "Client.NoSuchCluster", e
        api.call("CreateCluster", "c1", "hpc", "alice", 3)
    else:
        if c["count"] != 3:
            api.call("ScaleCluster", "c1", 3)
    return wait_until_running(api, "c1")


def test_templates_lists_hpc(daemon):
    """`vmweb templates` prints a table whose rows include the hpc template and its roles."""
    out = ok(vmweb(daemon, "templates"))
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TEMPLATE", "MIN", "POOL"]
    hpc = next(line for line in lines if line.split()[0] == "hpc")
    assert "head×1" in hpc and "compute×rest" in hpc


def test_create_shows_progress_and_vm_table(created):
    """`cluster create c1 --count 3` exits 0, reports boot progress on stderr and prints the VM table."""
    out = ok(created)
    assert "c1: 3/3 VMs running" in created.stderr.splitlines(), created.stderr
    lines = out.splitlines()
    assert lines[0].startswith("cluster c1  owner alice  template hpc  3 VMs  state active")
    assert lines[1].split()[:4] == ["VM", "ROLE", "HOST", "STATE"]
    rows = [line.split() for line in lines[2:]]
    assert sorted(r[0] for r in rows) == ["compute0", "compute1", "head0"]
    assert all(r[3] == "running" for r in rows), out


def test_show_json(daemon, c1):
    """`--json cluster show c1` prints JSON with 3 VMs, each with a distinct IP and MAC."""
    shown = json.loads(ok(vmweb(daemon, "--json", "cluster", "show", "c1")))
    assert shown["name"] == "c1" and shown["count"] == 3
    vms = shown["vms"]
    assert len(vms) == 3 and all(v["ip"] and v["mac"] for v in vms)
    assert len({v["ip"] for v in vms}) == 3 and len({v["mac"] for v in vms}) == 3
    assert {(v["name"], v["ip"], v["mac"]) for v in vms} == {
        (v["name"], v["ip"], v["mac"]) for v in c1["vms"]
    }


def test_duplicate_name_is_one_line_exit_1(daemon, c1):
    """Creating c1 again exits 1 with exactly one stderr line starting with the NameTaken faultcode."""
    proc = vmweb(daemon, "cluster", "create", "c1", "--template", "hpc", "--owner", "alice", "--count", "3")
    assert proc.returncode == 1, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmweb: Client.NameTaken:") and "'c1'" in lines[0], (
        proc.stderr
    )
    assert proc.stdout == ""


def test_scale_grows_the_cluster(daemon, c1, api):
    """`cluster scale c1 5` exits 0 once all 5 VMs run and prints them."""
    proc = vmweb(daemon, "cluster", "scale", "c1", "5")
    out = ok(proc)
    assert "c1: 5/5 VMs running" in proc.stderr.splitlines(), proc.stderr
    assert "5 VMs" in out.splitlines()[0]
    names = sorted(line.split()[0] for line in out.splitlines()[2:])
    assert names == ["compute0", "compute1", "compute2", "compute3", "head0"]
    assert api.call("GetCluster", "c1")["count"] == 5


def test_clusters_filters_by_owner(daemon, c1, api):
    """`clusters --owner alice` lists alice's clusters only; without --owner everyone's."""
    try:
        api.call("CreateCluster", "b1", "lab", "bob", 1)
        mine = ok(vmweb(daemon, "clusters", "--owner", "alice")).splitlines()
        assert mine[0].split()[:3] == ["CLUSTER", "OWNER", "TEMPLATE"]
        assert [line.split()[:2] for line in mine[1:]] == [["c1", "alice"]]
        everyone = ok(vmweb(daemon, "clusters")).splitlines()
        assert [line.split()[0] for line in everyone[1:]] == ["b1", "c1"]
    finally:
        api.call("DestroyCluster", "b1")


def test_hosts_lists_this_host(daemon):
    """`hosts` prints one alive row for the daemon's host with its CPUs and API address."""
    lines = ok(vmweb(daemon, "hosts")).splitlines()
    assert lines[0].split()[:3] == ["HOST", "LIVENESS", "CPUS"]
    assert len(lines) == 2
    row = lines[1].split()
    assert row[:3] == ["host1", "alive", "16"] and row[-1] == daemon.address


def test_dom_is_xml(daemon, c1):
    """`dom` prints the DOM as XML that lxml parses, holding cluster c1."""
    out = ok(vmweb(daemon, "dom"))
    root = etree.fromstring(out.encode())
    ns = "{urn:vmweb:dom:1}"
    assert root.tag == f"{ns}dom"
    assert root.find(f"{ns}vclusters/{ns}vcluster[@id='c1']").get("owner") == "alice"


def test_vm_stop_then_start(daemon, c1):
    """`vm stop c1 compute0` shuts it off and `vm start c1 compute0` runs it again, each shown in a table."""
    stopped = ok(vmweb(daemon, "vm", "stop", "c1", "compute0")).splitlines()
    assert stopped[1].split()[0] == "compute0" and stopped[1].split()[3] == "shutoff", stopped
    started = ok(vmweb(daemon, "vm", "start", "c1", "compute0")).splitlines()
    assert started[1].split()[0] == "compute0" and started[1].split()[3] == "running", started


def test_destroy(daemon, c1):
    """`cluster destroy c1` prints that it was destroyed and a later show fails with NoSuchCluster."""
    assert ok(vmweb(daemon, "cluster", "destroy", "c1")).strip() == "cluster c1 destroyed"
    proc = vmweb(daemon, "cluster", "show", "c1")
    assert proc.returncode == 1 and proc.stderr.startswith("vmweb: Client.NoSuchCluster:"), proc


def test_unreachable_host_exits_2(tmp_path):
    """A --host nobody listens on exits 2 with one line naming the address and how to fix it."""
    host = f"127.0.0.1:{free_port()}"
    proc = vmweb(host, "clusters")
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"vmweb: cannot reach vmwebd at {host}") and "--host" in lines[0]
    assert proc.stdout == ""
