"""Provisioning a 64-VM cluster: vmweb end to end vs the same libvirt calls made directly.

Both sides run in this one process tree on the same machine, one after the other, each on its own
fresh libvirt test-driver host, ``--rounds`` times (default 3); the script prints each side's
median and the ratio.

* vmweb: a real ``vmwebd`` process (its DOM journal fsynced); we time ``CreateCluster`` over SOAP
  plus polling ``GetCluster`` until every VM reports running — address leases, placement, the
  durable DOM writes, the reconciler's network/overlay/define/start and its status writes.
* direct: libvirt-python on a fresh host doing what the reconciler does for the same cluster:
  one network, then per VM an overlay volume, ``defineXML`` and ``create``, with the same XML.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmwebd.client import ApiClient  # noqa: E402
from vmwebd.demo import write_host_config  # noqa: E402
from vmwebd.hv import xmlgen  # noqa: E402
from vmwebd.hv.driver import DomainSpec  # noqa: E402
from vmwebd.hv.testhost import write_test_host  # noqa: E402

N = 64


def time_direct(tmp: Path) -> float:
    uri = write_test_host(tmp / "direct.xml", 64, 262144)
    conn = libvirt.open(uri)
    t0 = time.perf_counter()
    pool = conn.storagePoolDefineXML(xmlgen.dir_pool_xml("vmweb", f"{tmp}/img"))
    pool.create()
    base = pool.createXML(xmlgen.volume_xml("base.qcow2", 256, "qcow2"), 0).path()
    net = conn.networkDefineXML(xmlgen.isolated_network_xml("vmweb-bench", "vmbr100"))
    net.create()
    for i in range(N):
        vol = pool.createXML(xmlgen.volume_xml(f"vm{i}.qcow2", 256, "qcow2", backing_path=base), 0)
        spec = DomainSpec(
            name=f"vmweb-bench-pc{i}",
            vcpus=1,
            memory_mib=512,
            disk_path=vol.path(),
            network="vmweb-bench",
            mac=f"52:54:00:00:00:{i:02x}",
            ip=f"10.77.1.{i + 1}",
        )
        dom = conn.defineXML(xmlgen.domain_xml(spec))
        dom.create()
    elapsed = time.perf_counter() - t0
    assert len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)) == N
    conn.close()
    return elapsed


def time_vmweb(tmp: Path, port: int) -> float:
    cfg = write_host_config(tmp / "host1", "host1", port, port + 100, 64, 262144, reconcile_interval=30.0)
    from vmwebd.accounts import write_bootstrap_admin

    write_bootstrap_admin(tmp / "host1" / "state", "admin", "bench-admin-password")
    log = open(tmp / "vmwebd.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmwebd.daemon", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        client = None
        for _ in range(200):  # bounded wait for the daemon to listen
            try:
                client = ApiClient(f"127.0.0.1:{port}", user="admin", password="bench-admin-password")
                break
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit(f"vmwebd exited; see {tmp / 'vmwebd.log'}")
                time.sleep(0.05)
        client.call("CreateUser", "bench", "bench-user-password", "user", N)
        t0 = time.perf_counter()
        client.call("CreateCluster", "bench", "lab", "bench", N)
        t_ack = time.perf_counter() - t0
        for _ in range(100000):
            c = client.call("GetCluster", "bench")
            if sum(1 for v in c["vms"] if v["state"] == "running") == N:
                break
            time.sleep(0.05)  # polling a 64-VM answer costs the daemon a few ms each time
        else:
            raise SystemExit("cluster never came up")
        total = time.perf_counter() - t0
        print(
            f"  vmweb: CreateCluster acknowledged (leases + placement + durable DOM write) "
            f"after {t_ack * 1000:.0f} ms, all {N} VMs running after {total * 1000:.0f} ms"
        )
        return total
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=18470)
    args = ap.parse_args()
    ours, direct = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            direct.append(time_direct(Path(d)))
        with tempfile.TemporaryDirectory() as d:
            ours.append(time_vmweb(Path(d), args.port + r))
        print(f"round {r + 1}: direct libvirt {direct[-1] * 1000:.0f} ms, vmweb {ours[-1] * 1000:.0f} ms")
    mo, md = statistics.median(ours), statistics.median(direct)
    print(
        f"\n{N}-VM cluster, median of {args.rounds}: vmweb end-to-end {mo * 1000:.0f} ms, "
        f"direct libvirt-python {md * 1000:.0f} ms, ratio {mo / md:.1f}x "
        f"({(mo - md) / N * 1000:.1f} ms of vmweb overhead per VM)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
