"""The Twisted layer of the peer protocol: carries out what the core decides.

:class:`GossipService` ticks the :class:`~vmwebd.gossip.core.GossipCore` on the injected clock,
feeds it envelopes from the peer endpoint and the DOM's local commits, and carries out its
outputs — persisting merged entities first, then sending (style rule: persist before you speak).
:class:`PeerClient` posts envelopes as SOAP to other daemons' peer endpoints (HTTPS with mutual
TLS when credentials are configured). A failed send is just a lost message: SWIM copes.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Protocol

from lxml import etree
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from vmwebd import xmlsafe
from vmwebd.atomicfile import write_atomic
from vmwebd.gossip.codec import NS as PEER_NS
from vmwebd.gossip.codec import answers_from, encode
from vmwebd.gossip.core import GossipCore

log = Logger()
# Every pooled connection would otherwise log "Starting/Stopping factory" at info level.
_HTTP11ClientFactory.noisy = False
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"


#: A request header by which a sender says it reads replies in the Deliver response: the answer
#: to a Ping (its Ack), a Sync (its SyncReply) then rides back on the same HTTP exchange instead
#: of a request of its own. Senders that do not send it get their replies as requests, as before.
REPLIES_HEADER = b"X-Vmweb-Replies"
#: A response header by which a peer endpoint says it reads Bundle envelopes (several consensus
#: messages in one request). A sender bundles only to peers whose answers carried it.
BUNDLES_HEADER = b"X-Vmweb-Bundles"
#: How long a push round may hold up the next one (GossipService._local) when a peer it went to
#: has not answered: a healthy peer answers within milliseconds.
PUSH_GAP_S = 0.1
_REPLIES = f"{{{PEER_NS}}}replies"
_SAFE = xmlsafe.parser()


def replies_element(envelopes: list[etree._Element]) -> etree._Element:
    """The ``<replies>`` a Deliver answers with (as its string result)."""
    box = etree.Element(_REPLIES, nsmap={None: PEER_NS})
    box.extend(envelopes)
    return box


def replies_in(body: bytes) -> list[etree._Element]:
    """The envelopes a Deliver response carries (none for a plain "ok"); a response that cannot
    be read carries none (the replies are then lost messages, which the protocol copes with)."""
    try:
        root = etree.fromstring(body, _SAFE)
        result = next((el for el in root.iter(f"{{{PEER_NS}}}DeliverResult")), None)
        text = (result.text or "") if result is not None else ""
        if not text.startswith("<"):
            return []
        box = etree.fromstring(text.encode(), _SAFE)
    except (etree.XMLSyntaxError, ValueError) as e:
        log.debug("unreadable Deliver response: {err}", err=e)
        return []
    return list(box) if box.tag == _REPLIES else []


class PeerObserver(Protocol):
    """What hears of peer traffic (:class:`vmwebd.metrics.NodeMetrics` does): ``kind`` is the
    name of an envelope's message element (``ping``, ``sync``, ``prepare``, ``bundle``…),
    ``via`` is ``request`` (a peer posted it here) or ``reply`` (it came back in a response)."""

    def peer_sent(self, kind: str, nbytes: int) -> None: ...

    def peer_send_failed(self, kind: str, nbytes: int) -> None: ...

    def peer_received(self, kind: str, via: str) -> None: ...

    def peer_bytes_received(self, via: str, nbytes: int) -> None: ...


def message_kind(env_el: etree._Element) -> str:
    """The kind of an encoded envelope's message: the name of its first element (see codec)."""
    for child in env_el:
        if isinstance(child.tag, str):
            return etree.QName(child).localname
    return "unknown"


def soap_body(env_el: etree._Element) -> bytes:
    envelope = etree.Element(f"{{{SOAP_NS}}}Envelope", nsmap={"soap": SOAP_NS, "p": PEER_NS})
    body = etree.SubElement(envelope, f"{{{SOAP_NS}}}Body")
    op = etree.SubElement(body, f"{{{PEER_NS}}}Deliver")
    arg = etree.SubElement(op, f"{{{PEER_NS}}}envelope")
    arg.append(env_el)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory, written at once: the HTTP client writes it in the same
    reactor turn as the headers, so request line, headers and body go out together
    (``FileBodyProducer`` writes it a turn later, through a cooperator task, as a write of its
    own)."""

    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IStreamClientEndpoint)
class _DialLater:
    """An endpoint to a peer built when it connects. An Agent asks for an endpoint for every
    request, though its pool uses it only to open a new connection; building one each time (the
    host name IDNA-encoded, a TLS wrapper) was 8% of a kept-connection peer round trip's CPU
    (profiled 2026-12-03). Built at connect time, it asks the TLS policy afresh each time."""

    def __init__(self, reactor, tls_policy, timeout: float, host: bytes, port: int):
        self.reactor, self.tls_policy, self.timeout = reactor, tls_policy, timeout  # policy None: http
        self.host, self.port = host, port

    def connect(self, protocol_factory):
        endpoint = HostnameEndpoint(self.reactor, self.host.decode("ascii"), self.port, timeout=self.timeout)
        if self.tls_policy is not None:
            endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(self.host, self.port), endpoint)
        return endpoint.connect(protocol_factory)


@implementer(IAgentEndpointFactory)
class _PeerEndpoints:
    """What the Agent connects with: one :class:`_DialLater` per peer address, kept."""

    def __init__(self, reactor, tls_policy, timeout: float):
        self.reactor, self.tls_policy, self.timeout = reactor, tls_policy, timeout
        self._known: dict[tuple[bytes, bytes, int], _DialLater] = {}  # by (scheme, host, port)

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._known.get(key)
        if endpoint is None:
            if uri.scheme != (b"https" if self.tls_policy is not None else b"http"):
                raise ValueError(
                    f"a peer is reached over {'https' if self.tls_policy else 'http'}, not {uri.scheme!r}"
                )
            endpoint = self._known[key] = _DialLater(
                self.reactor, self.tls_policy, self.timeout, uri.host, uri.port
            )
        return endpoint


class PeerClient:
    """Sends envelopes to peers' ``/peer`` SOAP endpoint over persistent connections.

    A connection carries one request at a time, and a Deliver is answered only once what it
    merged is on disk, so sends to one peer overlap: a gossip round, a probe, a push of local
    changes and lease rounds can all be in flight together. The pool keeps up to
    ``connections_per_peer`` idle connections per peer; a send beyond that opens a connection (a
    TLS handshake) that is closed after its one request. Each kept connection costs a file
    descriptor here and one at the peer.

    ``observer`` (optional, a :class:`PeerObserver`) hears of every envelope sent, by the kind
    of its message, and of every envelope and byte that came back in a response.
    """

    def __init__(
        self,
        reactor,
        tls_policy=None,
        timeout: float = 5.0,
        connections_per_peer: int = 8,
        observer: "PeerObserver | None" = None,
    ):
        if connections_per_peer < 1:
            raise ValueError(f"connections_per_peer must be at least 1, got {connections_per_peer}")
        self.reactor = reactor
        self.scheme = "https" if tls_policy is not None else "http"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections_per_peer
        self.pool.retryAutomatically = False
        self.agent = Agent.usingEndpointFactory(
            reactor, _PeerEndpoints(reactor, tls_policy, timeout), self.pool
        )
        self.timeout = timeout
        self.observer = observer
        self.sent = 0
        self.failed = 0
        self._bundles: set[str] = set()  # peer addresses that said they read bundles

    def reads_bundles(self, addr: str) -> bool:
        """Did the peer at ``addr`` say, in its last answer, that it reads Bundle envelopes?"""
        return addr in self._bundles

    def send(
        self, addr: str, env_el: etree._Element, on_reply=None, timeout: float | None = None
    ) -> defer.Deferred:
        """Posts one envelope. With ``on_reply``, the peer may answer in the response itself
        (``REPLIES_HEADER``): ``on_reply(envelope elements)`` is called with what it answered.
        ``timeout``: how long to wait for the answer, if not the client's default (a forwarded
        consensus operation is answered once decided)."""
        url = f"{self.scheme}://{addr}/peer".encode()
        headers = {b"Content-Type": [b"text/xml; charset=utf-8"], b"SOAPAction": [b'"Deliver"']}
        if on_reply is not None:
            headers[REPLIES_HEADER] = [b"1"]
        data = soap_body(env_el)
        kind = message_kind(env_el)
        observer = self.observer
        d = self.agent.request(b"POST", url, Headers(headers), _Body(data))
        d.addTimeout(timeout or self.timeout, self.reactor)

        def got(response):
            if response.headers.hasHeader(BUNDLES_HEADER):
                self._bundles.add(addr)
            else:
                self._bundles.discard(addr)
            return readBody(response).addCallback(lambda body: (response.code, body))

        def check(result):
            code, body = result
            if code != 200:
                raise IOError(f"peer {addr} answered HTTP {code}: {body[:200]!r}")
            self.sent += 1
            replies = replies_in(body) if on_reply is not None else []
            if observer is not None:
                observer.peer_sent(kind, len(data))
                observer.peer_bytes_received("reply", len(body))
                for el in replies:
                    observer.peer_received(message_kind(el), "reply")
            if replies:
                on_reply(replies)
            return True

        def failed(f):
            self.failed += 1
            if observer is not None:
                observer.peer_send_failed(kind, len(data))
            log.debug("send to {addr} failed: {err}", addr=addr, err=f.getErrorMessage())
            return False

        return d.addCallback(got).addCallback(check).addErrback(failed)

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()


class GossipService:
    def __init__(
        self,
        core: GossipCore,
        domsvc,
        client: PeerClient,
        reactor,
        state_file: Path | None = None,
        tick_interval: float = 0.05,
        listeners=(),
    ):
        self.core = core
        self.domsvc = domsvc
        self.client = client
        self.reactor = reactor
        self.state_file = state_file
        self.tick_interval = tick_interval
        self._loop = None
        self._saved_cvv = None
        #: the push round under way (see _local) and the writes waiting for the next one
        self._pushing: object | None = None
        self._push_waiters: list[defer.Deferred] = []
        self._push_gap_call = None
        self.push_gap = PUSH_GAP_S
        self._save_loop = None
        self.listeners = list(listeners)  # fn(node, old, new) on membership changes

    def now(self) -> float:
        return self.reactor.seconds()

    def start(self) -> None:
        self.domsvc.on_local_commit.append(self._local)
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.tick_interval, now=True)
        if self.state_file is not None:
            self._save_loop = task.LoopingCall(self._save_state)
            self._save_loop.clock = self.reactor
            self._save_loop.start(self.core.cfg.sync_interval, now=False)

    def _tick(self):
        self._carry(self.core.tick(self.now()))

    def _local(self, entities) -> defer.Deferred:
        """Pushes local changes; fires with how many peers acknowledged receipt of the push that
        carried them.

        One push round at a time: changes written while a round is under way are queued and
        leave together in the next round, as soon as that one is answered (or after
        ``push_gap`` seconds, so a silent peer among its targets holds nothing up). Under load
        each write used to be a round of its own to ``fanout`` peers — 16 of every 20 peer
        requests of a 1-VM CreateCluster on 5 daemons creating at once, measured 2026-12-02 —
        while a lone write still leaves at once."""
        if self._pushing is None:
            return self._push_round(self.core.local_changes(entities, self.now()))
        self._carry(self.core.local_changes(entities, self.now(), push=False))
        waiter: defer.Deferred = defer.Deferred()
        self._push_waiters.append(waiter)
        return waiter

    def _push_round(self, out) -> defer.Deferred:
        _, sent = self._carry(out)
        slot = self._pushing = object()  # this round, told apart from the next
        gap = self._push_gap_call = self.reactor.callLater(self.push_gap, self._push_slot_free, slot)

        def answered(result):
            if gap.active():
                gap.cancel()
            self._push_slot_free(slot)
            return result

        sent.addBoth(answered)
        return sent

    def _push_slot_free(self, slot: object) -> None:
        """The push round ``slot`` is answered or has had its time: the next one may leave."""
        if self._pushing is not slot:
            return
        self._pushing = None
        if self._push_waiters and self._loop is not None and self._loop.running:
            waiters, self._push_waiters = self._push_waiters, []
            sent = self._push_round(self.core.push(self.now()))

            def release(result):
                for w in waiters:
                    w.callback(result)
                return result

            sent.addBoth(release)
        else:
            waiters, self._push_waiters = self._push_waiters, []
            for w in waiters:
                w.callback(0)

    def note_own(self, entities) -> None:
        """This host's own writes that every peer learns by other means (a decided lease, from
        its Commit): the complete vector moves past them as for any local write (so anti-entropy
        does not offer them again and again), but nothing is pushed. Call once they are durable."""
        cvv, me = self.core.cvv, self.core.me
        for el in entities:
            if el is None:
                continue
            for origin, stamp in self.core.dom.stamps_of(el):
                if origin == me and stamp > cvv.get(me, (-1, -1)):
                    cvv[me] = stamp

    def push_to(self, hosts) -> defer.Deferred:
        """Sends what is queued to ``hosts`` at once (see GossipCore.push_to)."""
        _, sent = self._carry(self.core.push_to(hosts, self.now()))
        return sent

    def receive(self, env, inline: bool = False) -> defer.Deferred:
        """Feeds an envelope to the core; fires once what it merged is durable (the peer
        endpoint answers only then, so a sender's "delivered" means "on disk here").

        With ``inline`` (the sender reads replies in the response), what the core answers to
        the sender is not sent but handed back: the Deferred fires with those envelopes (encoded),
        after the persist like every send."""
        out = self.core.receive(env, self.now())
        replies = []
        if inline:
            replies = [s for s in out.sends if s.dst == env.src]
            out.sends = [s for s in out.sends if s.dst != env.src]
        persisted, _ = self._carry(out)
        if not inline:
            return persisted
        return persisted.addCallback(lambda _: [encode(s.envelope) for s in replies])

    def _replied(self, dst: str, elements) -> None:
        """Envelopes a peer answered with in a Deliver response: received like any other, but
        only if they come from the host we sent to (the one whose TLS connection carried them)."""
        for env in answers_from(dst, elements):
            self.receive(env)

    def _carry(self, out) -> tuple[defer.Deferred, defer.Deferred]:
        """Persists, then sends. Returns (persisted, sent); ``sent`` fires with the number of
        envelopes the peers accepted (a failed send is a lost message, never an error). A send
        to a known host asks for its replies inline (see ``REPLIES_HEADER``)."""
        for node, old, new in out.changes:
            if new != old:
                log.info("host {node}: {old} -> {new}", node=node, old=old, new=new)
            for fn in self.listeners:
                fn(node, old, new)
        persisted = self.domsvc.commit(out.persist) if out.persist else defer.succeed(None)
        if not out.sends:
            return persisted, persisted.addCallback(lambda _: 0)
        sent = defer.Deferred()

        def send(_):
            ds = [
                self.client.send(
                    s.addr,
                    encode(s.envelope),
                    on_reply=None if s.dst is None else partial(self._replied, s.dst),
                )
                for s in out.sends
            ]
            defer.DeferredList(ds, consumeErrors=True).addCallback(
                lambda results: sent.callback(sum(1 for ok, v in results if ok and v))
            )
            return _

        persisted.addCallback(send)
        return persisted, sent

    @defer.inlineCallbacks
    def stop(self, leave: bool = True):
        """Stops ticking; on a clean stop first tells peers we leave (bounded by the client timeout)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._save_loop is not None and self._save_loop.running:
            self._save_loop.stop()
        if self._local in self.domsvc.on_local_commit:
            self.domsvc.on_local_commit.remove(self._local)
        if self._push_gap_call is not None and self._push_gap_call.active():
            self._push_gap_call.cancel()
        if self._pushing is not None:
            self._push_slot_free(self._pushing)  # the loop is stopped: waiters are released
        if leave:
            yield self._carry(self.core.leave(self.now()))[1]
        yield self._save_state()
        yield self.client.close()

    def _save_state(self):
        if self.state_file is None:
            return defer.succeed(None)
        state = {"cvv": {o: list(s) for o, s in self.core.cvv.items()}, "incarnation": self.core.incarnation}
        if state == self._saved_cvv:
            return defer.succeed(None)
        self._saved_cvv = state
        # The vector covers entities merged just now: write it once they are on disk, so a
        # restart after kill -9 never claims what its replica lost.
        return self.domsvc.barrier().addCallback(lambda _: deferToThread(_write_json, self.state_file, state))


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj), mode=None)


def load_state(path: Path) -> tuple[dict, int]:
    """The complete version vector and incarnation saved by a previous run (empty if none).

    A stale vector is safe: it only makes the next anti-entropy round send more."""
    try:
        obj = json.loads(path.read_text())
        return {o: tuple(s) for o, s in obj.get("cvv", {}).items()}, int(obj.get("incarnation", 0))
    except FileNotFoundError:
        return {}, 0
    except (ValueError, TypeError, AttributeError) as e:
        log.warn("ignoring unreadable gossip state {path}: {err}", path=str(path), err=e)
        return {}, 0
