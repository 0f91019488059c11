"""The console's WebSockets (Twisted's own, ``twisted.web.websocket``): for users, between hosts.

One protocol on both hops. The server sends the console's output as binary messages and events
as text messages, JSON ``{"event": "ready" | "error" | "end", "message": "..."}``: ``ready`` once
the viewer is attached (the ring's backlog, if any, came just before it), ``error`` when it
cannot be (the message names the VM and why; the connection then closes), ``end`` when the
console closes under it. The client sends keystrokes as binary (or text, taken as UTF-8)
messages of at most ``MAX_INPUT_MESSAGE`` bytes; a larger one is refused (``error``, close code
1009) — a paste goes in pieces, and the hub's bounded queue pushes back on the sender's socket.

- ``GET /console/CLUSTER/VM`` on the user API: a session cookie (the pages) or HTTP Basic (the
  command line); a browser's ``Origin`` must be this very host (no other site may open a console
  with the user's cookie). Then :meth:`ConsoleService.attach` decides (owner or admin, running).
- ``GET /console/CLUSTER/VM`` on the peer endpoint: grid hosts only (the client certificate of
  the mutual TLS), for the VM running on that host; the user's rights were checked by the host
  the user is logged into, as for every operation a host forwards.
- :class:`Relay`: the user's host dials the VM's host at that peer endpoint, presenting its grid
  certificate and requiring the other's to name the VM's host, on the peers' port: no new one.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from wsproto.utilities import LocalProtocolError
from zope.interface import implementer

from vmwebd.console.hub import MAX_INPUT_MESSAGE
from vmwebd.errors import ConsoleUnavailable, VmwebError
from vmwebd.wiring import PeerDirectory

log = Logger()

#: How long the relay waits for the VM's host to connect and answer.
RELAY_TIMEOUT_SECONDS = 10.0
#: Close codes (RFC 6455): normal, policy (refused), message too big.
CLOSE_NORMAL, CLOSE_REFUSED, CLOSE_TOO_BIG = 1000, 1008, 1009
#: The longest event message taken from a peer.
MAX_EVENT_CHARS = 2048
#: A viewer's connection is pinged this often; one that answered no ping for twice as long is
#: taken for half-open (its client vanished without closing) and dropped.
PING_SECONDS = 30.0


def event(kind: str, message: str = "", code: str = "") -> str:
    doc = {"event": kind, "message": message}
    if code:
        doc["code"] = code
    return json.dumps(doc)


def parse_event(text: str) -> tuple[str, str, str]:
    """``(kind, message, code)`` of an event; an ``error`` saying so for anything malformed."""
    try:
        doc = json.loads(text[:MAX_EVENT_CHARS])
        kind, message, code = doc["event"], doc.get("message", ""), doc.get("code", "")
        if kind in ("ready", "error", "end") and isinstance(message, str) and isinstance(code, str):
            return kind, message, code
    except (ValueError, TypeError, KeyError):
        pass
    return "error", "a malformed event from the VM's host", "Server.ConsoleUnavailable"


class ViewerProtocol:
    """The server end of a console WebSocket (a ``twisted.web.websocket.WebSocketProtocol``) and
    a viewer of the hub (``output``, ``ended``, ``pause_input``, ``resume_input``).

    ``attach(viewer)`` is what it asks once the WebSocket is up (a Deferred of an Attachment);
    ``clock`` paces the pings that find a half-open connection (see ``PING_SECONDS``)."""

    def __init__(self, attach, live: set, clock=None):
        self._attach, self._live, self.clock = attach, live, clock
        self.transport = None
        self.att = None
        self.gone = False
        self.finished = False
        self._pinger = None
        self._last_pong = 0.0

    # -- WebSocketProtocol -------------------------------------------------------------------
    def negotiationStarted(self, transport) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        self._live.add(self)
        if self.clock is not None:
            from twisted.internet import task

            self._last_pong = self.clock.seconds()
            self._pinger = task.LoopingCall(self._ping)
            self._pinger.clock = self.clock
            self._pinger.start(PING_SECONDS, now=False)
        defer.maybeDeferred(self._attach, self).addCallbacks(self._attached, self._refused)

    def pongReceived(self, payload: bytes) -> None:
        self._last_pong = self.clock.seconds() if self.clock is not None else 0.0

    def _ping(self) -> None:
        if self.gone:
            return
        if self.clock.seconds() - self._last_pong > 2 * PING_SECONDS:
            log.info(
                "console: a viewer answered no ping for {s:.0f} s; dropping its connection",
                s=self.clock.seconds() - self._last_pong,
            )
            self._stop_pinging()
            sock = getattr(self.transport, "transport", None)
            if sock is not None:
                sock.abortConnection()
            return
        try:
            self.transport.ping(b"vmweb")
        except LocalProtocolError:  # closing already
            self._stop_pinging()

    def _stop_pinging(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()

    def bytesMessageReceived(self, data) -> None:
        self._input(bytes(data))

    def textMessageReceived(self, message: str) -> None:
        self._input(message.encode("utf-8", "replace"))

    def connectionLost(self, reason) -> None:
        self.gone = True
        self._stop_pinging()
        self._live.discard(self)
        att, self.att = self.att, None
        if att is not None:
            att.detach()

    # -- the hub's viewer --------------------------------------------------------------------
    def output(self, data: bytes) -> None:
        if not self.gone and not self.finished:
            try:
                self.transport.sendBytesMessage(data)
            except LocalProtocolError:  # the client's close frame came first
                self.finished = True

    def ended(self, why: str) -> None:
        self.att = None
        self._finish("end", why, CLOSE_NORMAL)

    def pause_input(self) -> None:
        self._socket("pauseProducing")

    def resume_input(self) -> None:
        self._socket("resumeProducing")

    # -- inside ------------------------------------------------------------------------------
    def _socket(self, what: str) -> None:
        """Stops or starts reading this WebSocket's connection (TCP pushes back on the client)."""
        sock = getattr(self.transport, "transport", None)
        if sock is not None and not self.gone:
            getattr(sock, what)()

    def _attached(self, att) -> None:
        if self.gone or self.finished:
            att.detach()
            return
        self.att = att
        try:
            self.transport.sendTextMessage(event("ready"))
        except LocalProtocolError:
            self.finished = True

    def _refused(self, f) -> None:
        if isinstance(f.value, VmwebError):
            message, fault = f.value.message, f.value.faultcode
        else:
            log.failure("console: attaching a viewer failed", failure=f)
            message = "the console could not be opened (an internal error; the host's log says more)"
            fault = "Server.Internal"
        self._finish("error", message, CLOSE_REFUSED, fault)

    def _finish(self, kind: str, message: str, code: int, fault: str = "") -> None:
        if self.gone or self.finished:
            return
        self.finished = True
        try:
            self.transport.sendTextMessage(event(kind, message, fault))
            self.transport.loseConnection(code)
        except LocalProtocolError:  # the client's close frame came first: it is closing
            sock = getattr(self.transport, "transport", None)
            if sock is not None:
                sock.loseConnection()

    def _input(self, data: bytes) -> None:
        if self.finished:
            return
        if len(data) > MAX_INPUT_MESSAGE:
            att, self.att = self.att, None
            if att is not None:
                att.detach()
            self._finish(
                "error",
                f"a message of {len(data)} bytes is over the limit of "
                f"{MAX_INPUT_MESSAGE} bytes (send a paste in pieces)",
                CLOSE_TOO_BIG,
                "Client.InvalidArgument",
            )
            return
        if self.att is not None:
            self.att.write(data)
        # Before "ready" nothing is attached yet: a client waits for it before typing.


class _Factory:
    """A ``WebSocketServerFactory`` building :class:`ViewerProtocol` s."""

    def __init__(self, attach, live: set, clock):
        self.attach, self.live, self.clock = attach, live, clock

    def buildProtocol(self, request):
        return ViewerProtocol(self.attach, self.live, self.clock)


def _upgrade(request, attach, live: set, clock):
    """Answers ``request`` by turning it into a console WebSocket (400 if it is not one)."""
    from twisted.web.websocket import WebSocketResource

    return WebSocketResource(_Factory(attach, live, clock)).render_GET(request)


def _plain(request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return (text + "\n").encode()


def _vm_path(request) -> tuple[str, str] | None:
    parts = request.postpath
    if len(parts) != 2 or not all(parts):
        return None
    try:
        return parts[0].decode("utf-8"), parts[1].decode("utf-8")
    except UnicodeDecodeError:
        return None


class UserConsoleResource(Resource):
    """``/console/CLUSTER/VM`` on the user API (see the module)."""

    isLeaf = True

    def __init__(self, service, session_user, authn):
        super().__init__()
        self.service, self.session_user, self.authn = service, session_user, authn
        self.live: set = set()
        service.resources.append(self)

    def render_GET(self, request):
        from vmwebd.auth import client_address, parse_basic

        request.setHeader(b"Cache-Control", b"no-store")
        where = _vm_path(request)
        if where is None:
            return _plain(request, 404, "no such console: give /console/CLUSTER/VM")
        origin = request.getHeader(b"origin")
        if origin is not None:
            scheme = b"https" if request.isSecure() else b"http"
            if origin != scheme + b"://" + (request.getHeader(b"host") or b""):
                return _plain(request, 403, "a console cannot be opened from another site")
        principal = self.session_user(request)
        if principal is not None:
            return self._open(request, principal, where)
        creds = parse_basic(request.getHeader(b"authorization"))
        if creds is None:
            request.setHeader(b"WWW-Authenticate", b'Basic realm="vmweb", charset="UTF-8"')
            return _plain(request, 401, "log in first (a session, or a user name and password)")
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def go(principal):
            if finished:
                return
            out = self._open(request, principal, where)
            if out is not NOT_DONE_YET:
                request.write(out)
                request.finish()

        def refuse(f):
            if finished:
                return
            request.setHeader(b"WWW-Authenticate", b'Basic realm="vmweb", charset="UTF-8"')
            message = getattr(f.value, "message", "authentication failed")
            request.write(_plain(request, 401, message))
            request.finish()

        self.authn.authenticate(creds[0], creds[1], client_address(request)).addCallbacks(go, refuse)
        return NOT_DONE_YET

    def _open(self, request, principal, where):
        cluster, vm = where
        log.info("console: {user} opens {cluster}/{vm}", user=principal.name, cluster=cluster, vm=vm)
        return _upgrade(
            request,
            lambda viewer: self.service.attach(principal, cluster, vm, viewer),
            self.live,
            self.service.reactor,
        )


class PeerConsoleResource(Resource):
    """``/console/CLUSTER/VM`` on the peer endpoint: grid hosts only, VMs on this host only."""

    isLeaf = True

    def __init__(self, service, identity_of):
        super().__init__()
        self.service, self.identity_of = service, identity_of
        self.live: set = set()
        service.resources.append(self)

    def render_GET(self, request):
        request.setHeader(b"Cache-Control", b"no-store")
        if self.identity_of(request) is None:
            return _plain(request, 403, "a grid host's certificate is needed")
        where = _vm_path(request)
        if where is None:
            return _plain(request, 404, "no such console: give /console/CLUSTER/VM")
        vm_id = "/".join(where)
        return _upgrade(
            request, lambda viewer: self.service.attach_local(vm_id, viewer), self.live, self.service.reactor
        )


@implementer(IPushProducer)
class _Pusher:
    """Registered on the relay's connection to the VM's host: when that connection's send
    buffer fills, the user's socket stops being read (back-pressure across both hops)."""

    def __init__(self, viewer):
        self.viewer = viewer

    def pauseProducing(self):
        self.viewer.pause_input()

    def resumeProducing(self):
        self.viewer.resume_input()

    def stopProducing(self):
        pass


class _RelayClient:
    """The client end of a relayed console: the VM host's output and events go to ``viewer``."""

    def __init__(self, relay: "Relay", viewer, vm_id: str, host: str):
        self.relay, self.viewer, self.vm_id, self.host = relay, viewer, vm_id, host
        self.transport = None
        self.ready = defer.Deferred()  # fires at "ready", fails at "error"
        self.ended = False

    def negotiationStarted(self, transport) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        self.relay.live.add(self)
        self.transport.attachProducer(_Pusher(self.viewer))
        self._producing = True

    def pongReceived(self, payload: bytes) -> None:
        pass

    def bytesMessageReceived(self, data) -> None:
        if not self.ended:
            self.viewer.output(bytes(data))

    def textMessageReceived(self, message: str) -> None:
        kind, text, code = parse_event(message)
        if kind == "ready":
            if not self.ready.called:
                self.ready.callback(self)
            return
        self._end(text, code)

    def connectionLost(self, reason) -> None:
        self.relay.live.discard(self)
        self._end(f"the console of VM {self.vm_id} closed: the connection to its host {self.host} was lost")

    def _end(self, message: str, code: str = "") -> None:
        if self.ended:
            return
        self.ended = True
        if not self.ready.called:
            err = ConsoleUnavailable(self.vm_id, _why(message, self.vm_id))
            err.faultcode = code or err.faultcode
            self.ready.errback(err)
        else:
            self.viewer.ended(message)
        self._close()

    def _close(self) -> None:
        """Closes the connection to the VM's host; the producer goes first, since a TLS
        connection with a producer registered waits for it before it shuts down."""
        if self.transport is None:
            return
        if getattr(self, "_producing", False):
            self._producing = False
            try:
                self.transport.detachProducer()
            except Exception:  # the connection is gone already: nothing holds it open
                pass
        try:
            self.transport.loseConnection()
        except LocalProtocolError:
            sock = getattr(self.transport, "transport", None)
            if sock is not None:
                sock.loseConnection()

    # -- the viewer's attachment -------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.ended and self.transport is not None:
            try:
                self.transport.sendBytesMessage(data)
            except LocalProtocolError:
                self._end(
                    f"the console of VM {self.vm_id} closed: its host {self.host} closed the connection"
                )

    def detach(self) -> None:
        self.ended = True
        self._close()


def _why(message: str, vm_id: str) -> str:
    """The reason in a peer's "the console of VM X is not available: WHY" (or the whole text)."""
    head = f"the console of VM {vm_id} is not available: "
    return message[len(head) :] if message.startswith(head) else message


class Relay:
    """Dials the VM's host's peer endpoint for a viewer here (see the module), as host
    ``host_id`` with its grid credentials ``host_creds``; ``peer_address_of``: where a host's peer
    endpoint is."""

    def __init__(self, host_id: str, reactor, peer_address_of: PeerDirectory, host_creds):
        self.host_id, self.reactor = host_id, reactor
        self.peer_address_of, self.host_creds = peer_address_of, host_creds
        self.live: set = set()
        self._policies: dict[str, object] = {}

    @defer.inlineCallbacks
    def attach(self, host: str, vm_id: str, viewer, user: str):
        from twisted.web.websocket import WebSocketClientEndpoint

        from vmwebd.gossip import tls

        addr = self.peer_address_of(host)
        if not addr or self.host_creds is None:
            raise ConsoleUnavailable(vm_id, f"host {self.host_id} does not know where its host {host} is")
        if host not in self._policies:
            # The answering host must hold the certificate of the VM's host.
            self._policies[host] = tls.client_policy(self.host_creds, host)
        cluster, _, vm = vm_id.partition("/")
        url = (
            f"https://{addr}/console/{quote(cluster, safe='')}/{quote(vm, safe='')}"
            f"?user={quote(user, safe='')}"
        )
        endpoint = WebSocketClientEndpoint.new(
            self.reactor, url, tlsPolicy=self._policies[host], connectTimeout=int(RELAY_TIMEOUT_SECONDS)
        )
        client = _RelayClient(self, viewer, vm_id, host)

        class Factory:
            def buildProtocol(self, url):
                return client

        try:
            connecting = defer.Deferred.fromCoroutine(endpoint.connect(Factory()))
            yield connecting.addTimeout(RELAY_TIMEOUT_SECONDS, self.reactor)
            yield client.ready.addTimeout(RELAY_TIMEOUT_SECONDS, self.reactor)
        except ConsoleUnavailable:
            raise
        except defer.TimeoutError:
            client.detach()
            raise ConsoleUnavailable(
                vm_id, f"its host {host} did not answer within {RELAY_TIMEOUT_SECONDS:g} s"
            ) from None
        except Exception as e:
            log.info(
                "console: relaying {vm} to {host} at {addr}: {err!r}", vm=vm_id, host=host, addr=addr, err=e
            )
            client.detach()
            raise ConsoleUnavailable(vm_id, f"its host {host} could not be reached") from None
        return client

    def stop(self) -> None:
        for client in list(self.live):
            client.detach()
