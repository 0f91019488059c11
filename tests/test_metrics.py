"""Prometheus metrics at /metrics: real nodes in-process scraped over HTTP and parsed with
prometheus_client's own parser; series move after SOAP calls; access as the config says; config
errors; the scrape-time collector at 10,000 VMs."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
import requests
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task, threads

from procs import ADMIN, password_of
from vmwebd.client import ApiFault
from vmwebd.config import load_config
from vmwebd.demo import write_host_config
from vmwebd.errors import ConfigError
from vmwebd.gossip import pki

WAIT = 30.0


def scrape(node, auth=None, session=None) -> requests.Response:
    """GET /metrics of a node (blocking: call from a thread)."""
    get = (session or requests).get
    return get(f"http://{node.api_address}/metrics", auth=auth, timeout=10)


def samples(text: str) -> dict:
    """Sample name -> {frozenset of labels: value}, parsed with prometheus_client's parser."""
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(parsed: dict, name: str, **labels) -> float:
    return parsed.get(name, {}).get(frozenset(labels.items()), 0.0)


def total(parsed: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in parsed.get(name, {}).items() if want <= k)


def get_metrics(node, auth=None) -> defer.Deferred:
    def fetch():
        r = scrape(node, auth)
        assert r.status_code == 200, r.text
        return samples(r.text)

    return threads.deferToThread(fetch)


def until_scraped(node, pred, what: str, auth=None, timeout: float = WAIT) -> defer.Deferred:
    """Scrapes until ``pred(samples)`` holds; fails naming ``what`` after ``timeout`` s."""
    from twisted.internet import reactor

    @defer.inlineCallbacks
    def run():
        deadline = reactor.seconds() + timeout
        while True:
            parsed = yield get_metrics(node, auth)
            if pred(parsed):
                return parsed
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    return run()


OPEN = '<metrics auth="none"/>'


@pytest_twisted.inlineCallbacks
def test_soap_calls_count_by_operation_and_fault_and_vms_show_by_state(start_node):
    """A CreateCluster counts as answered with its latency, a bad call counts under its faultcode,
    the lease rounds it took count as decided, and the new VMs show on their host by state."""
    h = yield start_node(extra=OPEN)
    before = yield get_metrics(h.node)
    assert value(before, "vmweb_soap_requests_total", operation="CreateCluster", fault="none") == 0
    yield h.call("CreateCluster", "m1", "lab", "alice", 3)
    with pytest.raises(ApiFault) as e:
        yield h.call("GetCluster", "nosuch")
    assert e.value.code == "Client.NoSuchCluster"
    after = yield get_metrics(h.node)
    assert value(after, "vmweb_soap_requests_total", operation="CreateCluster", fault="none") == 1
    assert (
        value(after, "vmweb_soap_requests_total", operation="GetCluster", fault="Client.NoSuchCluster") == 1
    )
    assert value(after, "vmweb_soap_request_duration_seconds_count", operation="CreateCluster") == 1
    assert value(after, "vmweb_soap_request_duration_seconds_sum", operation="CreateCluster") > 0
    assert value(after, "vmweb_paxos_rounds_total", outcome="decided") > value(
        before, "vmweb_paxos_rounds_total", outcome="decided"
    )
    assert value(after, "vmweb_paxos_round_duration_seconds_count", outcome="decided") == value(
        after, "vmweb_paxos_rounds_total", outcome="decided"
    )
    assert value(after, "vmweb_dom_entities", kind="vm") == 3
    assert value(after, "vmweb_dom_entities", kind="vcluster") == 1
    assert total(after, "vmweb_vms", host="host1") == 3
    assert value(after, "vmweb_reconcile_passes_total") >= 1
    # Without peers the failure detector knows nobody; every state is still reported.
    assert {dict(k)["state"] for k in after["vmweb_members"]} == {"alive", "suspect", "dead", "left"}
    running = yield until_scraped(
        h.node,
        lambda p: value(p, "vmweb_vms", host="host1", state="running") == 3,
        "the three VMs running on host1",
    )
    assert total(running, "vmweb_vms") == 3


@pytest_twisted.inlineCallbacks
def test_a_refused_request_and_a_cached_read_are_counted(start_node):
    """A request that is not SOAP counts as operation unknown with its faultcode; a read answered
    from the response cache still counts under its operation."""
    h = yield start_node(extra=OPEN)
    yield h.call("CreateCluster", "c1", "lab", "alice", 1)
    yield h.call("GetCluster", "c1")
    yield h.call("GetCluster", "c1")  # same caller, same DOM: from the cache

    def post_garbage():
        return requests.post(
            f"http://{h.node.api_address}/soap", data=b"not xml", auth=ADMIN, timeout=10
        ).status_code

    code = yield threads.deferToThread(post_garbage)
    assert code == 500
    parsed = yield get_metrics(h.node)
    assert (
        value(parsed, "vmweb_soap_requests_total", operation="unknown", fault="Client.MalformedRequest") == 1
    )
    assert value(parsed, "vmweb_soap_requests_total", operation="GetCluster", fault="none") == 2


@pytest_twisted.inlineCallbacks
def test_login_mode_serves_admins_only(start_node):
    """With auth="login" (the default) metrics need an admin: none or a wrong password is 401, a
    user who is not an admin 403, an admin by HTTP Basic or by the web pages' session 200."""
    h = yield start_node()
    node = h.node

    def check():
        r = scrape(node)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert scrape(node, auth=(ADMIN[0], "wrong")).status_code == 401
        r = scrape(node, auth=("alice", password_of("alice")))
        assert r.status_code == 403 and "admins" in r.text
        r = scrape(node, auth=ADMIN)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert "vmweb_dom_entities" in samples(r.text)
        import re

        s = requests.Session()
        page = s.get(f"http://{node.api_address}/login", timeout=10)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        s.post(
            f"http://{node.api_address}/login",
            data={"csrf": token, "name": ADMIN[0], "password": ADMIN[1]},
            allow_redirects=False,
            timeout=10,
        )
        r = scrape(node, session=s)
        assert r.status_code == 200 and "vmweb_soap_requests" in r.text
        assert requests.post(f"http://{node.api_address}/metrics", auth=ADMIN, timeout=10).status_code == 405

    yield threads.deferToThread(check)


@pytest_twisted.inlineCallbacks
def test_disabled_metrics_are_not_served(start_node):
    """With enabled="false" there is no /metrics page, and SOAP still works."""
    h = yield start_node(extra='<metrics enabled="false"/>')
    r = yield threads.deferToThread(scrape, h.node, ADMIN)
    assert r.status_code == 404
    clusters = yield h.call("ListClusters", None)
    assert not clusters


@pytest_twisted.inlineCallbacks
def test_each_node_has_its_own_registry(start_node):
    """Two nodes in one process count apart, and nothing goes to the library's global registry."""
    from prometheus_client import REGISTRY

    a = yield start_node("host1", extra=OPEN)
    b = yield start_node("host2", extra=OPEN)
    yield a.call("CreateCluster", "only-a", "lab", "alice", 1)
    pa = yield get_metrics(a.node)
    pb = yield get_metrics(b.node)
    assert value(pa, "vmweb_soap_requests_total", operation="CreateCluster", fault="none") == 1
    assert value(pb, "vmweb_soap_requests_total", operation="CreateCluster", fault="none") == 0
    assert not any(f.name.startswith("vmweb_") for f in REGISTRY.collect())


@pytest_twisted.inlineCallbacks
def test_gossip_traffic_and_members_are_counted(start_node, tmp_path):
    """Two hosts gossiping over mutual TLS: each counts the envelopes and bytes it sent and
    received by kind, and its failure detector's members by state."""
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    certs = {}
    for host in ("host1", "host2"):
        certs[host] = tmp_path / f"{host}-pki"
        pki.issue_host_cert(ca, host, certs[host], ["127.0.0.1"])
    a = yield start_node("host1", extra=f'<peers cert-dir="{certs["host1"]}" timing="local"/>{OPEN}')
    b = yield start_node(
        "host2",
        extra=f'<peers cert-dir="{certs["host2"]}" timing="local" seeds="{a.node.peer_address}"/>{OPEN}',
    )
    for n in (a, b):
        parsed = yield until_scraped(
            n.node,
            lambda p: (
                value(p, "vmweb_members", state="alive") == 2
                and total(p, "vmweb_gossip_messages_received_total", via="request") > 0
                and total(p, "vmweb_gossip_messages_sent_total") > 0
            ),
            f"{n.node.host_id} to see both hosts alive, having sent and received envelopes",
        )
        assert total(parsed, "vmweb_gossip_bytes_sent_total") > total(
            parsed, "vmweb_gossip_messages_sent_total"
        )
        assert value(parsed, "vmweb_gossip_bytes_received_total", via="request") > 0
        kinds = {dict(k)["kind"] for k in parsed["vmweb_gossip_messages_sent_total"]}
        assert kinds & {"ping", "sync", "gossip", "sync-reply"}, kinds
        assert "other" not in kinds


# -- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "element, field, words",
    [
        ('<metrics auth="sometimes"/>', "metrics/@auth", "'sometimes' is not an access mode (login, none)"),
        ('<metrics enabled="yes"/>', "metrics/@enabled", "'yes' is not true or false"),
        ('<metrics port="9100"/>', "metrics/@port", "unknown attribute"),
    ],
)
def test_a_wrong_metrics_element_is_a_config_error(tmp_path, element, field, words):
    """A wrong metrics attribute is a ConfigError naming the file, its line and the attribute."""
    cfg = write_host_config(tmp_path / "h", "host1", 0, 0, 4, 4096, extra=element)
    line = cfg.read_text().splitlines().index("  " + element) + 1
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == f"{cfg}:{line}: {field}: {words}" or words in str(e.value)
    assert e.value.path == str(cfg) and e.value.line == line and e.value.field == field


def test_the_daemon_reports_a_wrong_metrics_element_without_a_traceback(tmp_path, capsys):
    """vmwebd exits 2 with one line naming file, line and attribute, and no traceback."""
    from vmwebd.daemon import main

    cfg = write_host_config(tmp_path / "h", "host1", 0, 0, 4, 4096, extra='<metrics auth="open"/>')
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:" in err and "metrics/@auth" in err and "'open'" in err
    assert "Traceback" not in err


def test_defaults_serve_metrics_to_admins():
    """No metrics element: served, to admins (and the example config says the same)."""
    from procs import REPO
    from vmwebd.config import MetricsConfig

    assert MetricsConfig() == MetricsConfig(enabled=True, auth="login")
    assert load_config(REPO / "conf" / "vmwebd.xml").metrics == MetricsConfig()


# -- scrape cost -------------------------------------------------------------------------------


class _Store:
    def stats(self):
        from vmwebd.dom.store import StoreStats

        return StoreStats(0, 0, 0)


class _DomSvc:
    def __init__(self, dom):
        self.dom = dom
        self.store = _Store()


def big_dom(vms: int, hosts: int = 50):
    from vmwebd.dom.document import Dom
    from vmwebd.dom.hlc import HybridClock
    from vmwebd.dom.records import LeaseRec, MigrationRec, VClusterRec, VmRec, VmStatus

    ms = [1_700_000_000_000]

    def now():
        ms[0] += 1
        return ms[0]

    dom = Dom(HybridClock("host0", now))
    states = ("running", "running", "running", "shutoff", "error")
    for c in range(vms // 10):
        dom.put(VClusterRec(id=f"c{c}", owner="alice", template="lab", vni=100 + c))
        for i in range(10):
            vid = f"c{c}/n{i}"
            host = f"host{(c * 10 + i) % hosts}"
            dom.put(
                VmRec(
                    id=vid,
                    cluster=f"c{c}",
                    name=f"n{i}",
                    host=host,
                    token=f"t{c}-{i}",
                    ip=f"10.{c // 250}.{c % 250}.{i + 2}",
                )
            )
            dom.put(VmStatus(id=vid, host=host, state=states[i % len(states)], token=f"t{c}-{i}"))
            dom.put(LeaseRec(id=f"ip/lab/10.{c // 250}.{c % 250}.{i + 2}", holder=vid))
    for m in range(20):
        dom.put(
            MigrationRec(
                id=f"m{m}",
                vm="c0/n0",
                source="host0",
                dest="host1",
                phase="done" if m % 2 else "migrating",
                mode="live",
                bytes=1 << 20,
                downtime_ms=30 + m,
            )
        )
    return dom


def test_scrape_at_10000_vms_reads_indexes_and_decodes_only_after_a_change():
    """At 10,000 VMs only the first scrape reads every VM; later ones look only at what changed
    (well under 50 ms, unchanged or after a change), and count the change."""
    from prometheus_client import CollectorRegistry, generate_latest

    from vmwebd.dom.records import VmStatus
    from vmwebd.metrics import StateCollector

    dom = big_dom(10_000)
    collector = StateCollector(_DomSvc(dom), lambda: {"host0": "alive", "host1": "suspect"}, lambda: None)
    registry = CollectorRegistry()
    registry.register(collector)
    t0 = time.perf_counter()
    first = samples(generate_latest(registry).decode())
    cold = time.perf_counter() - t0
    assert total(first, "vmweb_vms") == 10_000
    assert total(first, "vmweb_vms", state="error") == 2_000
    assert value(first, "vmweb_dom_entities", kind="lease") == 10_000
    assert value(first, "vmweb_migrations", phase="done", mode="live") == 10
    assert value(first, "vmweb_migrations_done_bytes", mode="live") == 10 << 20
    assert value(first, "vmweb_members", state="suspect") == 1

    t0 = time.perf_counter()
    generate_latest(registry)
    warm = time.perf_counter() - t0
    dom.put(VmStatus(id="c0/n4", host="host4", state="running", token="t0-4"))
    dom.delete("vm", "c1/n0")
    t0 = time.perf_counter()
    again = samples(generate_latest(registry).decode())
    changed = time.perf_counter() - t0
    assert total(again, "vmweb_vms", state="error") == 1_999
    assert total(again, "vmweb_vms") == 9_999 and value(again, "vmweb_dom_entities", kind="vm") == 9_999
    # Generous bounds (a shared 2-core machine): both take about a millisecond.
    assert warm < 0.05 and changed < 0.05, (
        f"scrapes took {warm * 1000:.1f} ms unchanged, {changed * 1000:.1f} ms after a change "
        f"(first: {cold * 1000:.0f} ms)"
    )
