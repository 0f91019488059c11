"""The peer endpoint and its wire format: strict decoding, identity bound to the TLS certificate."""

from __future__ import annotations

from io import BytesIO

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import defer
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from vmwebd.api.peer import build_peer_api
from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock, Version
from vmwebd.dom.records import VClusterRec
from vmwebd.errors import MalformedRequest
from vmwebd.gossip import pki, tls
from vmwebd.gossip.codec import decode, encode
from vmwebd.gossip.messages import (
    Ack,
    Bundle,
    Envelope,
    Gossip,
    MemberState,
    Ping,
    PingReq,
    Sync,
    SyncDelta,
    SyncReply,
)
from vmwebd.gossip.service import PeerClient, soap_body
from vmwebd.lease import paxos


def _entity():
    d = Dom(HybridClock("h1", lambda: 5))
    return d.put(VClusterRec(id="c", owner="o"))


@pytest.mark.parametrize(
    "msg",
    [
        Ping(1, "h2"),
        Ack(2, "h3"),
        PingReq(3, "h4", "10.0.0.4:8570"),
        Gossip(),
        Sync({"h1": (5, 0)}, (MemberState("h1", "a:1", 0, "alive"),)),
        SyncReply((_entity(),), {"h1": (5, 0)}, {"h2": (1, 1)}, ()),
        SyncDelta((_entity(),), {"h1": (9, 2)}),
        paxos.Prepare("op1", Version(5, 1, "h1"), ("ip/lab/10.0.0.1", "mac/52:54:00:00:00:01")),
        paxos.Promise(
            "op1",
            Version(5, 1, "h1"),
            {
                "a": (Version(4, 0, "h2"), "vm:x/y", None, None),
                "b": (None, None, Version(3, 0, "h3"), None),
                "c": (None, None, None, None),
            },
        ),
        paxos.Accept("op1", Version(5, 1, "h1"), {"a": "vm:x/y", "b": None}),
        paxos.Accepted("op1", Version(5, 1, "h1")),
        paxos.Commit(Version(5, 1, "h1"), {"a": "vm:x/y", "b": None}),
        paxos.Nack("op1", Version(5, 1, "h1"), Version(6, 0, "h2")),
        Bundle(
            (
                paxos.Commit(Version(5, 1, "h1"), {"a": "vm:x/y"}),
                paxos.Prepare("op2", Version(5, 2, "h1"), ("b",)),
            )
        ),
    ],
)
def test_every_message_kind_round_trips(msg):
    """Each message kind, with piggybacked rumors, decodes to what was encoded."""
    env = Envelope("h1", "127.0.0.1:1", "h2", msg, (MemberState("h9", "b:2", 3, "dead"),), (_entity(),))
    back = decode(etree.fromstring(etree.tostring(encode(env))))
    assert (back.src, back.src_addr, back.dst, back.members, back.version) == (
        env.src,
        env.src_addr,
        env.dst,
        env.members,
        env.version,
    )
    assert type(back.msg) is type(msg)
    assert [e.get("id") for e in back.entities] == ["c"]
    if not isinstance(msg, (SyncReply, SyncDelta)):
        assert back.msg == msg


@pytest.mark.parametrize(
    "xml, field",
    [
        (
            '<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"><ping seq="x" target="h2"/></env>',
            "ping/@seq",
        ),
        ('<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"><ping seq="1"/></env>', "@target"),
        ('<env xmlns="urn:vmweb:peer:1" v="1" src="H 1" src-addr="a:1"><gossip/></env>', "env/@src"),
        ('<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"></env>', "one message"),
        (
            '<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"><gossip/><member node="h2" addr="x" inc="0" status="zombie"/></env>',
            "member/@status",
        ),
        (
            '<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"><sync><cvv origin="h1" stamp="12"/></sync></env>',
            "cvv/@stamp",
        ),
        ('<other xmlns="urn:vmweb:peer:1"/>', "expected"),
        (
            '<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"><bundle><ping seq="1" target="h2"/></bundle></env>',
            "bundle/ping",
        ),
        ('<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1"><bundle/></env>', "bundle is empty"),
    ],
)
def test_malformed_envelopes_name_the_field(xml, field):
    """A malformed envelope is refused with MalformedRequest naming the faulty field."""
    with pytest.raises(MalformedRequest, match=field.replace("/", ".").replace("@", ".")):
        decode(etree.fromstring(xml))


@pytest.fixture
def pki_dir(tmp_path):
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    for hid in ("host1", "host2"):
        pki.issue_host_cert(ca, hid, tmp_path / hid / "pki", ["127.0.0.1"])
    return tmp_path


def _post(creds, port, body: bytes):
    from twisted.internet import reactor

    agent = Agent(reactor, contextFactory=tls.client_policy(creds))
    d = agent.request(
        b"POST",
        f"https://127.0.0.1:{port}/peer".encode(),
        Headers({b"Content-Type": [b"text/xml"]}),
        FileBodyProducer(BytesIO(body)),
    )
    return d.addCallback(lambda r: readBody(r).addCallback(lambda b: (r.code, b)))


@pytest_twisted.inlineCallbacks
def test_envelope_claiming_another_host_is_refused(start_node, pki_dir):
    """host2's certificate cannot deliver an envelope that claims to come from host1."""
    h = yield start_node(extra=f'<peers cert-dir="{pki_dir / "host1" / "pki"}" timing="local"/>')
    port = h.node.peer_port.getHost().port
    creds2 = pki.load_host_credentials(pki_dir / "host2" / "pki")
    forged = Envelope("host1", "127.0.0.1:1", "host1", Gossip())
    code, body = yield _post(creds2, port, soap_body(encode(forged)))
    assert code == 500 and b"Client.NotAuthorized" in body and b"host2" in body
    honest = Envelope("host2", "127.0.0.1:1", "host1", Gossip())
    code, body = yield _post(creds2, port, soap_body(encode(honest)))
    assert code == 200, body


@pytest_twisted.inlineCallbacks
def test_garbage_envelope_gets_malformed_request_and_changes_nothing(start_node, pki_dir):
    """A well-authenticated peer sending a malformed envelope gets Client.MalformedRequest."""
    h = yield start_node(extra=f'<peers cert-dir="{pki_dir / "host1" / "pki"}" timing="local"/>')
    yield h.node.reconciler.settled()
    before = h.node.domsvc.dom.canonical_digest()
    port = h.node.peer_port.getHost().port
    creds2 = pki.load_host_credentials(pki_dir / "host2" / "pki")
    bad = etree.fromstring(
        '<env xmlns="urn:vmweb:peer:1" v="1" src="host2" src-addr="a:1"><ping seq="x" target="host1"/></env>'
    )
    code, body = yield _post(creds2, port, soap_body(bad))
    assert code == 500 and b"Client.MalformedRequest" in body and b"seq" in body
    assert h.node.domsvc.dom.canonical_digest() == before


class _CountingSite(Site):
    """A Site that counts the connections it accepts."""

    accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return super().buildProtocol(addr)


class _AcceptingGossip:
    """Accepts every envelope; answers a Ping with an Ack inline when the sender reads replies."""

    def __init__(self):
        self.received = 0
        self.inline = []

    def receive(self, env, inline=False):
        self.received += 1
        self.inline.append(inline)
        if inline and isinstance(env.msg, Ping):
            return defer.succeed(
                [encode(Envelope("host1", "127.0.0.1:1", env.src, Ack(env.msg.seq, "host1")))]
            )
        return defer.succeed(None)


@pytest.fixture
def counting_peer(pki_dir):
    """host1's peer endpoint alone (mutual TLS, identity checked) on a loopback port, counting
    the connections it accepts; yields (site, gossip, address)."""
    from twisted.internet import reactor

    gossip = _AcceptingGossip()
    root = Resource()
    root.putChild(
        b"peer", build_peer_api(gossip, 1 << 20, require_identity=True, identity_of=tls.peer_host_id)
    )
    site = _CountingSite(root)
    port = tls.listen_tls(reactor, 0, site, pki.load_host_credentials(pki_dir / "host1" / "pki"), "127.0.0.1")
    yield site, gossip, f"127.0.0.1:{port.getHost().port}"
    port.stopListening()


def _client(pki_dir, **kw) -> PeerClient:
    from twisted.internet import reactor

    return PeerClient(reactor, tls.client_policy(pki.load_host_credentials(pki_dir / "host2" / "pki")), **kw)


def _gossip_from_host2():
    return encode(Envelope("host2", "127.0.0.1:1", "host1", Gossip()))


@pytest_twisted.inlineCallbacks
def test_sequential_sends_reuse_one_connection(counting_peer, pki_dir):
    """Twenty sends one after another to one peer travel over a single connection (one TLS handshake)."""
    site, gossip, addr = counting_peer
    client = _client(pki_dir)
    try:
        for _ in range(20):
            assert (yield client.send(addr, _gossip_from_host2())) is True
    finally:
        yield client.close()
    assert (gossip.received, site.accepted) == (20, 1)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("per_peer, accepted", [(8, 4), (2, 12)])
def test_overlapping_sends_keep_their_connections(counting_peer, pki_dir, per_peer, accepted):
    """Five rounds of four overlapping sends to one peer: a pool of 8 per peer opens four
    connections once and reuses them; the old pool of 2 kept only two, and so opened (and
    closed) two more every round."""
    site, gossip, addr = counting_peer
    client = _client(pki_dir, connections_per_peer=per_peer)
    try:
        for _ in range(5):
            sent = yield defer.gatherResults([client.send(addr, _gossip_from_host2()) for _ in range(4)])
            assert sent == [True] * 4
    finally:
        yield client.close()
    assert (gossip.received, site.accepted) == (20, accepted)


def test_peer_client_refuses_an_empty_pool():
    """A pool of no connections per peer is a configuration error naming the parameter."""
    from twisted.internet import reactor

    with pytest.raises(ValueError, match="connections_per_peer"):
        PeerClient(reactor, connections_per_peer=0)


@pytest_twisted.inlineCallbacks
def test_a_ping_is_answered_in_the_response_when_the_sender_reads_replies(counting_peer, pki_dir):
    """A sender that asks for replies inline gets the Ack in the Deliver response (one HTTP
    exchange per probe instead of two); one that does not gets a plain "ok" and no reply."""
    site, gossip, addr = counting_peer
    client = _client(pki_dir)
    got = []
    ping = encode(Envelope("host2", "127.0.0.1:1", "host1", Ping(7, "host1")))
    try:
        assert (yield client.send(addr, ping, on_reply=got.append)) is True
        assert (yield client.send(addr, ping)) is True
    finally:
        yield client.close()
    assert gossip.inline == [True, False]
    assert len(got) == 1 and len(got[0]) == 1
    ack = decode(got[0][0])
    assert (ack.src, ack.dst, ack.msg) == ("host1", "host2", Ack(7, "host1"))


def test_a_service_hands_back_its_replies_to_the_sender_and_sends_the_rest():
    """GossipService.receive(inline=True): the core's answer to the sender comes back (after the
    persist) instead of being sent; nothing is sent to the sender separately."""
    import random

    from twisted.internet import task as ttask

    from vmwebd.gossip.core import LOCAL_TEST, GossipCore
    from vmwebd.gossip.domport import DomPortAdapter
    from vmwebd.gossip.service import GossipService

    class _Commits:
        on_local_commit = []

        def commit(self, entities):
            return defer.succeed(None)

    class _Sends:
        def __init__(self):
            self.sent = []

        def send(self, addr, el, on_reply=None):
            self.sent.append(decode(el))
            return defer.succeed(True)

    clock = ttask.Clock()
    dom = Dom(HybridClock("host1", lambda: 5))
    core = GossipCore(
        "host1", "127.0.0.1:1", LOCAL_TEST, random.Random(1), DomPortAdapter(dom), clock.seconds()
    )
    sends = _Sends()
    svc = GossipService(core, _Commits(), sends, clock)
    answered = []
    svc.receive(Envelope("host2", "127.0.0.1:2", "host1", Ping(3, "host1")), inline=True).addCallback(
        answered.append
    )
    assert len(answered) == 1 and [decode(e).msg for e in answered[0]] == [Ack(3, "host1")]
    assert not any(env.dst == "host2" and isinstance(env.msg, Ack) for env in sends.sent)
    plain = []
    svc.receive(Envelope("host2", "127.0.0.1:2", "host1", Ping(4, "host1"))).addCallback(plain.append)
    assert plain == [None]
    assert any(env.dst == "host2" and env.msg == Ack(4, "host1") for env in sends.sent)


@pytest_twisted.inlineCallbacks
def test_a_peer_endpoint_says_it_reads_bundles(counting_peer, pki_dir):
    """Deliver answers carry X-Vmweb-Bundles: after one exchange the client knows it may send
    that peer several consensus messages in one envelope (and does not know before)."""
    site, gossip, addr = counting_peer
    client = _client(pki_dir)
    try:
        assert not client.reads_bundles(addr)
        assert (yield client.send(addr, _gossip_from_host2())) is True
        assert client.reads_bundles(addr)
    finally:
        yield client.close()


@pytest.fixture
def both_peer_endpoints(pki_dir):
    """host1's peer endpoint twice on loopback ports: Deliver served directly (as the daemon
    does) and through spyne's machinery; yields {direct: (gossip, port)}."""
    from twisted.internet import reactor

    out, ports = {}, []
    for direct in (True, False):
        gossip = _AcceptingGossip()
        root = Resource()
        root.putChild(
            b"peer",
            build_peer_api(
                gossip, 1 << 20, require_identity=True, identity_of=tls.peer_host_id, direct=direct
            ),
        )
        port = tls.listen_tls(
            reactor, 0, Site(root), pki.load_host_credentials(pki_dir / "host1" / "pki"), "127.0.0.1"
        )
        ports.append(port)
        out[direct] = (gossip, port.getHost().port)
    yield out
    for port in ports:
        port.stopListening()


def _post_replies(creds, port, body: bytes):
    from twisted.internet import reactor

    agent = Agent(reactor, contextFactory=tls.client_policy(creds))
    d = agent.request(
        b"POST",
        f"https://127.0.0.1:{port}/peer".encode(),
        Headers({b"Content-Type": [b"text/xml"], b"X-Vmweb-Replies": [b"1"]}),
        FileBodyProducer(BytesIO(body)),
    )
    return d.addCallback(lambda r: readBody(r).addCallback(lambda b: (r.code, b)))


def _result_or_fault(body: bytes):
    root = etree.fromstring(body)
    result = next(root.iter("{urn:vmweb:peer:1}DeliverResult"), None)
    if result is not None:
        return ("result", result.text)
    return ("fault", root.findtext(".//faultcode").partition(":")[2], root.findtext(".//faultstring"))


@pytest_twisted.inlineCallbacks
def test_deliver_served_directly_answers_what_spyne_answers(both_peer_endpoints, pki_dir):
    """The direct Deliver path gives, for every kind of call, the answer and status spyne's
    path gives: a plain "ok", replies inline, an identity refused, a malformed envelope, and a
    call of another shape (a SOAP header: left to spyne)."""
    creds2 = pki.load_host_credentials(pki_dir / "host2" / "pki")
    ping = encode(Envelope("host2", "127.0.0.1:1", "host1", Ping(7, "host1")))
    forged = encode(Envelope("host3", "127.0.0.1:1", "host1", Gossip()))
    bad = etree.fromstring(
        '<env xmlns="urn:vmweb:peer:1" v="1" src="host2" src-addr="a:1"><ping seq="x" target="host1"/></env>'
    )
    with_header = soap_body(encode(Envelope("host2", "127.0.0.1:1", "host1", Gossip()))).replace(
        b"<soap:Body>", b"<soap:Header/><soap:Body>"
    )
    bodies = [
        soap_body(_gossip_from_host2()),
        soap_body(ping),
        soap_body(forged),
        soap_body(bad),
        with_header,
    ]
    seen = {}
    for direct, (gossip, port) in both_peer_endpoints.items():
        seen[direct] = []
        for body in bodies:
            code, answer = yield _post_replies(creds2, port, body)
            seen[direct].append((code, _result_or_fault(answer)))
        assert gossip.received == 3  # the honest gossip, the ping, the one with a header
    assert seen[True] == seen[False]
    kinds = [(code, answer[0]) for code, answer in seen[True]]
    assert kinds == [(200, "result"), (200, "result"), (500, "fault"), (500, "fault"), (200, "result")]
    assert seen[True][0][1] == ("result", "ok")
    assert "Ack" not in seen[True][1][1][1] and "<ack" in seen[True][1][1][1]
    assert seen[True][2][1][1] == "Client.NotAuthorized" and seen[True][3][1][1] == "Client.MalformedRequest"
