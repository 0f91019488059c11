"""``make demo``: simulated hosts on libvirt's test driver, serving the user API on loopback.

Each simulated host gets its own directory under ``.demo/`` with a ``vmwebd.xml``, a libvirt
test-driver node file (its CPUs and memory; hosts differ, so placement has something to do) and
its state directory, and runs as its own ``vmwebd`` process. The demo runs until interrupted.
It starts three hosts by default (``--hosts N``), each with a certificate from the demo's own
grid CA (``.demo/ca``), joining through host1's peer endpoint. Each host serves its user API and
web pages over TLS with that certificate (``api-tls="grid"``): clients trust the demo CA with
``VMWEB_CA=.demo/ca/ca.crt`` (``--api-tls off`` serves plain HTTP instead).

At every start the demo gives the admin account ``admin`` a fresh random password (through
host1's ``bootstrap-admin`` file), prints it, and writes ``.demo/admin-credentials`` (one line,
``user:password``, mode 0600) for scripts: ``export VMWEB_CREDENTIALS=.demo/admin-credentials``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmwebd.hv.testhost import write_test_host

REPO = Path(__file__).resolve().parent.parent
DEMO_ADMIN = "admin"
# (cpus, memory MiB) of the simulated hosts: heterogeneous on purpose.
HOST_SIZES = [(16, 32768), (8, 16384), (4, 8192), (8, 16384), (16, 32768)]


def write_host_config(
    directory: Path,
    host_id: str,
    api_port: int,
    peer_port: int,
    cpus: int,
    memory_mib: int,
    templates_dir: Path = REPO / "conf" / "templates",
    pool_cidr: str = "10.77.0.0/16",
    reserve: str = "10.77.0.0/24",
    reconcile_interval: float = 2.0,
    max_vms: int = 256,
    extra: str = "",
    image_mib: int = 256,
    api_tls: str = "off",
) -> Path:
    """Writes a complete host directory (config, test-driver node, state dir); returns the config.

    ``api_tls``: ``listen/@api-tls`` (``grid`` needs the host's certificate in ``extra``'s
    ``peers/@cert-dir``, or in ``<directory>/state/pki``).

    The base image is small by default: the test driver's storage pool holds 100 GiB, and every
    overlay counts its full virtual size against it."""
    directory.mkdir(parents=True, exist_ok=True)
    uri = write_test_host(directory / "node.xml", cpus, memory_mib)
    reserve_attr = f' reserve="{reserve}"' if reserve else ""
    cfg = directory / "vmwebd.xml"
    cfg.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<vmwebd>
  <host id="{host_id}"/>
  <listen api="127.0.0.1:{api_port}" peer="127.0.0.1:{peer_port}" api-tls="{api_tls}"/>
  <state dir="{directory / 'state'}"/>
  <libvirt uri="{uri}"/>
  <storage pool="vmweb" dir="{directory / 'images'}"/>
  <images>
    <image name="debian-12" file="debian-12.qcow2" size-mib="{image_mib}" format="qcow2"/>
  </images>
  <pools>
    <ip name="lab" cidr="{pool_cidr}"{reserve_attr}/>
    <mac prefix="52:54:00"/>
    <vni first="100" last="4095"/>
  </pools>
  <limits max-vms-per-cluster="{max_vms}" max-request-bytes="1048576" max-clusters="1000"/>
  <templates dir="{templates_dir}"/>
  <reconcile interval="{reconcile_interval}"/>
  {extra}
</vmwebd>
""")
    return cfg


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (what one types), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vmweb-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--dir", default=str(REPO / ".demo"))
    ap.add_argument("--first-port", type=int, default=8471)
    ap.add_argument(
        "--api-tls",
        choices=["grid", "off"],
        default="grid",
        help="serve the user API over TLS with the demo CA's host certificates (grid, "
        "default) or plain HTTP (off)",
    )
    args = ap.parse_args(argv)
    base = Path(args.dir)
    procs = []
    venv_bin = Path(sys.executable).parent
    vmwebd = venv_bin / "vmwebd"
    from vmwebd.gossip import pki

    ca_dir = base / "ca"
    if not (ca_dir / "ca.crt").exists():
        pki.init_ca(ca_dir, grid_name="vmweb-demo")
    from vmwebd.accounts import generate_password, write_bootstrap_admin

    admin_password = generate_password()
    # Every host makes (or resets) the admin at its start, from the same hash, so each one
    # accepts the password at once, before gossip has run.
    first = write_bootstrap_admin(base / "host1" / "state", DEMO_ADMIN, admin_password)
    for i in range(1, args.hosts):
        other = base / f"host{i + 1}" / "state" / first.name
        other.parent.mkdir(parents=True, exist_ok=True)
        other.write_bytes(first.read_bytes())
        other.chmod(0o600)
    creds = base / "admin-credentials"
    fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{DEMO_ADMIN}:{admin_password}\n")
    tls = args.api_tls != "off"
    scheme = "https" if tls else "http"
    seed = f"127.0.0.1:{args.first_port + 100}"
    members = " ".join(f"host{i + 1}" for i in range(args.hosts))
    for i in range(args.hosts):
        cpus, mem = HOST_SIZES[i % len(HOST_SIZES)]
        hid = f"host{i + 1}"
        cert_dir = base / hid / "pki"
        if not (cert_dir / "host.crt").exists():
            pki.issue_host_cert(ca_dir, hid, cert_dir, ["127.0.0.1", "localhost"])
        peers = (
            f'<peers seeds="{seed}" fanout="3" cert-dir="{cert_dir}" timing="local" '
            f'members="{members}"/>'
            # segments are planned and recorded (test driver); each host its own loopback
            # address, so the recorded forwarding entries name the other hosts
            f'<network underlay="127.0.0.{i + 1}" devices="record"/>'
        )
        cfg = write_host_config(
            base / hid,
            hid,
            args.first_port + i,
            args.first_port + 100 + i,
            cpus,
            mem,
            extra=peers,
            api_tls=args.api_tls,
        )
        log = open(base / hid / "vmwebd.log", "ab")
        cmd = [
            str(vmwebd) if vmwebd.exists() else sys.executable,
            *([] if vmwebd.exists() else ["-m", "vmwebd.daemon"]),
            "--config",
            str(cfg),
        ]
        procs.append((hid, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        site = f"{scheme}://127.0.0.1:{args.first_port + i}"
        print(
            f"{hid}: {cpus} CPUs, {mem} MiB — web pages {site}/ , "
            f"user API {site}/soap (log {_shown(base / hid / 'vmwebd.log')})"
        )
    print()
    print(f"Admin user: {DEMO_ADMIN}   password: {admin_password}   (also in {_shown(creds)})")
    if tls:
        print(
            f"TLS: the hosts' certificates come from the demo CA {_shown(ca_dir / 'ca.crt')}; let your "
            "browser trust it (or accept its warning) for the web pages."
        )
    print()
    print("Try, in another terminal:")
    host = f"{scheme}://127.0.0.1:{args.first_port}" if tls else f"127.0.0.1:{args.first_port}"
    print(
        f"  export VMWEB_HOST={host} VMWEB_CREDENTIALS={_shown(creds)}"
        + (f" VMWEB_CA={_shown(ca_dir / 'ca.crt')}" if tls else "")
    )
    print("  .venv/bin/vmweb templates")
    print("  .venv/bin/vmweb user create alice --quota 16      # prints alice's password: log in with it")
    print("  .venv/bin/vmweb cluster create lab1 --template hpc --owner alice --count 4")
    print("  .venv/bin/vmweb cluster show lab1")
    print("  .venv/bin/vmweb cluster scale lab1 6")
    print("  .venv/bin/vmweb dom")
    print("  .venv/bin/vmweb cluster destroy lab1")
    print("\nRunning until Ctrl-C.", flush=True)
    stopping = []

    def stop(*_):
        stopping.append(1)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        reported = set()
        while not stopping:
            for hid, p in procs:
                if p.poll() is not None and hid not in reported:
                    # Killing a host is a fine experiment: the others carry on and mark it dead.
                    print(
                        f"{hid} exited with {p.returncode} (see {base / hid / 'vmwebd.log'}); "
                        f"the other hosts carry on",
                        flush=True,
                    )
                    reported.add(hid)
            if len(reported) == len(procs):
                break
            time.sleep(0.5)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    print("demo stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
