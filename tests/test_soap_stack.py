"""The hardened SOAP stack (vmwebd.api.soap) on a loopback port, called with zeep and raw HTTP.

The server runs on the real reactor (pytest-twisted); blocking clients (zeep, http.client) run in
the reactor's thread pool through deferToThread, so the reactor keeps serving while they wait.
"""

from __future__ import annotations

import http.client
import sys
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import zeep
from lxml import etree

# isort: off
import vmwebd.api  # noqa: F401  (spyne's compatibility fixes come before spyne)

# isort: on
from spyne import Integer, Service, Unicode, rpc
from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from vmwebd.api import compat
from vmwebd.api.soap import SOAP11_ENV_NS, build_soap_resource, local_faultcode
from vmwebd.errors import NameTaken, NoSuchCluster

TNS = "urn:vmweb:test:1"
MAX_BODY = 64 * 1024


class _Gate:
    """Lets a test hold an operation open until another request releases it."""

    waiting: list[defer.Deferred] = []
    registered: defer.Deferred | None = None


class ToyService(Service):
    @rpc(Unicode, _returns=Unicode)
    def Echo(ctx, text):
        return text

    @rpc(Integer, Integer, _returns=Integer)
    def Add(ctx, a, b):
        return a + b

    @rpc(_returns=Unicode)
    def Slow(ctx):
        d = defer.Deferred()
        reactor.callLater(0, d.callback, "done later")
        return d

    @rpc(Unicode, _returns=Unicode)
    async def AsyncEcho(ctx, text):
        await defer.succeed(None)
        return text.upper()

    @rpc(_returns=Unicode)
    def Fail(ctx):
        raise NameTaken("vcluster", "web")

    @rpc(_returns=Unicode)
    def SlowFail(ctx):
        d = defer.Deferred()
        reactor.callLater(0, d.errback, NoSuchCluster("db"))
        return d

    @rpc(_returns=Unicode)
    def Crash(ctx):
        return {}["secret-internal-key"]

    @rpc(_returns=Unicode)
    def SlowCrash(ctx):
        d = defer.Deferred()
        reactor.callLater(0, d.errback, RuntimeError("secret-internal-state"))
        return d

    @rpc(_returns=Unicode)
    def Wait(ctx):
        d = defer.Deferred()
        _Gate.waiting.append(d)
        if _Gate.registered is not None:
            _Gate.registered.callback(None)
        return d

    @rpc(_returns=Integer)
    def Release(ctx):
        waiting, _Gate.waiting = _Gate.waiting, []
        for d in waiting:
            d.callback("released")
        return len(waiting)


@pytest.fixture
def server():
    """A Site with the toy service at /soap on 127.0.0.1, port chosen by the OS; yields its URL."""
    root = Resource()
    root.putChild(b"soap", build_soap_resource([ToyService], tns=TNS, name="Toy", max_body_bytes=MAX_BODY))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/soap"
    port.stopListening()


def _zeep(url: str) -> zeep.Client:
    return zeep.Client(url + "?wsdl", transport=zeep.Transport(timeout=10, operation_timeout=10))


def _call(url: str, operation: str, *args):
    """Blocking: one zeep call on a fresh client; returns the result or the zeep Fault raised."""
    client = _zeep(url)
    try:
        return getattr(client.service, operation)(*args)
    except zeep.exceptions.Fault as fault:
        return fault
    finally:
        client.transport.session.close()


def call(url: str, operation: str, *args) -> defer.Deferred:
    return threads.deferToThread(_call, url, operation, *args)


def _http(url: str, method: str, body=None, chunked: bool = False, query: str = ""):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
        if chunked:
            conn.request(method, parts.path + query, body=iter([body]), headers=headers, encode_chunked=True)
        else:
            conn.request(method, parts.path + query, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_request(url: str, method: str, body=None, **kwargs) -> defer.Deferred:
    return threads.deferToThread(_http, url, method, body, **kwargs)


def faultcode_of(body: bytes) -> tuple[str, str]:
    """(local faultcode, faultstring) of a SOAP fault response body."""
    fault = etree.fromstring(body).find(f"{{{SOAP11_ENV_NS}}}Body/{{{SOAP11_ENV_NS}}}Fault")
    assert fault is not None, body
    return local_faultcode(fault.findtext("faultcode")), fault.findtext("faultstring")


def envelope(inner: str, prolog: str = "") -> bytes:
    return (
        f'{prolog}<soapenv:Envelope xmlns:soapenv="{SOAP11_ENV_NS}" xmlns:t="{TNS}">'
        f"<soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"
    ).encode()


@defer.inlineCallbacks
def assert_still_serving(url):
    result = yield call(url, "Echo", "still here")
    assert result == "still here"


@pytest_twisted.inlineCallbacks
def test_compat_fixes_spynes_own_twisted_resource():
    """With compat.apply() (called twice), spyne's bare TwistedWebResource serves its WSDL and a call."""
    compat.apply()
    compat.apply()
    from spyne import Application
    from spyne.protocol.soap import Soap11
    from spyne.server.twisted import TwistedWebResource

    app = Application(
        [ToyService], tns=TNS, name="Raw", in_protocol=Soap11(validator="lxml"), out_protocol=Soap11()
    )
    root = Resource()
    root.putChild(b"raw", TwistedWebResource(app))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/raw"
        assert (yield call(url, "Echo", "raw")) == "raw"  # WSDL via spyne (fix 2), POST (fix 3)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_wsdl_names_tns_and_the_address_used(server):
    """GET ?wsdl returns the WSDL with the target namespace and the URL the client used."""
    status, body = yield http_request(server, "GET", query="?wsdl")
    assert status == 200
    wsdl = etree.fromstring(body)
    assert wsdl.get("targetNamespace") == TNS
    locations = wsdl.xpath(
        "//soap:address/@location", namespaces={"soap": "http://schemas.xmlsoap.org/wsdl/soap/"}
    )
    assert locations == [server]


@pytest_twisted.inlineCallbacks
def test_normal_calls(server):
    """Echo and Add answer through zeep with the right values."""
    assert (yield call(server, "Echo", "héllo <&>")) == "héllo <&>"
    assert (yield call(server, "Add", 2, 40)) == 42


@pytest_twisted.inlineCallbacks
def test_calls_run_no_full_garbage_collection(server, monkeypatch):
    """spyne would run gc.collect() after a request when the last was over a second ago (~35 ms
    with a large grid's replica in memory, on every second of peer traffic); ours never does."""
    import gc

    import spyne.context

    collected = []
    real = gc.collect
    monkeypatch.setattr(spyne.context, "_LAST_GC_RUN", 0.0)
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(a) or real(*a))
    assert (yield call(server, "Add", 1, 2)) == 3
    assert (yield call(server, "Echo", "again")) == "again"
    assert collected == []


@pytest_twisted.inlineCallbacks
def test_deferred_operation(server):
    """An operation returning a Deferred answers once the Deferred fires."""
    assert (yield call(server, "Slow")) == "done later"


@pytest_twisted.inlineCallbacks
def test_async_def_operation(server):
    """An ``async def`` operation is run as a Deferred and answers with its return value."""
    assert (yield call(server, "AsyncEcho", "quiet")) == "QUIET"


@pytest_twisted.inlineCallbacks
def test_reactor_serves_while_an_operation_waits(server):
    """A pending Deferred operation does not block the reactor: a second call releases it."""
    _Gate.registered = defer.Deferred()
    try:
        waiting = call(server, "Wait")
        yield _Gate.registered
        assert (yield call(server, "Release")) == 1
        assert (yield waiting) == "released"
    finally:
        _Gate.registered = None


@pytest_twisted.inlineCallbacks
def test_vmweb_error_becomes_its_fault(server):
    """A raised VmwebError reaches zeep as a fault with its faultcode and message."""
    fault = yield call(server, "Fail")
    assert isinstance(fault, zeep.exceptions.Fault)
    assert local_faultcode(fault.code) == "Client.NameTaken"
    assert fault.message == "vcluster name 'web' is already taken"


@pytest_twisted.inlineCallbacks
def test_deferred_vmweb_error_becomes_its_fault(server):
    """A Deferred failing with a VmwebError reaches zeep as a fault with its faultcode."""
    fault = yield call(server, "SlowFail")
    assert local_faultcode(fault.code) == "Client.NoSuchCluster"
    assert fault.message == "no virtual cluster named 'db'"
    yield assert_still_serving(server)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("operation", ["Crash", "SlowCrash"])
def test_unexpected_error_is_internal_and_logged(server, operation):
    """Other exceptions give Server.Internal without details; the traceback goes to the log."""
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        fault = yield call(server, operation)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert local_faultcode(fault.code) == "Server.Internal"
    assert "secret-internal" not in fault.message and "Traceback" not in fault.message
    incident = fault.message.split("incident ")[1].split(")")[0]
    logged = [e for e in events if "log_failure" in e and e.get("incident") == incident]
    assert len(logged) == 1
    assert "secret-internal" in logged[0]["log_failure"].getTraceback()
    yield assert_still_serving(server)


@pytest_twisted.inlineCallbacks
def test_wrong_type_is_client_fault_naming_the_field(server):
    """A string where an Integer is expected gives a Client fault that names the element."""
    status, body = yield http_request(server, "POST", envelope("<t:Add><t:a>abc</t:a><t:b>1</t:b></t:Add>"))
    code, message = faultcode_of(body)
    assert status == 500  # SOAP 1.1 section 6.2: faults travel with HTTP 500
    assert code.startswith("Client.")
    assert message == "Element 'a': 'abc' is not a valid value of the atomic type 'xs:integer'."
    yield assert_still_serving(server)


BILLION_LAUGHS = envelope(
    "<t:Echo><t:text>&lol9;</t:text></t:Echo>",
    prolog='<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    + "]>",
)


@pytest_twisted.inlineCallbacks
def test_billion_laughs_is_refused(server):
    """A billion-laughs body is refused with Client.MalformedRequest and the daemon keeps serving."""
    status, body = yield http_request(server, "POST", BILLION_LAUGHS)
    assert status == 500
    assert faultcode_of(body)[0] == "Client.MalformedRequest"
    assert b"lollol" not in body
    yield assert_still_serving(server)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_external_entity_is_refused(server, tmp_path, encoding):
    """An external entity naming a local file is refused and the file's content never comes back."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-7f3a9")
    xml = (
        envelope(
            "<t:Echo><t:text>&xxe;</t:text></t:Echo>",
            prolog=f'<?xml version="1.0" encoding="{encoding}"?>'
            f'<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file://{secret}">]>',
        )
        .decode()
        .encode(encoding)
    )
    status, body = yield http_request(server, "POST", xml)
    assert status == 500
    assert faultcode_of(body)[0] == "Client.MalformedRequest"
    assert b"TOP-SECRET" not in body
    yield assert_still_serving(server)


@pytest_twisted.inlineCallbacks
def test_external_dtd_is_refused(server):
    """A DOCTYPE pointing at an external DTD (with no internal subset) is refused too."""
    xml = envelope(
        "<t:Echo><t:text>x</t:text></t:Echo>", prolog='<!DOCTYPE foo SYSTEM "file:///etc/hostname">'
    )
    status, body = yield http_request(server, "POST", xml)
    assert faultcode_of(body)[0] == "Client.MalformedRequest"


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_is_refused(server, chunked):
    """A body over max_body_bytes gets Client.RequestTooLarge, with or without Content-Length."""
    xml = envelope(f"<t:Echo><t:text>{'x' * MAX_BODY}</t:text></t:Echo>")
    status, body = yield http_request(server, "POST", xml, chunked=chunked)
    assert status == 413
    code, message = faultcode_of(body)
    assert code == "Client.RequestTooLarge"
    assert str(MAX_BODY) in message
    yield assert_still_serving(server)


@pytest_twisted.inlineCallbacks
def test_oversized_call_through_zeep(server):
    """zeep reports an oversized call as a Client.RequestTooLarge fault; a large-but-allowed one works."""
    fault = yield call(server, "Echo", "y" * (MAX_BODY + 1))
    assert local_faultcode(fault.code) == "Client.RequestTooLarge"
    assert (yield call(server, "Echo", "z" * (MAX_BODY // 2))) == "z" * (MAX_BODY // 2)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("body", [b"\x00\xffgarbage{", b"", b"<unclosed>", b"<root>not soap</root>"])
def test_garbage_is_malformed_request(server, body):
    """Non-XML, empty, truncated or non-SOAP bodies get Client.MalformedRequest."""
    status, response = yield http_request(server, "POST", body)
    assert status == 500
    assert faultcode_of(response)[0] == "Client.MalformedRequest"
    yield assert_still_serving(server)


@pytest_twisted.inlineCallbacks
def test_get_without_wsdl_is_refused(server):
    """GET without ?wsdl is a 405 fault, not a crash."""
    status, body = yield http_request(server, "GET")
    assert status == 405
    assert faultcode_of(body)[0] == "Client.MalformedRequest"


def test_spynes_six_moves_import_through_our_finder_on_every_python():
    """spyne's bundled six answers only the import protocol Python 3.12 dropped: its ``moves``
    modules are found by our finder (on 3.11 too, so every version runs the same path), and they
    are what spyne expects."""
    import collections.abc
    import importlib.util
    import urllib.parse

    compat.prepare_imports()
    compat.prepare_imports()
    assert sum(isinstance(f, compat._SixMovesFinder) for f in sys.meta_path) == 1
    for name, real in (
        ("spyne.util.six.moves.collections_abc", collections.abc),
        ("spyne.util.six.moves.urllib.parse", None),
    ):
        spec = importlib.util.find_spec(name)
        assert spec is not None and isinstance(spec.loader, compat._SixMovesLoader), name
        module = importlib.import_module(name)
        if real is not None:
            assert module is real
    from spyne.util.six.moves.urllib.parse import urlsplit

    assert urlsplit is urllib.parse.urlsplit
    assert importlib.util.find_spec("spyne.util.six.moves.no_such_move") is None
