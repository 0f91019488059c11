"""The hardened SOAP 1.1 stack every vmweb SOAP endpoint is built with.

:func:`build_soap_resource` turns spyne services into a ``twisted.web`` resource that

* answers ``GET …?wsdl`` with the WSDL, its ``soap:address`` being the URL the client used;
* screens every ``POST`` before spyne sees it: bodies over ``max_body_bytes`` get
  ``Client.RequestTooLarge`` (HTTP 413); DOCTYPE / entity declarations (XXE, billion laughs),
  non-XML and XML that is not a SOAP 1.1 envelope get ``Client.MalformedRequest``.
  The screening parser never loads a DTD, never resolves an entity, never touches the network
  and keeps libxml2's size limits (``huge_tree=False``) — :mod:`vmwebd.xmlsafe`; spyne's own parser
  is set the same way;
* validates arguments against the schema (spyne's ``lxml`` validator): a wrong type is a
  ``Client.SchemaValidationError`` fault naming the element;
* answers faults with HTTP 500, as SOAP 1.1 (section 6.2) requires and spyne does, except 413
  for an oversized body and 405 for a method other than POST or GET ?wsdl (zeep reads the
  fault in every case);
* maps errors so that service authors just raise: a :class:`vmwebd.errors.VmwebError` (raised,
  or failing a returned Deferred) becomes a fault with its ``faultcode`` and ``message``; any
  other exception becomes ``Server.Internal`` with a generic message and an incident id, and the
  traceback goes to the log under that id, never to the caller;
* lets operations return a Deferred (or be ``async def``): the reactor is never blocked waiting;
* hands spyne the body it screened, as bytes, whatever size it has and wherever Twisted keeps it
  (in memory under 100,000 bytes, in a temporary file from there on or when chunked): spyne's
  own ``TwistedWebResource.handle_rpc`` maps a file-backed body with ``mmap``, which its SOAP
  parser cannot join (``TypeError: sequence item 0: expected str instance, mmap.mmap found``);
* writes each answer whole, with a Content-Length, the moment it is ready, instead of through
  spyne's pull producer, which finishes the request only on a later pull: a connection dropped
  in between (a peer timing out) made spyne log the request as an error and finish it with the
  producer still registered (Twisted: ``Producer was not unregistered``). An answer ready after
  its client left is dropped quietly; spyne's resource would raise on the dead request.

Every call through a site that has a ``soap_observer`` (see :class:`SoapObserver`) is reported
to it once, when answered: its operation, its faultcode (``none`` when it succeeded,
``disconnected`` when its client left before the answer) and how long it took from the moment
this resource saw it. Requests refused before any operation is known are reported as operation
``unknown``; the WSDL is not reported.

Fault codes on the wire are QNames in the SOAP envelope namespace, as SOAP 1.1 requires
(``soap11env:Client.NameTaken``); clients compare :func:`local_faultcode` of what they read.
"""

from __future__ import annotations

import collections
import html
import inspect
import re
import uuid
from typing import Protocol, Sequence

from lxml import etree
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vmwebd import xmlsafe
from vmwebd.api import compat
from vmwebd.errors import MalformedRequest, RequestTooLarge, VmwebError

compat.apply()

from spyne import Application, Service  # noqa: E402  (after compat.apply)
from spyne.auxproc import process_contexts  # noqa: E402
from spyne.const.http import HTTP_200  # noqa: E402
from spyne.model import ComplexModelBase, PushBase  # noqa: E402
from spyne.model.fault import Fault  # noqa: E402
from spyne.protocol.soap import Soap11  # noqa: E402
from spyne.protocol.xml import SchemaValidationError  # noqa: E402
from spyne.server.twisted.http import TwistedHttpMethodContext, TwistedHttpTransport  # noqa: E402

__all__ = [
    "SOAP11_ENV_NS",
    "build_soap_resource",
    "fault_from_exception",
    "local_faultcode",
    "screen_soap_body",
    "answer_direct",
    "call_element",
]

SOAP11_ENV_NS = "http://schemas.xmlsoap.org/soap/envelope/"
_ENV_PREFIX = "soap11env"  # the prefix spyne uses, so all our faults look alike
_ENVELOPE_TAG = f"{{{SOAP11_ENV_NS}}}Envelope"

# Placeholder the WSDL is built with once; each GET ?wsdl substitutes the URL the client used, so
# a grid host reached as 10.0.0.7:8470 never advertises the name the first caller happened to use.
_ADDRESS_PLACEHOLDER = "http://vmweb-soap-address.invalid/soap"
_HOST_RE = re.compile(rb"^(?P<host>[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::(?P<port>\d{1,5}))?$")

_NS_URI_RE = re.compile(r"\{[^}]*\}")

log = Logger()


def local_faultcode(code: str) -> str:
    """The faultcode without its namespace prefix: ``soap11env:Client.NameTaken`` → ``Client.NameTaken``."""
    return code.rpartition(":")[2]


def fault_from_exception(exc: BaseException, operation: str = "?", failure: Failure | None = None) -> Fault:
    """The spyne Fault to send for ``exc`` raised by ``operation``.

    spyne Faults pass unchanged, VmwebErrors keep their faultcode and message; anything else is a
    bug of ours: it is logged with its traceback under a fresh incident id, and the caller only
    gets ``Server.Internal`` with that id.
    """
    if isinstance(exc, Fault):
        return exc
    if isinstance(exc, VmwebError):
        if exc.faultcode.startswith("Server"):
            log.warn(
                "SOAP {operation} failed: {faultcode}: {message}",
                operation=operation,
                faultcode=exc.faultcode,
                message=exc.message,
            )
        else:
            log.info(
                "SOAP {operation} refused: {faultcode}: {message}",
                operation=operation,
                faultcode=exc.faultcode,
                message=exc.message,
            )
        return Fault(exc.faultcode, exc.message)
    incident = uuid.uuid4().hex[:12]
    log.failure(
        "SOAP {operation} crashed (incident {incident})",
        failure=failure if failure is not None else Failure(exc),
        operation=operation,
        incident=incident,
    )
    return Fault(
        "Server.Internal", f"internal error in {operation} (incident {incident}); see the daemon log"
    )


def _operation_name(ctx) -> str:
    descriptor = getattr(ctx, "descriptor", None)
    return getattr(descriptor, "name", None) or str(ctx.method_request_string)


class SoapObserver(Protocol):
    """What a site's ``soap_observer`` provides (:class:`vmwebd.metrics.NodeMetrics` does)."""

    def clock(self) -> float:
        """Seconds on a monotonic clock."""

    def soap_call(self, operation: str, fault: str, seconds: float) -> None:
        """One call answered: ``fault`` is ``none``, a local faultcode or ``disconnected``."""


class _Observation:
    """One call's report to the site's observer, made once, when the call is answered."""

    __slots__ = ("_observer", "_start")

    def __init__(self, request: Request):
        self._observer = getattr(getattr(request, "site", None), "soap_observer", None)
        self._start = self._observer.clock() if self._observer is not None else 0.0

    @property
    def wanted(self) -> bool:
        return self._observer is not None

    def done(self, operation: str, fault: str = "none") -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.soap_call(operation, local_faultcode(fault), observer.clock() - self._start)


def _known_operation(ctx) -> str:
    """The operation a call reached, as a metric label: only names the service defines (a
    request naming no defined operation is ``unknown``: labels never carry what callers wrote)."""
    return getattr(getattr(ctx, "descriptor", None), "name", None) or "unknown"


def _faultcode_of(error) -> str:
    return str(getattr(error, "faultcode", None) or "Server")


class _VmwebApplication(Application):
    """A spyne Application whose ``call_wrapper`` maps exceptions, sync or via a Deferred, to faults."""

    def call_wrapper(self, ctx):
        operation = _operation_name(ctx)
        try:
            result = super().call_wrapper(ctx)
        except Exception as exc:
            raise fault_from_exception(exc, operation, Failure()) from None
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
        if isinstance(result, Deferred):
            result.addErrback(lambda f: Failure(fault_from_exception(f.value, operation, f)))
        return result


class _SafeSoap11(Soap11):
    """Soap11 with the safe parser settings pinned and readable schema validation messages."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, **xmlsafe.PARSER_OPTIONS})

    def validate_body(self, ctx, message):
        try:
            super().validate_body(ctx, message)
        except SchemaValidationError:
            # spyne's text is bytes (a Python 2 leftover) prefixed with libxml2 codes; keep
            # libxml2's sentence, which names the element, without namespace URIs.
            last = self.validation_schema.error_log.last_error
            text = _NS_URI_RE.sub("", last.message) if last is not None else "invalid request"
            raise SchemaValidationError(text) from None


def _fault_body(faultcode: str, message: str) -> bytes:
    envelope = etree.Element(_ENVELOPE_TAG, nsmap={_ENV_PREFIX: SOAP11_ENV_NS})
    body = etree.SubElement(envelope, f"{{{SOAP11_ENV_NS}}}Body")
    fault = etree.SubElement(body, f"{{{SOAP11_ENV_NS}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"{_ENV_PREFIX}:{faultcode}"
    etree.SubElement(fault, "faultstring").text = message
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def screen_soap_body(body: bytes, max_bytes: int | None = None) -> etree._Element:
    """Raise :class:`MalformedRequest` unless ``body`` is a plain XML SOAP 1.1 envelope.

    Plain means: no DOCTYPE and no entity declaration, anywhere, in any encoding, and at most
    ``max_bytes`` (default: no limit here; the resource checks the size first). Nothing is
    resolved or fetched while checking (:func:`vmwebd.xmlsafe.parse`).
    """
    if not body.strip():
        raise MalformedRequest("empty request body; expected a SOAP 1.1 envelope")
    try:
        root = xmlsafe.parse(body, "request body", len(body) if max_bytes is None else max_bytes)
    except xmlsafe.UnsafeXml as exc:
        raise MalformedRequest(str(exc)) from None
    if root.tag != _ENVELOPE_TAG:
        raise MalformedRequest(f"root element {str(root.tag)[:100]!r} is not a SOAP 1.1 Envelope")
    return root


class DirectCall(Protocol):
    """An operation served without spyne's machinery (see ``build_soap_resource``'s ``direct``):
    given the request and its screened envelope, the serialized answer (bytes, or NOT_DONE_YET
    once :func:`answer_direct` was handed the result), or None when the call is not of the one
    shape it knows (spyne then serves it as any other)."""

    def __call__(self, request: Request, root: etree._Element, obs: _Observation) -> bytes | int | None: ...


def call_element(root: etree._Element, tns: str, operation: str) -> etree._Element | None:
    """The ``{tns}operation`` element of a SOAP envelope holding that call and nothing else (no
    header, one element in the body), or None."""
    children = [c for c in root if isinstance(c.tag, str)]
    if len(children) != 1 or children[0].tag != f"{{{SOAP11_ENV_NS}}}Body":
        return None
    calls = [c for c in children[0] if isinstance(c.tag, str)]
    if len(calls) != 1 or calls[0].tag != f"{{{tns}}}{operation}":
        return None
    return calls[0]


def answer_direct(request: Request, result: Deferred, tns: str, operation: str, obs: _Observation) -> int:
    """Writes the answer of a direct call once ``result`` (a Deferred firing with the string the
    operation returns) fires: ``{tns}operationResponse/{tns}operationResult`` as spyne shapes a
    string result, or the fault of the error, as spyne would send it. Returns NOT_DONE_YET."""
    gone: list = []
    request.notifyFinish().addErrback(gone.append)

    def ok(text: str) -> None:
        if gone:
            obs.done(operation, "disconnected")
            return
        envelope = etree.Element(_ENVELOPE_TAG, nsmap={_ENV_PREFIX: SOAP11_ENV_NS, "tns": tns})
        body = etree.SubElement(envelope, f"{{{SOAP11_ENV_NS}}}Body")
        resp = etree.SubElement(body, f"{{{tns}}}{operation}Response")
        etree.SubElement(resp, f"{{{tns}}}{operation}Result").text = text
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        obs.done(operation)
        _SoapResource._send(request, etree.tostring(envelope, xml_declaration=True, encoding="UTF-8"))

    def failed(f: Failure) -> None:
        fault = fault_from_exception(f.value, operation, f)
        if gone:
            obs.done(operation, "disconnected")
            return
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        obs.done(operation, _faultcode_of(fault))
        _SoapResource._send(request, _fault_body(str(fault.faultcode), str(fault.faultstring)))

    result.addCallbacks(ok, failed)
    return NOT_DONE_YET


class _SoapResource(Resource):
    """Screens requests, serves the WSDL, and runs good SOAP calls through spyne's transport."""

    isLeaf = True

    def __init__(
        self,
        transport: TwistedHttpTransport,
        max_body_bytes: int,
        cache=None,
        direct: DirectCall | None = None,
    ):
        super().__init__()
        self._transport = transport
        self.max_body_bytes = max_body_bytes
        self._cache = cache
        self._direct = direct
        wsdl11 = transport.doc.wsdl11
        wsdl11.build_interface_document(_ADDRESS_PLACEHOLDER)
        self._wsdl = wsdl11.get_interface_document()
        self._placeholder = html.escape(_ADDRESS_PLACEHOLDER, quote=True).encode("ascii")

    def render(self, request: Request):
        if request.method in (b"GET", b"HEAD") and _wants_wsdl(request):
            return self._render_wsdl(request)
        obs = _Observation(request)
        if request.method != b"POST":
            request.setHeader(b"Allow", b"GET, HEAD, POST")
            return self._refuse(
                request,
                405,
                MalformedRequest("SOAP calls are POSTed; GET only serves the WSDL at ?wsdl"),
                obs,
            )
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._refuse(request, 413, self._too_large(int(declared)), obs)
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        if size > self.max_body_bytes:  # chunked bodies have no Content-Length
            return self._refuse(request, 413, self._too_large(size), obs)
        content.seek(0)
        body = content.read()
        try:
            root = screen_soap_body(body, self.max_body_bytes)
        except MalformedRequest as exc:
            return self._refuse(request, 500, exc, obs)
        if self._direct is not None:
            direct = self._direct(request, root, obs)
            if direct is not None:
                return direct
        key = self._cache.key(request, body) if self._cache is not None else None
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                request.setHeader(b"Content-Type", hit[0])
                # Only operations the cache was told of are cached: the name is a defined one.
                if obs.wanted:
                    obs.done(soap_operation(body) or "unknown")
                return hit[1]
        answer = self._call(request, body, obs)
        if key is not None and isinstance(answer, bytes) and request.code == 200:
            self._cache.put(
                key, request.responseHeaders.getRawHeaders(b"content-type", [b"text/xml"])[0], answer
            )
        return answer

    # -- the call, through spyne's transport (what TwistedWebResource.handle_rpc does, minus the
    # -- mmap'ed body and the pull producer; see the module docstring) --------------------------

    def _call(self, request: Request, body: bytes, obs: _Observation):
        transport = self._transport
        ctx = TwistedHttpMethodContext(transport, request, transport.app.out_protocol.mime_type)
        ctx.in_string = [body]
        p_ctx, *others = transport.generate_contexts(ctx)
        p_ctx.active = True
        if p_ctx.in_error:
            return self._fault(request, p_ctx, others, p_ctx.in_error, obs)
        transport.get_in_object(p_ctx)
        if p_ctx.in_error:
            return self._fault(request, p_ctx, others, p_ctx.in_error, obs)
        transport.get_out_object(p_ctx)
        if p_ctx.out_error:
            return self._fault(request, p_ctx, others, p_ctx.out_error, obs)
        out = p_ctx.out_object
        pending = out[0] if isinstance(out, (list, tuple)) and out else out
        if not isinstance(pending, Deferred):
            return self._answer(request, p_ctx, others, obs)
        # Until the operation answers, a dropped connection is only worth remembering: the
        # answer will have nobody to go to.
        gone = []
        request.notifyFinish().addErrback(gone.append)
        pending.addCallbacks(
            self._answer_later,
            self._fault_later,
            callbackArgs=(request, p_ctx, others, gone, obs),
            errbackArgs=(request, p_ctx, others, gone, obs),
        )
        return NOT_DONE_YET

    def _answer(self, request: Request, p_ctx, others, obs: _Observation) -> bytes:
        """The serialized answer held in ``p_ctx.out_object``; a fault if it cannot be sent."""
        try:
            out = p_ctx.out_object
            if out and isinstance(out[0], PushBase):
                raise TypeError("streamed (PushBase) answers are not supported by this endpoint")
            resp_code = p_ctx.transport.resp_code or HTTP_200
            self._transport.get_out_string(p_ctx)
            answer = b"".join(p_ctx.out_string)
        except Exception as exc:
            return self._fault(
                request, p_ctx, others, fault_from_exception(exc, _operation_name(p_ctx), Failure()), obs
            )
        request.setResponseCode(int(resp_code[:3]))
        _set_headers(request, p_ctx.transport.resp_headers)
        obs.done(_known_operation(p_ctx))
        p_ctx.close()
        process_contexts(self._transport, others, p_ctx)
        return answer

    def _fault(self, request: Request, p_ctx, others, error, obs: _Observation) -> bytes:
        """The serialized fault ``error``, with spyne's HTTP status for it (500, or 413/405/…)."""
        resp_code = p_ctx.transport.resp_code or p_ctx.out_protocol.fault_to_http_response_code(error)
        request.setResponseCode(int(resp_code[:3]))
        _set_headers(request, p_ctx.transport.resp_headers)
        # Whatever the operation began to produce is replaced by the fault.
        p_ctx.out_error = error
        p_ctx.out_document = None
        p_ctx.out_string = None
        p_ctx.out_object = error
        self._transport.get_out_string(p_ctx)
        answer = b"".join(p_ctx.out_string)
        obs.done(_known_operation(p_ctx), _faultcode_of(error))
        p_ctx.close()
        process_contexts(self._transport, others, p_ctx, error=error)
        return answer

    def _answer_later(self, result, request: Request, p_ctx, others, gone: list, obs: _Observation) -> None:
        if gone:
            return self._drop(request, p_ctx, obs)
        # Shape the result as spyne's Application.process_request does for direct returns.
        descriptor = p_ctx.descriptor
        out_message = descriptor.out_message
        if (
            descriptor.is_out_bare()
            or not issubclass(out_message, ComplexModelBase)
            or len(out_message._type_info) <= 1
        ):
            p_ctx.out_object = [result]
        else:
            p_ctx.out_object = result
        self._send(request, self._answer(request, p_ctx, others, obs))

    def _fault_later(
        self, failure: Failure, request: Request, p_ctx, others, gone: list, obs: _Observation
    ) -> None:
        if gone:
            return self._drop(request, p_ctx, obs)
        error = (
            failure.value
            if failure.check(Fault)
            else fault_from_exception(failure.value, _operation_name(p_ctx), failure)
        )
        self._send(request, self._fault(request, p_ctx, others, error, obs))

    @staticmethod
    def _send(request: Request, answer: bytes) -> None:
        request.setHeader(b"Content-Length", b"%d" % len(answer))
        request.write(answer)
        request.finish()

    @staticmethod
    def _drop(request: Request, p_ctx, obs: _Observation) -> None:
        log.debug(
            "SOAP {operation} answered after its client {peer} went away; answer dropped",
            operation=_operation_name(p_ctx),
            peer=_peer(request),
        )
        obs.done(_known_operation(p_ctx), "disconnected")
        p_ctx.close()

    def _too_large(self, size: int) -> RequestTooLarge:
        return RequestTooLarge(
            f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes"
        )

    def _refuse(self, request: Request, code: int, exc: VmwebError, obs: _Observation) -> bytes:
        log.info(
            "SOAP request from {peer} refused: {faultcode}: {message}",
            peer=_peer(request),
            faultcode=exc.faultcode,
            message=exc.message,
        )
        obs.done("unknown", exc.faultcode)
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        return _fault_body(exc.faultcode, exc.message)

    def _render_wsdl(self, request: Request) -> bytes:
        url = html.escape(_request_url(request), quote=True).encode("ascii", "xmlcharrefreplace")
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        return self._wsdl.replace(self._placeholder, url)


def _set_headers(request: Request, headers: dict) -> None:
    for name, value in headers.items():
        request.responseHeaders.setRawHeaders(name, value if isinstance(value, (list, tuple)) else [value])


def _wants_wsdl(request: Request) -> bool:
    # request.args drops a bare "?wsdl" (no "="), so read the query string itself.
    query = request.uri.partition(b"?")[2]
    return any(item.partition(b"=")[0].lower() == b"wsdl" for item in re.split(rb"[&;]", query))


def _peer(request: Request) -> str:
    peer = request.getClientAddress()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


def _request_url(request: Request) -> str:
    """The endpoint URL as the client addressed it (Host header if sane, else the local address)."""
    scheme = "https" if request.isSecure() else "http"
    default_port = 443 if request.isSecure() else 80
    local = request.getHost()
    host, port = getattr(local, "host", "localhost"), getattr(local, "port", default_port)
    if ":" in host:
        host = f"[{host}]"
    match = _HOST_RE.match(request.getHeader(b"host") or b"")
    if match:
        host = match.group("host").decode("ascii")
        port = int(match.group("port")) if match.group("port") else default_port
    netloc = host if port == default_port else f"{host}:{port}"
    path = "/" + "/".join(seg.decode("utf-8", "replace") for seg in request.prepath)
    return f"{scheme}://{netloc}{path}"


class ResponseCache:
    """Answers of read-only operations kept by what they depend on, so a read repeated while
    nothing it reads has changed costs no serialisation (spyne takes ~1.5 s to write 10,000 VMs).

    ``key_of(request, body)`` says whether a call may be answered from the cache and under which
    key (None: not cacheable); the key must name everything the answer depends on — the caller,
    the arguments, and a version of the data read. At most ``max_bytes`` of answers are kept,
    the least recently used going first."""

    def __init__(self, key_of, max_bytes: int = 64 << 20):
        self.key = key_of
        self.max_bytes = max_bytes
        self._entries: "collections.OrderedDict[object, tuple[bytes, bytes]]" = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key) -> tuple[bytes, bytes] | None:
        hit = self._entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return hit

    def put(self, key, content_type: bytes, answer: bytes) -> None:
        if len(answer) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._entries[key] = (content_type, answer)
        self._bytes += len(answer)
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= len(dropped)


def soap_operation(body: bytes) -> str | None:
    """The local name of the operation a (screened) SOAP 1.1 request calls, if there is one."""
    root = etree.fromstring(body, xmlsafe.parser())
    for child in root:
        if child.tag == f"{{{SOAP11_ENV_NS}}}Body":
            for op in child:
                if isinstance(op.tag, str):
                    return etree.QName(op).localname
    return None


def build_soap_resource(
    services: Sequence[type[Service]],
    tns: str,
    name: str,
    max_body_bytes: int = 1 << 20,
    cache: ResponseCache | None = None,
    direct: DirectCall | None = None,
) -> Resource:
    """A twisted.web resource serving ``services`` as SOAP 1.1 (POST) with the WSDL at ``?wsdl``.

    Mount it where the endpoint lives (``root.putChild(b"soap", resource)``); it is a leaf.
    ``tns`` is the target namespace, ``name`` the WSDL service name. See the module docstring
    for what is refused and how errors become faults. ``direct`` serves calls of one known
    shape without spyne (after the same size limit and screening; see :class:`DirectCall`).
    """
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    app = _VmwebApplication(
        list(services),
        tns=tns,
        name=name,
        in_protocol=_SafeSoap11(validator="lxml"),
        out_protocol=Soap11(),
    )
    return _SoapResource(
        TwistedHttpTransport(app, max_content_length=max_body_bytes), max_body_bytes, cache, direct
    )
