"""Request bodies of every size up to ``max_body_bytes``, and answers that leave no errors behind.

Twisted keeps a request body under 100,000 bytes in memory and anything larger (or chunked) in a
temporary file; both must reach the service intact, on a user-style endpoint and on the peer
endpoint (mutual TLS, as the daemon serves it). Servers run on loopback ports on the real reactor;
blocking clients run in the reactor's thread pool.
"""

from __future__ import annotations

import gc
import hashlib
import http.client
import logging
from io import BytesIO

import pytest
import pytest_twisted
import zeep
from lxml import etree

# isort: off
import vmwebd.api  # noqa: F401  (spyne's compatibility fixes come before spyne)

# isort: on
from spyne import Service, Unicode, rpc
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from vmwebd.api.peer import build_peer_api
from vmwebd.api.soap import SOAP11_ENV_NS, build_soap_resource, local_faultcode
from vmwebd.client import ApiFault
from vmwebd.gossip import pki, tls
from vmwebd.gossip.codec import NS as PEER_NS
from vmwebd.gossip.codec import encode
from vmwebd.gossip.messages import Envelope, Gossip, MemberState
from vmwebd.gossip.service import PeerClient, soap_body

TNS = "urn:vmweb:test:bodies:1"
LIMIT = 256 * 1024
TWISTED_MEMORY_LIMIT = 100_000  # twisted.web.http.Request.gotLength: a tempfile from here on
SIZES = [TWISTED_MEMORY_LIMIT - 1, TWISTED_MEMORY_LIMIT, TWISTED_MEMORY_LIMIT + 1, 101_000, LIMIT]


def digest(text: str) -> str:
    return f"{len(text)}:{hashlib.sha256(text.encode()).hexdigest()}"


class _Held:
    """An operation the test answers by hand, and the request it arrived on."""

    calls: list = []
    arrived: defer.Deferred | None = None


class BodyService(Service):
    @rpc(Unicode, _returns=Unicode)
    def Digest(ctx, text):
        return digest(text)

    @rpc(Unicode, _returns=Unicode)
    def LaterDigest(ctx, text):
        d = defer.Deferred()
        reactor.callLater(0, d.callback, digest(text))
        return d

    @rpc(_returns=Unicode)
    def Hold(ctx):
        d = defer.Deferred()
        _Held.calls.append((ctx.transport.req, d))
        if _Held.arrived is not None:
            arrived, _Held.arrived = _Held.arrived, None
            reactor.callLater(0, arrived.callback, None)  # once spyne holds the Deferred
        return d


@pytest.fixture
def server():
    root = Resource()
    root.putChild(b"soap", build_soap_resource([BodyService], tns=TNS, name="Bodies", max_body_bytes=LIMIT))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    _Held.calls = []
    yield port.getHost().port
    port.stopListening()


@pytest.fixture
def twisted_errors():
    """Twisted log events at error level or carrying a failure, seen while the test runs."""
    events = []

    def observe(event):
        if (
            "log_failure" in event
            or event.get("isError")
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
        ):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def describe(events) -> list[str]:
    out = []
    for e in events:
        f = e.get("log_failure")
        out.append(f"{e.get('log_format') or e.get('message')}: {f.getErrorMessage() if f else ''}")
    return out


def envelope_of_size(size: int, op: str) -> tuple[bytes, str]:
    """A SOAP call of ``op(text)`` exactly ``size`` bytes long, and the text it carries."""
    head = (
        f'<soapenv:Envelope xmlns:soapenv="{SOAP11_ENV_NS}" xmlns:t="{TNS}"><soapenv:Body><t:{op}><t:text>'
    ).encode()
    tail = f"</t:text></t:{op}></soapenv:Body></soapenv:Envelope>".encode()
    n = size - len(head) - len(tail)
    text = ("0123456789abcdef" * (n // 16 + 1))[:n]
    body = head + text.encode() + tail
    assert len(body) == size
    return body, text


def _http_post(port: int, body: bytes, chunked: bool) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
        if chunked:
            conn.request(
                "POST", "/soap", body=iter([body[:4096], body[4096:]]), headers=headers, encode_chunked=True
            )
        else:
            conn.request("POST", "/soap", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_post(port: int, body: bytes, chunked: bool = False) -> defer.Deferred:
    return threads.deferToThread(_http_post, port, body, chunked)


def result_of(answer: bytes, op: str, ns: str = TNS) -> str | None:
    return etree.fromstring(answer).findtext(f".//{{{ns}}}{op}Result")


def fault_of(answer: bytes) -> tuple[str, str]:
    fault = etree.fromstring(answer).find(f"{{{SOAP11_ENV_NS}}}Body/{{{SOAP11_ENV_NS}}}Fault")
    assert fault is not None, answer[:300]
    return local_faultcode(fault.findtext("faultcode")), fault.findtext("faultstring")


# -- a user-style service -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", SIZES)
def test_bodies_up_to_the_limit_are_answered(server, twisted_errors, size, chunked):
    """Calls of 99,999 / 100,000 / 100,001 / 101,000 bytes and exactly the limit are answered
    with the digest of what was sent, by a plain and by a Deferred operation."""
    for op in ("Digest", "LaterDigest"):
        body, text = envelope_of_size(size, op)
        status, answer = yield http_post(server, body, chunked)
        assert status == 200, answer[:300]
        assert result_of(answer, op) == digest(text)
    assert describe(twisted_errors) == []


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_one_byte_over_the_limit_is_refused(server, chunked):
    """A call one byte over max_body_bytes gets Client.RequestTooLarge (HTTP 413) naming both sizes."""
    body, _ = envelope_of_size(LIMIT + 1, "Digest")
    status, answer = yield http_post(server, body, chunked)
    assert status == 413
    code, message = fault_of(answer)
    assert code == "Client.RequestTooLarge"
    assert f"{LIMIT + 1} bytes" in message and f"limit of {LIMIT} bytes" in message
    status, answer = yield http_post(server, envelope_of_size(LIMIT, "Digest")[0])
    assert status == 200


def _zeep_digest(port: int, text: str) -> str:
    client = zeep.Client(
        f"http://127.0.0.1:{port}/soap?wsdl", transport=zeep.Transport(timeout=30, operation_timeout=30)
    )
    try:
        return client.service.Digest(text)
    finally:
        client.transport.session.close()


@pytest_twisted.inlineCallbacks
def test_a_101000_byte_call_through_zeep(server):
    """The call users reported (about 101,000 bytes, sent by zeep) gets its answer."""
    text = "é" * 50_500  # two bytes each in UTF-8
    assert (yield threads.deferToThread(_zeep_digest, server, text)) == digest(text)


@pytest_twisted.inlineCallbacks
def test_real_user_endpoint_parses_a_large_call(start_node):
    """The daemon's own /soap answers a 101,000-byte GetCluster with a SOAP fault about the
    cluster, not an HTTP error: the body was parsed and the operation ran."""
    h = yield start_node()
    with pytest.raises(ApiFault) as caught:
        yield h.call("GetCluster", "c" * 101_000)
    assert caught.value.code.startswith("Client."), caught.value


# -- answers leave nothing behind ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_normal_calls_log_no_errors(server, twisted_errors):
    """Ordinary calls, small and large, plain and Deferred, log no error (in particular no
    "Producer was not unregistered")."""
    for size in (600, 150_000):
        for op in ("Digest", "LaterDigest"):
            body, text = envelope_of_size(size, op)
            status, answer = yield http_post(server, body)
            assert (status, result_of(answer, op)) == (200, digest(text))
    gc.collect()  # an unhandled failure in a Deferred is only logged once it is collected
    assert describe(twisted_errors) == []


def _hold_request() -> bytes:
    body = (
        f'<soapenv:Envelope xmlns:soapenv="{SOAP11_ENV_NS}" xmlns:t="{TNS}">'
        f"<soapenv:Body><t:Hold/></soapenv:Body></soapenv:Envelope>"
    ).encode()
    return (
        b"POST /soap HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


class _Collect(Protocol):
    def __init__(self):
        self.data = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_an_answer_is_written_at_once(server):
    """Once an operation's Deferred fires, its whole answer is written and the request finished,
    with a Content-Length and no producer left registered: there is no later step that a
    dropped connection could interrupt."""
    _Held.arrived = defer.Deferred()
    client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server), _Collect())
    client.transport.write(_hold_request())
    yield _Held.arrived
    ((request, held),) = _Held.calls
    held.callback("answer")
    assert request.finished and request.producer is None, client.data
    assert request.responseHeaders.getRawHeaders(b"content-length") is not None
    yield client.lost  # the server closes: the call asked for Connection: close
    assert client.data.startswith(b"HTTP/1.1 200 ") and b"answer" in client.data


@pytest_twisted.inlineCallbacks
def test_a_client_leaving_before_its_answer_leaves_no_errors(server, twisted_errors, caplog):
    """A client that gives up (a peer's timeout) before the answer is ready: the answer is
    dropped without any error logged, and the endpoint keeps serving."""
    caplog.set_level(logging.ERROR)
    _Held.arrived = defer.Deferred()
    client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server), _Collect())
    client.transport.write(_hold_request())
    yield _Held.arrived
    ((request, held),) = _Held.calls
    gone = request.notifyFinish()
    client.transport.abortConnection()
    yield gone.addErrback(lambda _: None)
    held.callback("too late")
    gc.collect()
    assert describe(twisted_errors) == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    body, text = envelope_of_size(1000, "Digest")
    status, answer = yield http_post(server, body)
    assert (status, result_of(answer, "Digest")) == (200, digest(text))


# -- the peer endpoint, over mutual TLS ---------------------------------------------------------


class _RecordingGossip:
    def __init__(self):
        self.received = []

    def receive(self, env, inline=False):
        self.received.append(env)
        return defer.succeed(None)


@pytest.fixture(scope="module")
def peer_creds(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    pki.init_ca(base / "ca")
    for hid in ("host1", "host2"):
        pki.issue_host_cert(base / "ca", hid, base / hid / "pki", ["127.0.0.1"])
    return {hid: pki.load_host_credentials(base / hid / "pki") for hid in ("host1", "host2")}


@pytest.fixture
def peer(peer_creds):
    gossip = _RecordingGossip()
    root = Resource()
    root.putChild(b"peer", build_peer_api(gossip, LIMIT, require_identity=True, identity_of=tls.peer_host_id))
    port = tls.listen_tls(reactor, 0, Site(root), peer_creds["host1"], "127.0.0.1")
    yield gossip, port.getHost().port
    port.stopListening()


def _members(n: int) -> tuple[MemberState, ...]:
    return tuple(
        MemberState(f"member{i}", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8570", i, "alive")
        for i in range(n)
    )


def deliver_of_size(size: int) -> tuple[bytes, int]:
    """A Deliver call of exactly ``size`` bytes: an envelope with as many member rumors as fit,
    then XML whitespace after the SOAP envelope; returns it and the number of rumors."""

    def body(n):
        return soap_body(encode(Envelope("host2", "127.0.0.1:1", "host1", Gossip(), _members(n))))

    per_member = (len(body(200)) - len(body(100))) / 100
    n = int((size - len(body(0))) / per_member)
    while len(body(n)) > size:
        n -= 1
    xml = body(n)
    return xml + b"\n" * (size - len(xml)), n


def post_peer(creds, port: int, body: bytes) -> defer.Deferred:
    agent = Agent(reactor, contextFactory=tls.client_policy(creds))
    d = agent.request(
        b"POST",
        f"https://127.0.0.1:{port}/peer".encode(),
        Headers({b"Content-Type": [b"text/xml; charset=utf-8"]}),
        FileBodyProducer(BytesIO(body)),
    )
    return d.addCallback(lambda r: readBody(r).addCallback(lambda b: (r.code, b)))


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("size", SIZES)
def test_peer_deliver_up_to_the_limit(peer, peer_creds, twisted_errors, size):
    """A Deliver of a large envelope, at each size around Twisted's 100,000 bytes and at the
    limit, is accepted and every rumor in it reaches gossip."""
    gossip, port = peer
    body, n = deliver_of_size(size)
    assert len(body) == size and n > 100
    code, answer = yield post_peer(peer_creds["host2"], port, body)
    assert code == 200, answer[:300]
    assert result_of(answer, "Deliver", PEER_NS) == "ok"
    (env,) = gossip.received
    assert env.src == "host2" and len(env.members) == n
    assert env.members[-1].node == f"member{n - 1}"
    assert describe(twisted_errors) == []


@pytest_twisted.inlineCallbacks
def test_peer_deliver_over_the_limit_is_refused(peer, peer_creds):
    """A Deliver one byte over the limit gets Client.RequestTooLarge (HTTP 413); nothing is delivered."""
    gossip, port = peer
    body, _ = deliver_of_size(LIMIT + 1)
    code, answer = yield post_peer(peer_creds["host2"], port, body)
    assert code == 413
    assert fault_of(answer)[0] == "Client.RequestTooLarge"
    assert gossip.received == []


@pytest_twisted.inlineCallbacks
def test_peer_client_delivers_a_large_envelope(peer, peer_creds):
    """PeerClient's own send of a 230 kB envelope (an anti-entropy exchange) is delivered."""
    gossip, port = peer
    env = Envelope("host2", "127.0.0.1:1", "host1", Gossip(), _members(3000))
    assert len(soap_body(encode(env))) > 2 * TWISTED_MEMORY_LIMIT
    client = PeerClient(reactor, tls.client_policy(peer_creds["host2"]))
    try:
        assert (yield client.send(f"127.0.0.1:{port}", encode(env))) is True
    finally:
        yield client.close()
    assert [len(e.members) for e in gossip.received] == [3000]
