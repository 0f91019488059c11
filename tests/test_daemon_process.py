"""The real ``vmwebd`` process: systemd notifications, crash durability, config errors, hostile XML.

Each test starts its own daemon(s) (``python -m vmwebd.daemon``) in its own host directory on free
loopback ports, and knows the daemon serves when it sends READY=1 over ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import base64
import http.client
import random
import subprocess
import sys
import threading

import pytest
from lxml import etree

from procs import ADMIN, REPO, Daemon, NotifySocket, admin_client, child_env, create_users, host_config
from vmwebd.client import ApiClient, ApiFault

pytestmark = pytest.mark.slow

DOM_NS = "urn:vmweb:dom:1"
API_NS = "urn:vmweb:api:1"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


@pytest.fixture
def daemons():
    """Starts daemons on demand (``start(directory, fsync=...)``) and kills any still running."""
    started: list[Daemon] = []

    def start(directory=None, fsync=False, config=None, api_port=None, **kw) -> Daemon:
        if config is None:
            config, api_port = host_config(directory, **kw)
        d = Daemon(config, fsync=fsync, api_port=api_port)
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in started:
            d.close()


def test_notifies_ready_status_and_stopping(daemons, tmp_path):
    """The daemon sends STATUS naming its host and READY=1 once it serves, STOPPING=1 on SIGTERM, and exits 0."""
    d = daemons(tmp_path / "h1", host_id="alpha7")
    status = d.notify.wait_for("STATUS", timeout=5)["STATUS"]
    assert "alpha7" in status and str(d.api_port) in status, status
    # READY came after the port was listening: a call works straight away.
    assert [h["id"] for h in admin_client(d.address).call("ListHosts")] == ["alpha7"]
    assert d.terminate() == 0, d.log()
    d.notify.wait_for("STOPPING", "1", timeout=5)
    keys = [k for msg in d.notify.messages for k in msg]
    assert keys.index("READY") < keys.index("STOPPING")


# -- durability across SIGKILL ------------------------------------------------------------------


class Model:
    """What the clients were told: acknowledged cluster sizes, acknowledged destroys, one maybe."""

    def __init__(self):
        self.count: dict[str, int] = {}  # acknowledged live clusters and their VM counts
        self.destroyed: set[str] = set()  # acknowledged DestroyCluster
        self.maybe = None  # the operation in flight when the daemon died
        self.acks = 0
        self.error: BaseException | None = None
        self.done = False
        self.cond = threading.Condition()

    def next_op(self, rng: random.Random, serial: int):
        live = sorted(self.count)
        roll = rng.random()
        if not live or roll < 0.4:
            return ("CreateCluster", f"k{serial}", "lab", "alice", rng.randint(1, 4))
        name = rng.choice(live)
        if roll < 0.8:
            return ("ScaleCluster", name, rng.randint(1, 5))
        return ("DestroyCluster", name)

    def acknowledge(self, op, result) -> None:
        kind, name = op[0], op[1]
        if kind == "CreateCluster":
            assert result["count"] == op[4], result
            self.count[name] = op[4]
        elif kind == "ScaleCluster":
            assert result["count"] == op[2], result
            self.count[name] = op[2]
        else:
            assert result in ("destroyed", "destroying"), result
            del self.count[name]
            self.destroyed.add(name)


def run_series(client: ApiClient, model: Model, rng: random.Random, n_ops: int, first: int) -> None:
    """Runs ``n_ops`` random operations one after another until one fails (the daemon was killed)."""
    try:
        for i in range(n_ops):
            op = model.next_op(rng, first + i)
            with model.cond:
                model.maybe = op
            try:
                result = client.call(*op)
            except ApiFault as e:
                raise AssertionError(f"{op} was refused: {e}") from None
            except Exception:
                return  # the daemon died under this call: it may or may not have happened
            with model.cond:
                model.acknowledge(op, result)
                model.maybe = None
                model.acks += 1
                model.cond.notify_all()
    except BaseException as e:  # noqa: BLE001  (handed to the test thread)
        model.error = e
    finally:
        with model.cond:
            model.done = True
            model.cond.notify_all()


def live_vms(cluster: dict) -> int:
    return sum(1 for v in cluster["vms"] or [] if v["desired"] != "absent")


def check_recovered(client: ApiClient, model: Model) -> None:
    """Every acknowledged change survived; only the operation in flight may have gone either way."""
    maybe = model.maybe
    maybe_name = maybe[1] if maybe else None
    clusters = {c["name"]: c for c in client.call("ListClusters", None) or []}
    for name, count in model.count.items():
        if name == maybe_name and maybe[0] == "DestroyCluster":
            if name not in clusters or clusters[name]["state"] == "destroying":
                continue
        assert name in clusters, f"acknowledged cluster {name} is missing after the crash ({maybe=})"
        c = clusters[name]
        allowed = {count}
        if name == maybe_name and maybe[0] == "ScaleCluster":
            allowed.add(maybe[2])
        assert c["count"] in allowed and live_vms(c) == c["count"], (name, count, maybe, c)
    for name in model.destroyed:
        assert name not in clusters or clusters[name]["state"] == "destroying", clusters[name]
    unexpected = set(clusters) - set(model.count) - model.destroyed
    if maybe and maybe[0] == "CreateCluster" and maybe[1] in unexpected:
        unexpected.discard(maybe[1])
        assert clusters[maybe[1]]["count"] == maybe[4] == live_vms(clusters[maybe[1]])
    assert not unexpected, f"clusters nobody created: {unexpected}"

    dom = etree.fromstring(client.call("GetDom").encode())
    vms = [vm for vm in dom.findall(f"{{{DOM_NS}}}vms/{{{DOM_NS}}}vm") if vm.get("deleted") != "true"]
    ips = [vm.get("ip") for vm in vms]
    macs = [vm.get("mac") for vm in vms]
    assert len(set(ips)) == len(ips), f"duplicate IPs: {sorted(ips)}"
    assert len(set(macs)) == len(macs), f"duplicate MACs: {sorted(macs)}"
    leases = {
        el.get("id"): el.get("holder")
        for el in dom.findall(f"{{{DOM_NS}}}leases/{{{DOM_NS}}}lease")
        if el.get("deleted") != "true"
    }
    tokens = {
        c.get("id"): c.get("token")
        for c in dom.findall(f"{{{DOM_NS}}}vclusters/{{{DOM_NS}}}vcluster")
        if c.get("deleted") != "true"
    }
    for vm in vms:
        if vm.get("desired") != "absent":  # an absent VM gives its leases back before it goes
            holder = f"vm:{vm.get('id')}#{tokens[vm.get('cluster')]}"
            assert leases.get(f"ip/lab/{vm.get('ip')}") == holder, (vm.attrib, holder)
            assert leases.get(f"mac/{vm.get('mac')}") == holder, (vm.attrib, holder)

    if maybe and maybe[0] == "CreateCluster" and maybe[1] not in clusters:
        # A client that never got its reply retries; the retry must not trip over leftovers.
        assert client.call(*maybe)["count"] == maybe[4]


@pytest.mark.parametrize("seed", range(1, 7))
def test_acknowledged_changes_survive_sigkill(daemons, tmp_path, seed):
    """After SIGKILL at a random point, a restarted daemon (fsync on) has every acknowledged change and no duplicate address."""
    rng = random.Random(seed)
    config, port = host_config(tmp_path / "h1", cpus=32, memory_mib=65536)
    d = daemons(fsync=True, config=config, api_port=port)
    client = admin_client(d.address)
    create_users(client, ("alice",))
    model = Model()
    for i in range(3):
        op = ("CreateCluster", f"base{i}", "lab", "alice", rng.randint(1, 4))
        model.acknowledge(op, client.call(*op))

    n_ops = 10
    kill_after = rng.randint(0, n_ops - 1)
    worker = threading.Thread(target=run_series, args=(client, model, rng, n_ops, 100), daemon=True)
    worker.start()
    with model.cond:
        assert model.cond.wait_for(lambda: model.acks >= kill_after or model.done, timeout=60)
        # Killed while holding the lock: no acknowledgement can slip in between the check and the kill.
        d.kill()
    worker.join(timeout=60)
    assert not worker.is_alive()
    if model.error is not None:
        raise model.error
    assert model.acks >= kill_after

    d2 = daemons(fsync=True, config=config, api_port=port)
    check_recovered(admin_client(d2.address), model)
    assert d2.terminate() == 0, d2.log()


# -- configuration errors -----------------------------------------------------------------------


def test_config_error_exits_2_with_one_line(tmp_path):
    """A bad field makes the daemon exit 2 at once with one stderr line naming file, line and field, and never READY."""
    config, _ = host_config(tmp_path / "h1")
    lines = config.read_text().splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if "<listen " in line)
    lines[lineno - 1] = '  <listen api="127.0.0.1:99999" peer="127.0.0.1:1"/>'
    config.write_text("\n".join(lines) + "\n")
    notify = NotifySocket(tmp_path)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vmwebd.daemon", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env=child_env(NOTIFY_SOCKET=notify.path),
        )
        assert proc.returncode == 2, proc
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1, proc.stderr
        assert f"{config}:{lineno}:" in err[0] and "listen/@api" in err[0] and "99999" in err[0], err
        notify.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.sock.recv(4096)  # the process has exited: anything it sent is already queued
    finally:
        notify.close()


@pytest.mark.parametrize(
    "network, field, fragment",
    [
        # TEST-NET-2: never an address of this machine
        ('<network underlay="198.51.100.77" devices="kernel"/>', "network/@underlay", "198.51.100.77"),
    ],
)
def test_an_underlay_address_not_on_this_host_is_a_config_error(tmp_path, network, field, fragment):
    """Where segments' devices are made, the underlay address must be one of this host's: the
    daemon refuses to start, naming the field and the address."""
    config, _ = host_config(tmp_path / "h1")
    config.write_text(config.read_text().replace("</vmwebd>", f"  {network}\n</vmwebd>"))
    proc = subprocess.run(
        [sys.executable, "-m", "vmwebd.daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=child_env(),
    )
    assert proc.returncode == 2, proc
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(config) in err[0] and field in err[0] and fragment in err[0], err


# -- hostile XML at the real API ----------------------------------------------------------------


def soap(body: str, prolog: str = '<?xml version="1.0" encoding="UTF-8"?>') -> bytes:
    return (
        f'{prolog}<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}" xmlns:t="{API_NS}">'
        f"<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    ).encode()


def create_body(name: str, owner: str = "alice") -> str:
    return (
        f"<t:CreateCluster><t:name>{name}</t:name><t:template>lab</t:template>"
        f"<t:owner>{owner}</t:owner><t:count>1</t:count></t:CreateCluster>"
    )


def post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        auth = base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
        conn.request(
            "POST",
            "/soap",
            body,
            {
                "Content-Type": "text/xml; charset=utf-8",
                "SOAPAction": '"CreateCluster"',
                "Authorization": f"Basic {auth}",
            },
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def faultcode(body: bytes) -> str:
    fault = etree.fromstring(body).find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault")
    assert fault is not None, body[:500]
    return fault.findtext("faultcode").rpartition(":")[2]


def dom_without_hosts(client: ApiClient) -> bytes:
    """The DOM minus the host records, which the heartbeat rewrites on its own."""
    dom = etree.fromstring(client.call("GetDom").encode())
    dom.remove(dom.find(f"{{{DOM_NS}}}hosts"))
    return etree.tostring(dom, method="c14n")


def test_hostile_bodies_get_faults_and_change_nothing(daemons, tmp_path):
    """Billion laughs, XXE and an oversized body at CreateCluster each get their Client fault and leave the DOM as it was."""
    d = daemons(tmp_path / "h1")
    client = admin_client(d.address)
    create_users(client, ("alice", "bob"))
    client.call("CreateCluster", "keep", "lab", "bob", 1)
    # StartVm answers once the VM runs: from then on nothing changes the DOM but the heartbeat.
    assert client.call("StartVm", "keep", "pc0")["state"] == "running"
    before = dom_without_hosts(client)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-51c0")
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(
            f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
        )
        + "]>"
    )
    xxe = f'<?xml version="1.0"?><!DOCTYPE foo [<!ENTITY xxe SYSTEM "file://{secret}">]>'
    cases = [
        ("billion laughs", soap(create_body("laughs", "&lol9;"), laughs), 500, "Client.MalformedRequest"),
        ("xxe", soap(create_body("xxe", "&xxe;"), xxe), 500, "Client.MalformedRequest"),
        ("oversized", soap(create_body("big", "a" * (1 << 20))), 413, "Client.RequestTooLarge"),
    ]
    for what, body, status, code in cases:
        got_status, got = post(d.api_port, body)
        assert (got_status, faultcode(got)) == (status, code), (what, got[:500])
        assert b"TOP-SECRET" not in got and b"lollol" not in got, what
    assert dom_without_hosts(client) == before
    assert [c["name"] for c in client.call("ListClusters", None)] == ["keep"]
    assert "TOP-SECRET" not in client.call("GetDom")
    # The same call without the hostile parts is accepted: the faults were about the XML.
    status, _ = post(d.api_port, soap(create_body("fine")))
    assert status == 200
    assert [c["name"] for c in client.call("ListClusters", None)] == ["fine", "keep"]
