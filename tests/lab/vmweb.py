"""vmwebd on lab hosts: one daemon beside each real libvirtd, driven through the ``vmweb`` CLI.

* :class:`LabDaemon` runs a vmwebd inside a lab host's network and mount namespaces, against that
  host's own libvirtd; its log is ``<dir>/vmwebd.log``.
* :func:`write_config` writes that daemon's ``vmwebd.xml``: API and peer endpoints on the host's
  lab address (10.77.k.N), storage in a bind-mounted directory (a different one on each host),
  consoles under ``/var/log/libvirt``, mutual TLS between peers, every lab host a consensus member.
* :func:`vmweb` runs the CLI on a host (inside its namespaces) and parses its ``--json`` output.
* :class:`Grid` starts a daemon on every host of a lab with a set of templates and waits until
  each one sees all of them alive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import REPO, wait_for

API_PORT, PEER_PORT = 8471, 8571
STORAGE = "/var/lib/libvirt/vmweb"  # bind-mounted: a different directory on each host
CONSOLE = "/var/log/libvirt/vmweb-console"


def _procs():
    # The test tier's process helpers (the repo root is importable under pytest and in benches).
    from tests import procs

    return procs


class LabDaemon:
    """A vmwebd running inside a lab host's network and mount namespaces."""

    def __init__(self, host, config: Path, umask: int | None = None):
        procs = _procs()
        self.host, self.config = host, config
        self.log_path = config.parent / "vmwebd.log"
        self.notify = procs.NotifySocket(config.parent)
        with open(self.log_path, "ab") as log:
            self.proc = host.popen(
                [sys.executable, "-m", "vmwebd.daemon", "--config", str(config), "--no-fsync"],
                stdin=None,
                stdout=log,
                stderr=log,
                env=procs.child_env(NOTIFY_SOCKET=self.notify.path),
                cwd=REPO,
                umask=-1 if umask is None else umask,
            )

    def wait_ready(self):
        try:
            self.notify.wait_for("READY", "1", 60, alive=lambda: self.proc.poll() is None)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}\n--- {self.log_path} ---\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()


def write_config(
    lab,
    host,
    base: Path,
    templates: Path,
    cert_dir: Path,
    pool_cidr: str | None = None,
    pool_reserve: str | None = None,
    images: str = '<image name="tiny" file="tiny-blank.qcow2" size-mib="128"/>',
    reconcile_interval: float = 2,
    extra: str = "",
    state_dir: str | None = None,
    storage_dir: str = STORAGE,
    console_dir: str = CONSOLE,
) -> Path:
    """``<base>/<host>/vmwebd.xml`` for ``host``'s daemon (and its state directory, with the test
    admin's bootstrap file). The IP pool ``lab`` is ``pool_cidr`` (default the lab's own
    10.77.k.0/24, its first /27 reserved for the hosts); ``extra`` is XML put inside ``<vmwebd>``.
    ``state_dir``, ``storage_dir`` and ``console_dir`` are paths as the host sees them (the state
    directory defaults to ``<base>/<host>/state``)."""
    d = base / host.name
    d.mkdir(parents=True, exist_ok=True)
    members = " ".join(h.name for h in lab.hosts)
    if pool_cidr is None:
        pool_cidr, pool_reserve = f"10.77.{lab.k}.0/24", f"10.77.{lab.k}.0/27"
    reserve = f' reserve="{pool_reserve}"' if pool_reserve else ""
    cfg = d / "vmwebd.xml"
    cfg.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<vmwebd>
  <host id="{host.name}"/>
  <listen api="{host.addr}:{API_PORT}" peer="{host.addr}:{PEER_PORT}" api-tls="off"/>
  <state dir="{state_dir or d / 'state'}"/>
  <libvirt uri="{host.uri}" migrate-uri="{host.migrate_uri}"/>
  <storage pool="vmweb" dir="{storage_dir}" console-dir="{console_dir}"/>
  <images>{images}</images>
  <pools>
    <ip name="lab" cidr="{pool_cidr}"{reserve}/>
    <mac prefix="52:54:00"/>
    <vni first="100" last="199"/>
  </pools>
  <templates dir="{templates}"/>
  <reconcile interval="{reconcile_interval:g}"/>
  <peers seeds="{lab.hosts[0].addr}:{PEER_PORT}" cert-dir="{cert_dir}" timing="lan" members="{members}"/>
  {extra}
</vmwebd>
""")
    _procs().bootstrap_admin(host.host_path(state_dir) if state_dir else d / "state")
    return cfg


def vmweb(host, creds: Path, *args, check=True, timeout: float = 600):
    """Runs the CLI on ``host`` against its own vmwebd; returns (parsed --json output, the
    CompletedProcess). With ``check``, a non-zero exit is an AssertionError carrying its output."""
    env = _procs().child_env(VMWEB_HOST=f"{host.addr}:{API_PORT}", VMWEB_CREDENTIALS=str(creds))
    r = host.run(
        [sys.executable, "-m", "vmwebd.cli", "--json", *args], env=env, cwd=REPO, check=False, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"vmweb {' '.join(args)} on {host.name} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        )
    return (json.loads(r.stdout) if r.stdout.strip() else None), r


def console(host, vm_id: str, console_dir: str = CONSOLE) -> Path:
    """The root-namespace path of the serial log of VM ``CLUSTER/NAME`` on ``host``."""
    from vmwebd.reconcile import domain_name

    return host.host_path(f"{console_dir}/{domain_name(vm_id)}.log")


class Grid:
    """A vmwebd beside each libvirtd of ``lab``, sharing one CA and the templates given
    (name -> XML text), the admin's credentials in ``<base>/admin-credentials``.
    ``config_kw`` goes to :func:`write_config`; ``umask`` is the daemons' (default: this
    process's). :meth:`close` kills the daemons."""

    def __init__(self, lab, base: Path, templates: dict[str, str], umask: int | None = None, **config_kw):
        from vmwebd.gossip import pki

        procs = _procs()
        self.lab, self.base = lab, Path(base)
        self.daemons: list[LabDaemon] = []
        ca = self.base / "ca"
        pki.init_ca(ca, grid_name="lab-grid")
        tdir = self.base / "templates"
        tdir.mkdir(parents=True, exist_ok=True)
        for name, text in templates.items():
            (tdir / f"{name}.xml").write_text(text)
        self.creds = self.base / "admin-credentials"
        self.creds.write_text(f"{procs.ADMIN[0]}:{procs.ADMIN[1]}\n")
        try:
            for h in lab.hosts:
                cert = self.base / h.name / "pki"
                pki.issue_host_cert(ca, h.name, cert, [h.addr])
                self.daemons.append(
                    LabDaemon(h, write_config(lab, h, self.base, tdir, cert, **config_kw), umask=umask)
                )
            for d in self.daemons:
                d.wait_ready()
            n = len(lab.hosts)

            def all_alive(h):
                hosts, _ = self.vmweb(h, "hosts")
                return len(hosts) == n and all(x["liveness"] == "alive" for x in hosts)

            wait_for(
                lambda: all(all_alive(h) for h in lab.hosts), 60, f"all {n} vmwebd to see each other alive"
            )
        except BaseException:
            self.close()
            raise

    def vmweb(self, host, *args, check=True, timeout: float = 600):
        return vmweb(host, self.creds, *args, check=check, timeout=timeout)

    def host(self, name: str):
        return next(h for h in self.lab.hosts if h.name == name)

    def daemon(self, name: str) -> LabDaemon:
        return next(d for d in self.daemons if d.host.name == name)

    def logs(self, chars: int = 3000) -> str:
        """The tail of every daemon's log (for assertion messages)."""
        return "\n".join(f"--- vmwebd of {d.host.name} ---\n{d.log_tail(chars)}" for d in self.daemons)

    def close(self):
        for d in self.daemons:
            d.close()
