"""Prometheus metrics of one daemon, served at ``/metrics`` on the user API's port.

:class:`NodeMetrics` owns a registry of its own (never the library's global one: tests run
several nodes in one process) and the instruments that parts of the daemon report to as things
happen: the SOAP stack (:class:`vmwebd.api.soap.SoapObserver`), the lease service's rounds
(``LeaseService(on_round=...)``) and the peer transport
(:class:`vmwebd.gossip.service.PeerObserver`). :class:`StateCollector` reads what is already
kept — the failure detector's view, the DOM's indexes, the reconciler's counters — at scrape
time, on the reactor thread. What it derives from the DOM is kept up to date from the DOM's
change notifications: a scrape looks again only at the entities that changed since the last one
(the first scrape reads every VM once).

:class:`MetricsPage` serves the registry in the Prometheus text format (or OpenMetrics when the
scraper asks for it), with or without an admin's login, as ``<metrics auth=...>`` says. It
renders on the reactor thread rather than through ``prometheus_client.twisted.MetricsResource``,
which collects on the reactor's thread pool: the collectors read the DOM and the membership,
which only the reactor thread may touch.

The series, their labels and example queries are in ``docs/metrics.md``.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from vmwebd.dom.records import CONTAINERS, RECORD_TYPES, MigrationRec, VmRec, status_of
from vmwebd.gossip.messages import NAMES

log = Logger()

#: SOAP calls take from a millisecond (a cached read) to tens of seconds (a large cluster).
SOAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: A Paxos round is a few peer round trips and an fsync; its hard deadline is seconds.
PAXOS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Member states of the failure detector, always all reported (zero when none).
MEMBER_STATES = ("alive", "suspect", "dead", "left")
#: Message kinds a label may carry: the wire format's own names (anything else is ``other``,
#: so a peer cannot grow the number of series).
PEER_KINDS = frozenset(NAMES.values())


class NodeMetrics:
    """The instruments of one node, in a registry of its own (:attr:`registry`).

    ``clock``: seconds on a monotonic clock, for SOAP latencies (Paxos rounds are timed on the
    reactor's clock by the lease service)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.soap_requests = Counter(
            "vmweb_soap_requests",
            "SOAP calls of the user API answered, by operation and fault "
            "(none: answered; a faultcode; disconnected: the client left first)",
            ["operation", "fault"],
            registry=r,
        )
        self.soap_seconds = Histogram(
            "vmweb_soap_request_duration_seconds",
            "Time from a SOAP call's arrival to its answer",
            ["operation"],
            buckets=SOAP_BUCKETS,
            registry=r,
        )
        self.paxos_rounds = Counter(
            "vmweb_paxos_rounds",
            "Lease proposals made by this host, by outcome (decided, conflict, noquorum, error)",
            ["outcome"],
            registry=r,
        )
        self.paxos_seconds = Histogram(
            "vmweb_paxos_round_duration_seconds",
            "Time from a lease proposal to its outcome",
            ["outcome"],
            buckets=PAXOS_BUCKETS,
            registry=r,
        )
        self.gossip_messages_sent = Counter(
            "vmweb_gossip_messages_sent",
            "Peer envelopes this host posted and a peer accepted, by message kind (gossip and consensus)",
            ["kind"],
            registry=r,
        )
        self.gossip_bytes_sent = Counter(
            "vmweb_gossip_bytes_sent",
            "Bytes of the peer requests counted in vmweb_gossip_messages_sent",
            ["kind"],
            registry=r,
        )
        self.gossip_send_failures = Counter(
            "vmweb_gossip_send_failures",
            "Peer envelopes whose post failed (timeout, refused, not HTTP 200): lost messages",
            ["kind"],
            registry=r,
        )
        self.gossip_messages_received = Counter(
            "vmweb_gossip_messages_received",
            "Peer envelopes received, by message kind and how "
            "(request: posted here by a peer; reply: in the response to one of ours)",
            ["kind", "via"],
            registry=r,
        )
        self.gossip_bytes_received = Counter(
            "vmweb_gossip_bytes_received",
            "Bytes of peer requests posted here and of the responses read by this host",
            ["via"],
            registry=r,
        )

    # -- vmwebd.api.soap.SoapObserver ----------------------------------------------------------
    def soap_call(self, operation: str, fault: str, seconds: float) -> None:
        self.soap_requests.labels(operation, fault).inc()
        self.soap_seconds.labels(operation).observe(seconds)

    # -- LeaseService(on_round=...) ------------------------------------------------------------
    def paxos_round(self, outcome: str, seconds: float) -> None:
        self.paxos_rounds.labels(outcome).inc()
        self.paxos_seconds.labels(outcome).observe(seconds)

    # -- vmwebd.gossip.service.PeerObserver ----------------------------------------------------
    def peer_sent(self, kind: str, nbytes: int) -> None:
        kind = _kind(kind)
        self.gossip_messages_sent.labels(kind).inc()
        self.gossip_bytes_sent.labels(kind).inc(nbytes)

    def peer_send_failed(self, kind: str, nbytes: int) -> None:
        self.gossip_send_failures.labels(_kind(kind)).inc()

    def peer_received(self, kind: str, via: str) -> None:
        self.gossip_messages_received.labels(_kind(kind), via).inc()

    def peer_bytes_received(self, via: str, nbytes: int) -> None:
        self.gossip_bytes_received.labels(via).inc(nbytes)

    def peer_envelope(self, env) -> None:
        """A decoded envelope a peer posted here (the node's peer endpoint calls this)."""
        self.peer_received(NAMES.get(type(env.msg), "other"), "request")


def _kind(kind: str) -> str:
    return kind if kind in PEER_KINDS else "other"


class _ByGeneration:
    """A value derived from some DOM kinds, computed again only when one of them changed."""

    def __init__(self, dom, kinds: tuple[str, ...], compute: Callable[[], object]):
        self.dom, self.kinds, self.compute = dom, kinds, compute
        self._key = None
        self._value = None

    def get(self):
        key = tuple(self.dom.kind_generation(k) for k in self.kinds)
        if key != self._key:
            self._value = self.compute()
            self._key = key
        return self._value


#: The record class of each kind's main part (whose presence means the entity is live).
_MAIN = {cls.KIND: cls for cls in RECORD_TYPES if not cls.PART}


class _LiveCounts:
    """Live entities by kind and VMs by (host, observed state), kept from the DOM's change
    notifications: :meth:`refresh` looks only at what changed since it last ran."""

    def __init__(self, dom):
        self.dom = dom
        self.live = {kind: set(dom.ids(kind)) for kind in CONTAINERS}
        self.vms: dict[tuple[str, str], int] = {}
        self._vm_key: dict[str, tuple[str, str]] = {}
        self._dirty: dict[str, set[str]] = {kind: set() for kind in CONTAINERS}
        self._vms_read = False
        dom.subscribe(self._changed)

    def _changed(self, kind: str, id_: str) -> None:
        self._dirty[kind].add(id_)

    def refresh(self) -> None:
        dom = self.dom
        for kind, ids in self._dirty.items():
            if not ids:
                continue
            self._dirty[kind] = set()
            live = self.live[kind]
            for id_ in ids:
                if dom.get(_MAIN[kind], id_) is not None:
                    live.add(id_)
                else:
                    live.discard(id_)
            if kind == "vm" and self._vms_read:
                for id_ in ids:
                    self._count_vm(id_)
        if not self._vms_read:  # the first time: every VM, once
            self._vms_read = True
            for id_ in self.live["vm"]:
                self._count_vm(id_)

    def _count_vm(self, id_: str) -> None:
        old = self._vm_key.pop(id_, None)
        if old is not None:
            self.vms[old] -= 1
            if not self.vms[old]:
                del self.vms[old]
        vm = self.dom.get(VmRec, id_)
        if vm is None:
            return
        st = status_of(self.dom, vm)
        key = (vm.host, st.state if st is not None else "pending")
        self._vm_key[id_] = key
        self.vms[key] = self.vms.get(key, 0) + 1


class StateCollector:
    """Reads a node's state at scrape time (a prometheus_client custom collector).

    ``domsvc``: the node's DomService; ``members()``: the failure detector's member states by
    host id (empty when the host runs without peers); ``reconciler()``: the node's Reconciler
    (or None before it exists). Only in-memory reads of what changed since the last scrape."""

    def __init__(self, domsvc, members: Callable[[], dict], reconciler: Callable[[], object]):
        self.domsvc = domsvc
        self.members = members
        self.reconciler = reconciler
        dom = domsvc.dom
        self._counts = _LiveCounts(dom)
        self._migrations = _ByGeneration(dom, ("migration",), self._count_migrations)

    def describe(self):
        return []  # families are built at each scrape; nothing to check at registration

    def collect(self):
        self._counts.refresh()
        yield from self._members()
        yield from self._dom()
        yield from self._vm_families()
        yield from self._migration_families()
        yield from self._reconcile()

    # -- membership ------------------------------------------------------------------------
    def _members(self):
        g = GaugeMetricFamily(
            "vmweb_members",
            "Hosts known to this host's failure detector, by state (this host included; none without peers)",
            labels=["state"],
        )
        counts = dict.fromkeys(MEMBER_STATES, 0)
        for status in self.members().values():
            counts[status] = counts.get(status, 0) + 1
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g

    # -- the DOM ----------------------------------------------------------------------------
    def _dom(self):
        dom = self.domsvc.dom
        g = GaugeMetricFamily(
            "vmweb_dom_entities", "Live entities in this host's DOM replica, by kind", labels=["kind"]
        )
        live = 0
        for kind, ids in self._counts.live.items():
            n = len(ids)
            live += n
            g.add_metric([kind], n)
        yield g
        stored = dom.size()
        yield GaugeMetricFamily(
            "vmweb_dom_stored_entities", "Entities held by this replica, tombstones included", value=stored
        )
        yield GaugeMetricFamily(
            "vmweb_dom_tombstones", "Deleted entities not yet collected", value=stored - live
        )
        stats = self.domsvc.store.stats()
        yield GaugeMetricFamily(
            "vmweb_dom_journal_bytes",
            "Size of the DOM store's journal since its last snapshot",
            value=stats.journal_bytes,
        )
        yield GaugeMetricFamily(
            "vmweb_dom_journal_records",
            "Records in the DOM store's journal since its last snapshot",
            value=stats.records_since_snapshot,
        )

    def _vm_families(self):
        g = GaugeMetricFamily(
            "vmweb_vms",
            "VMs in the grid by the host they are placed on (empty: "
            "not placed) and their observed state (pending until their host "
            "reports)",
            labels=["host", "state"],
        )
        for (host, state), n in sorted(self._counts.vms.items()):
            g.add_metric([host, state], n)
        yield g

    # -- migrations -------------------------------------------------------------------------
    def _count_migrations(self):
        phases: dict[tuple[str, str], int] = {}
        done: dict[str, list] = {}  # mode -> [count, bytes, downtime ms sum, downtime ms max]
        for m in self.domsvc.dom.all(MigrationRec):
            key = (m.phase, m.mode)
            phases[key] = phases.get(key, 0) + 1
            if m.phase == "done":
                d = done.setdefault(m.mode, [0, 0, 0, 0])
                d[0] += 1
                d[1] += m.bytes
                d[2] += m.downtime_ms
                d[3] = max(d[3], m.downtime_ms)
        return phases, done

    def _migration_families(self):
        phases, done = self._migrations.get()
        g = GaugeMetricFamily(
            "vmweb_migrations",
            "Migration records in the DOM by phase and mode (records are collected some time after they end)",
            labels=["phase", "mode"],
        )
        for (phase, mode), n in sorted(phases.items()):
            g.add_metric([phase, mode], n)
        yield g
        nb = GaugeMetricFamily(
            "vmweb_migrations_done_bytes",
            "Disk and memory bytes moved by the finished (done) migrations still recorded in the DOM",
            labels=["mode"],
        )
        dt = GaugeMetricFamily(
            "vmweb_migrations_done_downtime_seconds",
            "Sum of the downtime of the finished migrations still recorded in the DOM",
            labels=["mode"],
        )
        mx = GaugeMetricFamily(
            "vmweb_migrations_done_downtime_max_seconds",
            "Longest downtime among the finished migrations still recorded in the DOM",
            labels=["mode"],
        )
        for mode, (_, nbytes, down_ms, max_ms) in sorted(done.items()):
            nb.add_metric([mode], nbytes)
            dt.add_metric([mode], down_ms / 1000.0)
            mx.add_metric([mode], max_ms / 1000.0)
        yield nb
        yield dt
        yield mx

    # -- the reconciler ---------------------------------------------------------------------
    def _reconcile(self):
        r = self.reconciler()
        if r is None:
            return
        # Read from the reconciler's own counters and state; it keeps no count of actions or
        # failures (a VM that failed shows in vmweb_vms with state error or crashed).
        yield CounterMetricFamily(
            "vmweb_reconcile_passes",
            "Reconciliation passes run on this host (for changes, full, or network)",
            value=r.passes,
        )
        yield CounterMetricFamily(
            "vmweb_reconcile_full_passes",
            "Full reconciliation passes over every VM of this host",
            value=r.full_passes,
        )
        yield GaugeMetricFamily(
            "vmweb_reconcile_busy",
            "1 while a reconciliation pass runs or is scheduled",
            value=1 if r.pending() else 0,
        )
        yield GaugeMetricFamily(
            "vmweb_reconcile_queued_vms",
            "VMs whose change waits for the next pass",
            value=len(getattr(r, "_dirty_vms", ())),
        )
        yield GaugeMetricFamily(
            "vmweb_reconcile_failed_segments",
            "Cluster network segments the last network pass could not make on this host",
            value=len(getattr(r, "_net_failed", None) or ()),
        )


class MetricsPage(Resource):
    """``GET /metrics``: the registry in the Prometheus text format (OpenMetrics if asked for).

    ``auth`` is ``none`` (anyone who reaches the port) or ``login``: an admin, by the web
    pages' session cookie (``session_user(request)`` gives its Principal or None) or by HTTP
    Basic checked by ``authenticator`` (what Prometheus's ``basic_auth`` sends)."""

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry,
        auth: str = "login",
        authenticator=None,
        session_user: Callable | None = None,
    ):
        super().__init__()
        if auth not in ("none", "login"):
            raise ValueError(f"auth must be none or login, not {auth!r}")
        if auth == "login" and authenticator is None:
            raise ValueError("auth='login' needs an authenticator")
        self.registry = registry
        self.auth = auth
        self.authn = authenticator
        self.session_user = session_user

    def render_GET(self, request):
        request.setHeader(b"Cache-Control", b"no-store")
        if self.auth == "none":
            return self._exposition(request)
        user = self.session_user(request) if self.session_user is not None else None
        if user is not None:
            return self._as(request, user)
        from vmwebd.auth import client_address, parse_basic

        creds = parse_basic(request.getHeader(b"authorization"))
        if creds is None:
            return self._plain(request, 401, "metrics need an admin's login (HTTP Basic)")
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def checked(principal):
            if not finished:
                _write(request, self._as(request, principal))

        def refused(f):
            from vmwebd.errors import NotAuthorized

            if not f.check(NotAuthorized):
                log.failure("metrics: authentication crashed", failure=f)
            text = f.value.message if f.check(NotAuthorized) else "authentication failed"
            if not finished:
                _write(request, self._plain(request, 401, text))

        self.authn.authenticate(creds[0], creds[1], client_address(request)).addCallbacks(checked, refused)
        return NOT_DONE_YET

    def _as(self, request, principal) -> bytes:
        if not principal.is_admin:
            return self._plain(request, 403, f"metrics are for admins; {principal.name} is not one")
        return self._exposition(request)

    def _exposition(self, request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return encoder(self.registry)

    @staticmethod
    def _plain(request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        if code == 401:
            request.setHeader(b"WWW-Authenticate", b'Basic realm="vmweb", charset="UTF-8"')
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()


def _write(request, body: bytes) -> None:
    request.write(body)
    request.finish()


class CountingResource(Resource):
    """Passes every request to the leaf resource ``inner``, first reporting the size of its body
    to ``count(nbytes)`` (the peer endpoint: bytes posted here by peers)."""

    isLeaf = True

    def __init__(self, inner: Resource, count: Callable[[int], None]):
        super().__init__()
        self.inner = inner
        self.count = count

    def render(self, request):
        content = request.content
        if content is not None:
            self.count(content.seek(0, 2))
            content.seek(0)
        return self.inner.render(request)
