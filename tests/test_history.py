"""Each host's load history (vmwebd/history.py): the bounded ring, the sampler on a task.Clock,
the wire form and its checks, the peer endpoint's rule; then on in-process nodes over HTTP:
``/history.json`` (any logged-in user, as the host view) and a host's page at another host
showing that host's samples, asked of it over the peers' mutual TLS."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
import requests
from twisted.internet import defer, task, threads
from twisted.web.test.requesthelper import DummyRequest

from procs import ADMIN, password_of
from test_dead_hosts import until
from test_web_views import Browserless
from vmwebd.dom.records import HostRec
from vmwebd.gossip import pki
from vmwebd.history import (
    CAPACITY,
    INTERVAL_SECONDS,
    HistoryResource,
    HistoryRing,
    HistoryUnavailable,
    Sample,
    Sampler,
    from_json,
    to_json,
)


def s(t, load=0.5, mem=1000, vms=1) -> Sample:
    return Sample(t, load, mem, vms)


# -- the ring ----------------------------------------------------------------------------------------


def test_the_default_ring_keeps_six_hours_at_one_sample_every_30_s():
    """720 samples 30 s apart: six hours."""
    assert CAPACITY * INTERVAL_SECONDS == 6 * 3600
    ring = HistoryRing()
    for t in range(0, 800 * 30, 30):
        ring.add(s(t))
    assert len(ring) == 720 and ring.samples()[0].t == 80 * 30 and ring.samples()[-1].t == 799 * 30


def test_the_ring_is_bounded_and_keeps_the_newest_oldest_first():
    """Past its capacity the oldest samples fall out; what is left is in time order."""
    ring = HistoryRing(capacity=5)
    for t in range(1, 9):
        assert ring.add(s(t, load=t / 10))
    assert [x.t for x in ring.samples()] == [4, 5, 6, 7, 8]
    assert len(ring) == 5


def test_a_sample_not_later_than_the_last_is_dropped():
    """A clock stepped back (or the same second twice) cannot reorder the ring."""
    ring = HistoryRing(capacity=5)
    assert ring.add(s(10)) and ring.add(s(20))
    assert not ring.add(s(20)) and not ring.add(s(15))
    assert [x.t for x in ring.samples()] == [10, 20]


def test_a_ring_holds_at_least_one_sample():
    """A ring of no samples is refused."""
    with pytest.raises(ValueError):
        HistoryRing(capacity=0)


# -- the sampler --------------------------------------------------------------------------------------


def test_the_sampler_takes_one_sample_at_start_and_one_every_interval():
    """On a task.Clock: a sample at start, then one each 30 s, none in between; stop ends it."""
    clock = task.Clock()
    clock.advance(1_000_000)
    ring = HistoryRing(capacity=10)
    asked = []

    def probe():
        asked.append(clock.seconds())
        return defer.succeed(s(int(clock.seconds()), vms=len(asked)))

    sampler = Sampler(ring, clock, probe, interval=30)
    sampler.start()
    assert [x.t for x in ring.samples()] == [1_000_000]
    clock.advance(29)
    assert len(ring) == 1
    clock.advance(1)
    assert [x.t for x in ring.samples()] == [1_000_000, 1_000_030]
    clock.pump([30] * 20)
    assert len(ring) == 10 and ring.samples()[-1].t == 1_000_000 + 21 * 30
    ts = [x.t for x in ring.samples()]
    assert all(b - a == 30 for a, b in zip(ts, ts[1:]))
    sampler.stop()
    clock.advance(300)
    assert len(asked) == 22


def test_a_slow_probe_makes_ticks_skip_instead_of_piling_up():
    """While a probe has not answered, later ticks ask nothing; its answer lands when it comes."""
    clock = task.Clock()
    ring = HistoryRing(capacity=10)
    pending = []

    def probe():
        pending.append(defer.Deferred())
        return pending[-1]

    sampler = Sampler(ring, clock, probe, interval=30)
    sampler.start()
    clock.pump([30, 30, 30])
    assert len(pending) == 1 and sampler.skipped == 3 and len(ring) == 0
    pending[0].callback(s(5))
    assert [x.t for x in ring.samples()] == [5]
    clock.advance(30)
    assert len(pending) == 2
    sampler.stop()


def test_a_failing_probe_loses_one_sample_and_the_sampler_goes_on():
    """A probe that fails adds nothing and the next tick asks again."""
    clock = task.Clock()
    ring = HistoryRing(capacity=10)
    calls = []

    def probe():
        calls.append(1)
        if len(calls) == 1:
            return defer.fail(RuntimeError("hypervisor gone"))
        return defer.succeed(s(int(clock.seconds())))

    sampler = Sampler(ring, clock, probe, interval=30)
    sampler.start()
    assert len(ring) == 0
    clock.advance(30)
    assert [x.t for x in ring.samples()] == [30]
    sampler.stop()


# -- the wire form --------------------------------------------------------------------------------------


def test_the_wire_form_round_trips():
    """to_json then from_json gives the same samples, in order."""
    ring = HistoryRing(capacity=5)
    for t in (10, 40, 70):
        ring.add(Sample(t, t / 100, t * 3, t // 10))
    body = to_json("host1", ring)
    doc = json.loads(body)
    assert doc["host"] == "host1" and doc["interval_s"] == 30 and doc["capacity"] == 5
    assert doc["samples"][0] == [10, 0.1, 30, 1]
    assert from_json(body, "host1") == ring.samples()


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"host": "host2", "samples": []}, "not about host host1"),
        ({"host": "host1"}, "no list of samples"),
        ({"host": "host1", "samples": [[1, 0.1, 2, 3]] * 4}, "too many"),
        ({"host": "host1", "samples": [[1, 0.1, 2]]}, "malformed sample"),
        ({"host": "host1", "samples": [[1, "0.1", 2, 3]]}, "malformed sample"),
        ({"host": "host1", "samples": [[1, True, 2, 3]]}, "malformed sample"),
        ({"host": "host1", "samples": [[2, 0.1, 2, 3], [1, 0.1, 2, 3]]}, "out of time order"),
    ],
)
def test_a_malformed_answer_is_refused_saying_why(doc, words):
    """Another host's answer is checked: the host named, the count, each sample's form, time order."""
    with pytest.raises(HistoryUnavailable) as e:
        from_json(json.dumps(doc).encode(), "host1", capacity=3)
    assert words in e.value.message and "host host1" in e.value.message


def test_not_json_is_refused():
    """An answer that is not JSON at all is refused like a malformed one."""
    with pytest.raises(HistoryUnavailable):
        from_json(b"<html>", "host1")
    with pytest.raises(HistoryUnavailable):
        from_json(b'{"host": "host1", "samples": [[1, NaN, 2, 3]]}', "host1")


# -- the peer endpoint -------------------------------------------------------------------------------------


def test_the_peer_endpoint_answers_grid_hosts_only():
    """``/history`` on the peer port: 403 without a grid host's certificate, the JSON with one."""
    ring = HistoryRing(capacity=5)
    ring.add(s(10, load=1.25))
    identity = {}
    res = HistoryResource("host1", ring, lambda request: identity.get("who"))
    req = DummyRequest([])
    body = res.render_GET(req)
    assert req.responseCode == 403 and b"certificate" in body
    identity["who"] = "host2"
    req = DummyRequest([])
    body = res.render_GET(req)
    assert req.responseCode in (None, 200)
    assert json.loads(body)["samples"] == [[10, 1.25, 1000, 1]]
    req = DummyRequest([b"other"])
    res.render_GET(req)
    assert req.responseCode == 404


# -- on nodes ----------------------------------------------------------------------------------------------


@pytest.fixture
def two_hosts(start_node, tmp_path):
    """host1 and host2 in one grid (certificates from one CA, host2 seeded with host1)."""

    @pytest_twisted.inlineCallbacks
    def start():
        ca = tmp_path / "ca"
        pki.init_ca(ca)
        certs = {}
        for host in ("host1", "host2"):
            certs[host] = tmp_path / f"{host}-pki"
            pki.issue_host_cert(ca, host, certs[host], ["127.0.0.1"])
        a = yield start_node("host1", extra=f'<peers cert-dir="{certs["host1"]}" timing="local"/>')
        b = yield start_node(
            "host2",
            extra=f'<peers cert-dir="{certs["host2"]}" timing="local" seeds="{a.node.peer_address}"/>',
        )
        yield b.node.domsvc.wait_for(
            lambda: b.node.domsvc.dom.get(HostRec, "host1") is not None and b.node.peer_address_of("host1"),
            30,
        )
        return a, b

    return start


@pytest_twisted.inlineCallbacks
def mark(node, load: float):
    """Once ``node`` took its first sample, stops its sampler (so the test knows what its ring
    holds) and puts a recognisable sample last (one second after the first)."""
    ring = node.history.ring
    yield until(lambda: len(ring) >= 1, 10, f"{node.host_id}'s first sample")
    node.history.stop()
    assert ring.add(Sample(ring.samples()[-1].t + 1, load, 4321, 7))


@pytest_twisted.inlineCallbacks
def test_a_node_samples_itself_at_start(start_node):
    """A started node holds one sample of itself: its driver's load and used memory, its VM count."""
    h = yield start_node(memory_mib=16384)
    ring = h.node.history.ring
    yield until(lambda: len(ring) >= 1, 10, "the first sample")
    first = ring.samples()[0]
    assert 0 <= first.mem_used_mib <= 16384 and first.vms == 0 and first.load1 >= 0


@pytest_twisted.inlineCallbacks
def test_history_json_needs_a_login_and_serves_any_user(start_node):
    """No session: 401; a plain user and an admin both read a host's samples (as the host view
    shows hosts to every user); an unknown host is 404."""
    h = yield start_node()
    yield mark(h.node, 2.75)

    def story():
        base = f"http://{h.node.api_address}"
        r = requests.get(base + "/history.json?host=host1", timeout=10, allow_redirects=False)
        assert r.status_code == 401 and r.json() == {"error": "not logged in"}
        for name, password in (("bob", password_of("bob")), ADMIN):
            b = Browserless(h.node.api_address)
            assert b.login(name, password).status_code == 303
            r = b.s.get(base + "/history.json?host=host1", timeout=10)
            assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
            doc = r.json()
            assert doc["host"] == "host1" and doc["interval_s"] == 30
            assert doc["samples"][-1][1:] == [2.75, 4321, 7]
            ts = [x[0] for x in doc["samples"]]
            assert ts == sorted(set(ts))
        r = b.s.get(base + "/history.json?host=host9", timeout=10)
        assert r.status_code == 404 and "no host 'host9'" in r.json()["error"]
        r = b.s.get(base + "/history.json", timeout=10)
        assert r.status_code == 404

    yield threads.deferToThread(story)


@pytest_twisted.inlineCallbacks
def test_a_page_at_another_host_shows_this_hosts_samples(two_hosts):
    """host2's page for host1 and its /history.json carry host1's samples, asked of host1 over
    the peer endpoint (host2 holds none of them), as SVG without JavaScript."""
    a, b = yield two_hosts()
    yield mark(a.node, 3.21)
    assert all(x.load1 != 3.21 for x in b.node.history.ring.samples())

    def story():
        br = Browserless(b.node.api_address)
        assert br.login("alice", password_of("alice")).status_code == 303
        r = br.s.get(br.base + "/history.json?host=host1", timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["samples"][-1][1:] == [3.21, 4321, 7]
        page = br.s.get(br.base + "/host/host1", timeout=10)
        assert page.status_code == 200
        assert "<h1>Host host1</h1>" in page.text
        n = len(a.node.history.ring)
        assert f'aria-label="Load (1 min): {n} samples, last 3.21"' in page.text
        assert 'aria-label="VMs: ' in page.text and "<polyline" in page.text
        assert 'data-history="/history.json?host=host1"' in page.text
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        hosts = br.s.get(br.base + "/hosts", timeout=10)
        assert 'href="/host/host1"' in hosts.text and 'href="/host/host2"' in hosts.text
        # The peer endpoint itself takes no one without a grid certificate.
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(f"https://{a.node.peer_address}/history", verify=False, timeout=10)

    yield threads.deferToThread(story)


@pytest_twisted.inlineCallbacks
def test_a_host_that_cannot_be_asked_leaves_the_charts_empty_saying_why(start_node):
    """A host known from the DOM but not reachable (here: this host runs without peers): the page
    still shows, naming why; /history.json answers 502 with the reason; an unknown host is 404."""
    h = yield start_node()
    yield h.node.domsvc.put(HostRec(id="host9", cpus=4, memory_mib=8192, peer="127.0.0.1:9"))

    def story():
        br = Browserless(h.node.api_address)
        assert br.login("bob", password_of("bob")).status_code == 303
        page = br.s.get(br.base + "/host/host9", timeout=10)
        assert page.status_code == 200
        assert "the load history of host host9 is not available: host host1 runs without peers" in page.text
        assert "No samples yet" in page.text
        r = br.s.get(br.base + "/history.json?host=host9", timeout=10)
        assert r.status_code == 502 and "runs without peers" in r.json()["error"]
        page = br.s.get(br.base + "/host/nope%3Cb%3E", timeout=10)
        assert page.status_code == 404 and "&#x27;nope&lt;b&gt;&#x27;" in page.text

    yield threads.deferToThread(story)


def test_escaping_of_host_names_in_the_chart_page():
    """A host id with markup in it is text on the page (the builder escapes it)."""
    from vmwebd.web.charts import svg_chart

    svg = svg_chart([1, 2], [0.5, 1.0], 4.0, "", "<b>x</b>")
    assert "<b>" not in svg and "&lt;b&gt;" in svg
    assert re.search(r'<polyline points="[0-9., ]+"', svg)
