"""One vmweb daemon's parts, wired together: the object tests start in-process and ``vmwebd`` runs.

:class:`Node` takes a validated :class:`~vmwebd.config.Config` and a reactor. On :meth:`Node.start`
it rebuilds the DOM replica from its store (off the reactor thread), opens the hypervisor driver,
makes sure the storage pool and base images exist and publishes the config's templates and images
into the DOM; then it builds every service, each given its collaborators in its constructor
(:meth:`Node._compose`), and starts them as its child services, in order (:meth:`startService`):
the image scan, the lease service, gossip and the peer endpoint, the host heartbeat, the
reconciler, the migration loops, the load history and, last, the user API. :meth:`Node.stop`
stops them in the reverse order, each bounded (docs/architecture.md, "Wiring").
"""

from __future__ import annotations

import dataclasses
import random

from lxml import etree
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from vmwebd import apitls
from vmwebd.app import build_application
from vmwebd.audit import AuditLog
from vmwebd.blocking import ThreadPoolRunner
from vmwebd.cluster import ClusterManager
from vmwebd.config import Address, Config
from vmwebd.console.hub import ConsoleService
from vmwebd.console.wire import PeerConsoleResource, Relay, UserConsoleResource
from vmwebd.dom.gc import collectable, format_cvv, parse_cvv
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.persist import DomService, load_dom
from vmwebd.dom.records import HostRec, ImageRec, TemplateRec
from vmwebd.errors import ConfigError
from vmwebd.gossip import tls
from vmwebd.gossip.core import LAN, LOCAL_TEST, GossipCore
from vmwebd.gossip.domport import DomPortAdapter
from vmwebd.gossip.messages import Bundle
from vmwebd.gossip.pki import load_host_credentials
from vmwebd.gossip.service import GossipService, PeerClient, load_state
from vmwebd.history import HistoryService
from vmwebd.hv import open_driver
from vmwebd.hv.images import FileResource, ImageStore, image_resolver
from vmwebd.lease import paxos
from vmwebd.lease.allocator import Allocator
from vmwebd.lease.service import LeaseService, PaxosLeaseTable
from vmwebd.lease.transport import PaxosTransport
from vmwebd.metrics import CountingResource, MetricsPage, NodeMetrics, StateCollector
from vmwebd.migrate.manager import MigrationManager
from vmwebd.net import addressing
from vmwebd.net.host import make_devices, underlay_address
from vmwebd.parts import Loop, Part, Paused
from vmwebd.reconcile import Reconciler, StorageLayout
from vmwebd.settings import get_setting
from vmwebd.templates import load_templates, to_dom_body

log = Logger()
PAXOS_KINDS = (
    paxos.Prepare,
    paxos.Promise,
    paxos.Accept,
    paxos.Accepted,
    paxos.Commit,
    paxos.Nack,
    paxos.Forward,
    paxos.Outcome,
    Bundle,
)
HEARTBEAT_SECONDS = 10.0
SWEEP_SECONDS = 15.0
BALANCE_TICK_SECONDS = 1.0


class QuietSite(Site):
    """A Site whose access log goes to debug level: peers and pollers call many times a second.

    ``soap_observer``: what hears of every SOAP call answered on this site (vmwebd.api.soap)."""

    def __init__(self, resource, *args, soap_observer=None, **kwargs):
        super().__init__(resource, *args, **kwargs)
        self.soap_observer = soap_observer

    def log(self, request):
        log.debug(
            "{method} {uri} {code} from {peer}",
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            code=request.code,
            peer=getattr(request.getClientAddress(), "host", "?"),
        )


class _PeerInbox:
    """What the peer endpoint hands the envelopes it receives: consensus messages to the lease
    transport, the rest to gossip. ``gossip()``: the gossip service, built after the endpoint's
    port is bound (its address is the gossip core's); the port takes no request before then."""

    def __init__(self, metrics: NodeMetrics, transport: PaxosTransport, gossip):
        self.metrics, self.transport, self.gossip = metrics, transport, gossip

    def receive(self, env, inline: bool = False):
        self.metrics.peer_envelope(env)
        if isinstance(env.msg, PAXOS_KINDS):
            return self.transport.deliver(env, inline)
        return self.gossip().receive(env, inline)


class Node(MultiService):
    """One host's daemon: a ``MultiService`` of its parts (see the module and :meth:`_compose`).

    Without a cluster certificate the host runs alone: no peer endpoint, no gossip
    (:attr:`gossip` and :attr:`paxos_transport` stay None)."""

    def __init__(
        self, config: Config, reactor, fsync: bool = True, driver=None, rng=None, gossip_config=None, net=None
    ):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.fsync = fsync
        self.host_id = config.host.id
        self.driver = driver
        self.rng = rng or random.Random()
        self.port = None
        self.domsvc = None
        self.gossip = None
        self.host_creds = None  # this host's grid certificate and key (None: no peers)
        self.paxos_transport = None
        self.peer_port = None
        self.peer_address: str | None = None
        self._record_written_ms = 0
        self._policy_gen = None
        self._policy = None
        self._last_balance = 0
        self._leave = True
        self._stop_requested = False
        self.cert_dir = getattr(config.peers, "cert_dir", None) or (config.state_dir / "pki")
        self.gossip_config = gossip_config
        #: The network executor (vmwebd.net.devices); None: chosen from the config at start.
        self.net = net
        #: This node's Prometheus registry and instruments (served when the config says so).
        self.metrics = NodeMetrics()

    @property
    def underlay(self) -> str:
        return underlay_address(self.config)

    def now_ms(self) -> int:
        return int(self.reactor.seconds() * 1000)

    # -- start and stop ---------------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self):
        """Prepares the store, the hypervisor and the DOM's static records, builds every part
        (:meth:`_compose`) and starts them (:meth:`startService`); fires once the user API
        listens."""
        cfg = self.config
        try:
            clock = HybridClock(self.host_id, self.now_ms)
            dom, store, n = yield threads.deferToThread(load_dom, cfg.state_dir / "dom", clock, self.fsync)
            self.domsvc = DomService(dom, store, self.reactor, journal_records=n)
            if self.driver is None:
                self.driver = open_driver(cfg.libvirt_uri, reactor=self.reactor)
            yield self._ensure_storage()
            yield self._publish_static()
            if cfg.storage.console_dir and self.driver.runs_guests:
                yield threads.deferToThread(cfg.storage.console_dir.mkdir, parents=True, exist_ok=True)
            if self._stop_requested:
                raise defer.CancelledError(f"host {self.host_id} was stopped while starting")
            self._compose(clock)
        except Exception:
            yield self._abandon()
            raise
        yield self._start_parts()
        log.info("host {host} serving the user API on {url}", host=self.host_id, url=self.api_url)

    def startService(self):
        """Starts the node (:meth:`start`); a Deferred, which a parent service does not wait for."""
        return self.start()

    @defer.inlineCallbacks
    def _start_parts(self):
        """Starts the parts in the order they were added, each once the one before it started
        (a part whose start returns a Deferred is waited for); a stop meanwhile ends it."""
        Service.startService(self)
        for part in list(self):
            if not self.running:
                return
            yield part.startService()

    @defer.inlineCallbacks
    def _abandon(self):
        """Closes what a start that failed before its parts ran had opened (a failure to close
        is logged: the start's own failure is the one reported)."""
        try:
            if self.peer_port is not None:
                yield self.peer_port.stopListening()
            if self.driver is not None:
                yield self.driver.close()
            if self.domsvc is not None:
                self.domsvc.close()
        except Exception:
            log.failure("closing what host {host} had opened before it failed to start", host=self.host_id)

    #: A clean stop tells peers we leave for at most this long (a busy grid may not answer).
    LEAVE_SECONDS = 2.0
    #: and waits this long at most for a reconcile pass under way to end.
    DRAIN_SECONDS = 10.0

    def stop(self, leave: bool = True) -> defer.Deferred:
        """Stops taking work first (timers, the user API), then leaves the grid (bounded), then
        closes the hypervisor, leases and the store: a stop under load ends in seconds. With
        ``leave`` false, peers are not told (they find out by probing)."""
        self._leave = leave
        return self.stopService()

    @defer.inlineCallbacks
    def stopService(self):
        """Stops the running parts in the reverse order of their start, one after the other."""
        self._stop_requested = True
        if not self.running:
            return
        Service.stopService(self)
        for part in reversed(list(self)):
            if part.running:
                yield part.stopService()

    # -- composition --------------------------------------------------------------------------
    def _compose(self, clock: HybridClock) -> None:
        """Builds every service with what it uses, and adds the node's parts in start order.

        Views of the grid that only the gossip service can answer (who is alive, where a host
        is) are the node's methods, passed as callables: they answer for a host alone too.
        Where two services need each other, one gets a callable (the lease service sends
        through the peer transport, which delivers to it: ``send=self.send_peer``; the leases'
        note to gossip; the gossip core's vector to its DOM adapter)."""
        cfg = self.config
        creds = self._load_credentials()
        self.host_creds = creds
        self.images = ImageStore(
            self.host_id,
            self.domsvc,
            self.driver,
            cfg.storage.pool,
            cfg.storage.dir,
            self.cert_dir,
            self.reactor,
            self.live_hosts,
            self.peer_address_of,
            publish=self.heartbeat,
        )
        self.leases = LeaseService(
            self.host_id,
            self.domsvc,
            cfg.state_dir / "paxos",
            self.reactor,
            clock,
            random.Random(self.rng.random()),
            cfg.peers.members or (self.host_id,),
            self.send_peer,
            fsync=self.fsync,
            on_round=self.metrics.paxos_round,
            proposer_for=self._proposer_for,
            non_members_alive=self._non_members_alive,
            note_own=self._note_own,
            # The acceptor store's own thread: its load and group writes, in order.
            run_blocking=ThreadPoolRunner.dedicated(self.reactor, "vmweb-paxos-store"),
        )
        table = PaxosLeaseTable(self.leases)
        self.allocator = Allocator(
            table,
            {p.name: p for p in cfg.ip_pools},
            cfg.mac,
            cfg.vni,
            self.rng,
            lane=self._lease_lane,
            hosts=lambda: self.domsvc.dom.ids("host"),
        )
        self.manager = ClusterManager(
            self.host_id,
            self.domsvc,
            self.allocator,
            cfg.limits,
            self.now_ms,
            guest_mtu=addressing.guest_mtu(cfg.network.underlay_mtu),
            live_hosts=self.live_hosts,
            liveness=self.liveness,
            placeable_hosts=self.placeable_hosts,
            members=self.leases.members,
            view_generation=lambda: self.membership_generation,
        )
        if self.net is None:
            self.net = make_devices(self.config, self.reactor)
        storage = StorageLayout(cfg.storage.pool, str(cfg.storage.dir), str(cfg.storage.console_dir))
        self.reconciler = Reconciler(
            self.host_id,
            self.domsvc,
            self.driver,
            self.allocator,
            storage,
            self.reactor,
            self.now_ms,
            cfg.reconcile_interval,
            images=self.images,
            rng=random.Random(self.rng.random()),
            net=self.net,
        )
        self.migrations = MigrationManager(
            self.host_id,
            self.domsvc,
            self.driver,
            self.images,
            self.reconciler,
            table,
            storage,
            self.now_ms,
            self.live_hosts,
            self.peer_address_of,
            self.cert_dir,
            overcommit=lambda: float(get_setting(self.domsvc.dom, "cpu_overcommit")),
            clock=self.reactor,
            liveness=self.liveness,
            placeable_hosts=self.placeable_hosts,
            allocator=self.allocator,
            placement=lambda: get_setting(self.domsvc.dom, "placement"),
            migrate_uri=cfg.migrate_uri if cfg.migrate_uri and self.driver.supports_live_migration else "",
            push_to=self._push_to,
            run_blocking=ThreadPoolRunner(self.reactor),  # file work: the reactor's pool
        )
        # Its ring is served on the peer endpoint.
        self.history = HistoryService(
            self.host_id,
            self.reactor,
            self.driver,
            self.domsvc,
            memory_mib=cfg.host.memory_mib,
            peer_address_of=self.peer_address_of,
            host_creds=creds,
        )
        # The operations users ask for, with their permission checks (SOAP, the web pages and
        # the consoles ask it), each change recorded in the audit trail.
        self.audit = AuditLog(self.host_id, self.domsvc, self.now_ms, clock=self.reactor)
        self.access = build_application(
            manager=self.manager,
            domsvc=self.domsvc,
            migrations=self.migrations,
            members=self.leases,
            images=self.images,
            audit=self.audit,
            now_ms=self.now_ms,
            run=ThreadPoolRunner(self.reactor),
        )
        # VMs' serial consoles (vmwebd/console/): who may open one is the application's say, and
        # each opening is in its audit trail.
        self.consoles = ConsoleService(
            self.host_id,
            self.reactor,
            self.domsvc,
            self.driver.open_console,
            self.access.open_console,
            relay=Relay(self.host_id, self.reactor, self.peer_address_of, creds) if creds else None,
        )
        if cfg.metrics.enabled:
            self.metrics.registry.register(
                StateCollector(self.domsvc, self._member_states, lambda: self.reconciler)
            )

        # The parts, in start order (stopped in the reverse one).
        self.addService(Part("store", stop=self.domsvc.close))
        self.addService(Part("images", start=self.images.scan))
        self.addService(Part("leases", start=self.leases.start, stop=self.leases.stop))
        self.addService(Part("hypervisor", stop=self.driver.close))
        # Stopped once nothing gives the reconciler work, before the hypervisor closes.
        self.addService(Part("reconcile-drain", stop=self._drain_reconciler))
        self.addService(Part("consoles", stop=self.consoles.stop))
        if creds is not None:
            self._compose_peers(creds)
        self.addService(Loop("heartbeat", self.heartbeat, HEARTBEAT_SECONDS, self.reactor, first=True))
        self.addService(Part("reconciler", start=self.reconciler.start, stop=self.reconciler.stop))
        self.addService(Part("migrations", start=self.migrations.start))
        self.addService(Loop("sweeper", self.sweep, SWEEP_SECONDS, self.reactor))
        self.addService(Loop("balancer", self.balance_tick, BALANCE_TICK_SECONDS, self.reactor))
        self.addService(Part("history", start=self.history.start, stop=self.history.stop))
        self.addService(Part("api", start=self.listen, stop=self._stop_api))

    def _load_credentials(self):
        """This host's grid certificate and key, or None (and a warning) without one."""
        cert_dir = self.cert_dir
        if not (cert_dir / "host.crt").exists():
            log.warn(
                "no cluster certificate in {dir}: host {host} runs alone, without peers "
                "(create one with `vmweb init` or `vmweb host add`)",
                dir=str(cert_dir),
                host=self.host_id,
            )
            return None
        creds = load_host_credentials(cert_dir)
        if creds.host_id != self.host_id:
            raise ConfigError(
                str(cert_dir / "host.crt"),
                None,
                "certificate",
                f"is for host {creds.host_id!r}, but this host is {self.host_id!r}",
            )
        return creds

    def _compose_peers(self, creds) -> None:
        """The peer endpoint, the consensus transport and gossip; the endpoint's port is bound
        here (the gossip core carries its address) and takes requests once its part starts."""
        cfg = self.config
        gcfg = self.gossip_config or (LOCAL_TEST if cfg.peers.timing == "local" else LAN)
        gcfg = dataclasses.replace(gcfg, fanout=cfg.peers.fanout)
        client = PeerClient(self.reactor, tls.client_policy(creds), observer=self.metrics)
        self.paxos_transport = PaxosTransport(
            self.host_id, client, self.peer_address_of, lambda: self.peer_address, leases=self.leases
        )
        from vmwebd.api.peer import build_peer_api

        root = Resource()
        inbox = _PeerInbox(self.metrics, self.paxos_transport, lambda: self.gossip)
        peer_api = build_peer_api(
            inbox, gcfg.max_sync_bytes * 2 + (1 << 20), require_identity=True, identity_of=tls.peer_host_id
        )
        root.putChild(
            b"peer", CountingResource(peer_api, lambda n: self.metrics.peer_bytes_received("request", n))
        )
        # Files peers pull from here: content images, and a cold migration's disk and memory.
        root.putChild(b"image", FileResource(image_resolver(self.images), tls.peer_host_id))
        root.putChild(b"migration", FileResource(self.migrations.resolve_file, tls.peer_host_id))
        root.putChild(b"history", self.history.resource(tls.peer_host_id))  # vmwebd/history.py
        root.putChild(b"console", PeerConsoleResource(self.consoles, tls.peer_host_id))
        # Peers POST SOAP, never HTML forms: without form parsing, twisted.web does not read
        # the Content-Type of every request with the email package (~7% of a busy host's CPU).
        site = QuietSite(root, parsePOSTFormSubmission=False)
        site.displayTracebacks = False
        addr = cfg.listen.peer
        self.peer_port = tls.listen_tls(self.reactor, addr.port, site, creds, addr.host)
        listener = Paused("peer endpoint", self.peer_port)
        peer_addr = f"{addr.host}:{self.peer_port.getHost().port}"
        self.peer_address = peer_addr
        state_file = cfg.state_dir / "gossip-state.json"
        cvv, incarnation = load_state(state_file)
        if not any(True for _ in self.domsvc.dom.entities()):
            cvv = {}  # a replica started afresh holds nothing, whatever an old vector says
        own = self.domsvc.dom.version_vector().get(self.host_id)
        if own is not None:
            cvv[self.host_id] = max(own, tuple(cvv.get(self.host_id, (-1, -1))))
        known = tuple((h.id, h.peer) for h in self.domsvc.dom.all(HostRec) if h.id != self.host_id and h.peer)
        # The adapter reads the vector of the core built on it.
        port = DomPortAdapter(
            self.domsvc.dom, me=self.host_id, floor=self.leases.open_ballot_floor, complete=lambda: core.cvv
        )
        core = GossipCore(
            self.host_id,
            peer_addr,
            gcfg,
            random.Random(self.rng.random()),
            port,
            self.reactor.seconds(),
            incarnation=incarnation,
            cvv=cvv,
            seeds=tuple(str(s) for s in cfg.peers.seeds),
            known=known,
        )
        self.gossip = GossipService(
            core, self.domsvc, client, self.reactor, state_file, listeners=[self._member_changed]
        )
        # Stopped (the port closed) after gossip has said goodbye through it.
        self.addService(listener)
        self.addService(Part("gossip", start=self._start_gossip, stop=self._leave_grid))

    def _start_gossip(self) -> None:
        self.gossip.start()
        log.info(
            "host {host} gossiping on {addr} (seeds: {seeds})",
            host=self.host_id,
            addr=self.peer_address,
            seeds=", ".join(str(s) for s in self.config.peers.seeds) or "none",
        )

    @defer.inlineCallbacks
    def _leave_grid(self):
        try:
            yield self.gossip.stop(leave=self._leave).addTimeout(self.LEAVE_SECONDS, self.reactor)
        except defer.TimeoutError:
            log.warn(
                "peers did not hear that host {host} leaves within {s} s; they will find out by probing",
                host=self.host_id,
                s=self.LEAVE_SECONDS,
            )

    @defer.inlineCallbacks
    def _drain_reconciler(self):
        # A pass still running uses the driver: closing it under the pass failed each of its
        # VMs with "driver is closed" in the log of every clean stop.
        try:
            yield self.reconciler.idle().addTimeout(self.DRAIN_SECONDS, self.reactor)
        except defer.TimeoutError:
            log.warn(
                "a reconcile pass on {host} still runs after {s} s; stopping anyway",
                host=self.host_id,
                s=self.DRAIN_SECONDS,
            )
        self.reconciler.stop()

    @defer.inlineCallbacks
    def _stop_api(self):
        self.audit.stop()
        if self.port is not None:
            yield self.port.stopListening()

    def _non_members_alive(self) -> bool:
        """Are there live hosts that are not consensus members (see LeaseService)? Without
        peers, as if there were."""
        if self.gossip is None:
            return True
        return bool(set(self.gossip.core.alive()) - set(self.leases.members()) - {self.host_id})

    def _note_own(self, entities):
        return self.gossip.note_own(entities) if self.gossip is not None else None

    def _push_to(self, hosts):
        return self.gossip.push_to(hosts) if self.gossip is not None else None

    def _lease_lane(self) -> tuple[int, int]:
        """This host's lane (see Allocator.lane): its place among the hosts of the grid that have
        not left, members or not (any host takes requests: hosts outside the consensus members
        sharing one lane kept racing each other for the same values)."""
        hosts = sorted({h.id for h in self.domsvc.dom.all(HostRec) if h.liveness != "left"} | {self.host_id})
        return hosts.index(self.host_id), len(hosts)

    #: A proposer suspected for less than this is still asked (a loaded proposer is slow to
    #: answer probes and is suspected and cleared again and again; switching at every
    #: suspicion made several proposers duel over the same keys).
    PROPOSER_PATIENCE_S = 3.0

    def _proposer_for(self, now: float | None = None) -> str | None:
        """The host that runs this host's consensus operations: the first consensus member (by
        id) the failure detector here calls alive, or suspect for less than
        :attr:`PROPOSER_PATIENCE_S`; None when that is this host (or nobody)."""
        if self.gossip is None:
            return None
        now = self.reactor.seconds() if now is None else now
        for m in sorted(self.leases.members()):
            if m == self.host_id:
                return None
            status = self.gossip.core.status_of(m)
            since = self.gossip.core.suspected_since(m)
            if status == "alive" or (
                status == "suspect" and since is not None and now - since < self.PROPOSER_PATIENCE_S
            ):
                return m
        return None

    def send_peer(self, dst: str, msgs, timeout: float | None = None) -> defer.Deferred:
        """Sends consensus messages to host ``dst``'s peer endpoint, their answers coming back
        inline (dropped if we do not know where it is, or run without peers)."""
        if self.paxos_transport is None:
            return defer.succeed(False)
        return self.paxos_transport.send(dst, msgs, timeout=timeout)

    def balance_tick(self):
        """Every few seconds: when the balancer is on and its interval has passed, one look."""
        from vmwebd.migrate.balancer import policy_from_settings
        from vmwebd.settings import all_settings

        # The policy is read again only when a setting changed (this runs every second).
        gen = self.domsvc.dom.kind_generation("setting")
        if self._policy_gen != gen:
            self._policy_gen = gen
            try:
                self._policy = policy_from_settings(all_settings(self.domsvc.dom))
            except Exception as e:  # a bad value that reached the DOM: say so, do nothing
                log.warn("balancer settings: {err}", err=e)
                self._policy = None
        policy = self._policy
        if policy is None:
            return None
        now = self.now_ms()
        if not policy.enabled or now - self._last_balance < policy.interval_ms:
            return None
        self._last_balance = now
        d = self.migrations.balance(policy)
        d.addErrback(lambda f: log.failure("balancer on {host}", failure=f, host=self.host_id))
        return d

    def peer_address_of(self, host_id: str) -> str | None:
        """Where host ``host_id``'s peer endpoint is (from gossip, else from its DOM record)."""
        m = self.gossip.core.members.get(host_id) if self.gossip is not None else None
        if m is not None:
            return m.addr
        return next((h.peer for h in self.domsvc.dom.all(HostRec) if h.id == host_id and h.peer), None)

    def _member_states(self) -> dict[str, str]:
        """The failure detector's view: host id -> alive, suspect, dead or left (empty without
        peers)."""
        if self.gossip is None:
            return {}
        return {n: m.status for n, m in self.gossip.core.members.items()}

    def live_hosts(self) -> set[str]:
        """Hosts this host does not believe gone: alive or suspect (itself always). What waits
        on a host (a destroy, a migration's other side, an image holder) keeps trying these."""
        if self.gossip is None:
            return {self.host_id}
        return set(self.gossip.core.alive()) | {self.host_id}

    def placeable_hosts(self) -> set[str]:
        """Hosts that may be given new work (VMs placed, migrations' destinations, the
        balancer's targets): those the failure detector here calls alive, not merely suspect (a
        suspect host may be frozen, and what is placed there waits until it is declared dead)."""
        if self.gossip is None:
            return {self.host_id}
        core = self.gossip.core
        return {h for h in core.alive() if core.status_of(h) == "alive"} | {self.host_id}

    #: Bumped on every change of a member's status here: views that say how hosts look from
    #: here (a pending VM's reason) are cached by it.
    membership_generation = 0

    def _member_changed(self, node: str, old, new) -> None:
        if new != old:
            self.membership_generation += 1
        if new in ("dead", "left") and old != new:
            self.migrations.host_down(node)

    def sweep(self):
        """Every SWEEP_SECONDS: migrations stuck on a gone host, and VMs that never ran on a
        dead host (re-placed elsewhere)."""
        return defer.DeferredList(
            [self.migrations.sweep(), self.migrations.replace_never_ran()], consumeErrors=True
        )

    def liveness(self, host_id: str) -> str:
        if host_id == self.host_id:
            return "alive"
        if self.gossip is None:
            return "unknown"
        return self.gossip.core.status_of(host_id) or "unknown"

    @defer.inlineCallbacks
    def _ensure_storage(self):
        cfg = self.config
        yield self.driver.ensure_pool(cfg.storage.pool, str(cfg.storage.dir))
        for img in cfg.images:  # blank images: every host makes its own, empty
            yield self.driver.create_base_volume(cfg.storage.pool, img.file, img.size_mib, img.format)

    def _publish_static(self):
        """Writes templates and images from the config into the DOM where they differ."""
        cfg = self.config
        dom = self.domsvc.dom
        templates = load_templates(cfg.templates_dir, cfg.image_names, cfg.ip_pool_names)
        recs = []
        for name, t in sorted(templates.items()):
            rec = TemplateRec(id=name, description=t.description, body=(to_dom_body(t),))
            cur = dom.get(TemplateRec, name)
            if (
                cur is None
                or cur.description != rec.description
                or [_xml(b) for b in cur.body] != [_xml(b) for b in rec.body]
            ):
                recs.append(rec)
        for img in cfg.images:
            rec = ImageRec(id=img.name, file=img.file, format=img.format, size_mib=img.size_mib)
            cur = dom.get(ImageRec, img.name)
            if cur is not None and cur.sha256:
                # Registered by content (`vmweb image add`): that one wins over a blank image.
                log.warn(
                    "image {name} of the config is a content image in the grid; the config's "
                    "blank image is not used",
                    name=img.name,
                )
            elif cur != rec:
                recs.append(rec)
        return self.domsvc.put(*recs)

    #: A host record unchanged in substance is still rewritten this often (its load and free
    #: memory, shown to users, and the vector it publishes).
    REFRESH_SECONDS = 60.0

    def _worth_writing(self, prev: HostRec | None, rec: HostRec, held: dict) -> bool:
        """Is ``rec`` worth a write (and a rumor to every host)? At rest, not every heartbeat:
        a grid of N hosts would otherwise spread N records every heartbeat forever."""
        if prev is None or self.now_ms() - self._record_written_ms >= self.REFRESH_SECONDS * 1000:
            return True
        if (
            dataclasses.replace(rec, load1=prev.load1, free_memory_mib=prev.free_memory_mib, cvv=prev.cvv)
            != prev
        ):
            return True  # capacity, addresses, images, VM count, liveness
        if abs(rec.load1 - prev.load1) >= max(0.5, 0.25 * rec.cpus) or abs(
            rec.free_memory_mib - prev.free_memory_mib
        ) >= 0.1 * max(rec.memory_mib, 1):
            return True
        # What we hold moved on from what the record publishes, by more than host records: each
        # host's own record moves its origin on, and counting that would have every host rewrite
        # its record because the others did, forever.
        published = parse_cvv(prev.cvv)
        dom = self.domsvc.dom
        for o in held.keys() | published.keys():
            lo, hi = published.get(o, (-1, -1)), held.get(o, (-1, -1))
            if hi < lo or (hi > lo and dom.wrote_between(o, lo, hi, skip=("host", o))):
                return True
        return False

    @defer.inlineCallbacks
    def heartbeat(self):
        """Writes this host's record (capacity, load, VM count) when it changed in substance or
        ``REFRESH_SECONDS`` have passed; only this host writes it."""
        facts = yield self.driver.host_facts()
        cfg = self.config
        prev = self.domsvc.dom.get(HostRec, self.host_id)
        rec = HostRec(
            id=self.host_id,
            api=self.advertised_api,
            peer=self.peer_address or str(cfg.listen.peer),
            liveness="alive",
            incarnation=prev.incarnation if prev else 0,
            cpus=cfg.host.cpus or facts.cpus,
            memory_mib=cfg.host.memory_mib or facts.memory_mib,
            free_memory_mib=facts.free_memory_mib,
            load1=round(facts.load1, 2),
            vms=self.domsvc.dom.count("vm", "host", self.host_id),
            started_at=prev.started_at if prev else self.now_ms(),
            images=self.images.images_attr(),
            migrate_uri=self.migrations.migrate_uri,
            cvv="",
            underlay=self.underlay,
        )
        held = dict(self.complete_vector())
        rec = dataclasses.replace(rec, cvv=format_cvv(held))
        if self._worth_writing(prev, rec, held):
            self._record_written_ms = self.now_ms()
            # What ``held`` covers was merged before this barrier: on disk once it fires, so the
            # vector we publish never claims what a crash could lose (vmwebd/dom/gc.py).
            yield self.domsvc.barrier()
            yield self.domsvc.put(rec)
        yield self.collect_tombstones()

    def complete_vector(self) -> dict:
        """Up to where this replica holds everything, per origin: the gossip core's vector. A host
        without peers can receive nothing more, so it holds everything up to its clock's latest
        reading, from every host it knows (no scan of the DOM)."""
        if self.gossip is not None:
            return self.gossip.core.cvv
        dom = self.domsvc.dom
        latest = dom.clock.reading()
        return {h.id: latest for h in dom.all(HostRec)} | {self.host_id: latest}

    def collect_tombstones(self) -> defer.Deferred:
        """Forgets the tombstones every host is known to hold (vmwebd/dom/gc.py)."""
        settle_ms = int(float(get_setting(self.domsvc.dom, "dom.tombstone-settle")) * 1000)
        members = tuple(self.gossip.core.members) if self.gossip is not None else ()
        keys = collectable(self.domsvc.dom, self.complete_vector(), int(self.now_ms()), settle_ms, members)
        if not keys:
            return defer.succeed(0)

        def done(n):
            if n:
                log.info("collected {n} tombstones every host holds", n=n)
            return n

        return self.domsvc.forget(keys).addCallback(done)

    def listen(self):
        """Serves the user API: the web pages at ``/``, SOAP at ``/soap`` (HTTP Basic) and, unless
        the config turns it off, Prometheus metrics at ``/metrics``, after
        making the user in ``<state dir>/bootstrap-admin`` an admin if that file exists."""
        from vmwebd.api.service import build_user_api
        from vmwebd.auth import Authenticator, BasicAuthGuard, apply_bootstrap_admin
        from vmwebd.web.site import WebRoot

        # The replica has the admin at once; the file goes once that is durable.
        apply_bootstrap_admin(self.domsvc, self.config.state_dir).addErrback(
            lambda f: log.failure("could not record the bootstrap admin", failure=f)
        )
        self.authn = Authenticator(self.domsvc.dom, self.reactor)
        self.audit.start()
        root = WebRoot(
            self.access,
            reactor=self.reactor,
            host_id=self.host_id,
            dom=self.domsvc.dom,
            manager=self.manager,
            authn=self.authn,
            history=self.history,
            config=self.config,
            gossip_config=lambda: self.gossip.core.cfg if self.gossip is not None else None,
            members=self.leases.members,
        )
        api = build_user_api(
            self.access,
            self.manager,
            self.domsvc.dom,
            self.host_id,
            self.complete_vector,
            self.config.limits.max_request_bytes,
        )
        root.putChild(b"soap", BasicAuthGuard(api, self.authn))
        root.putChild(b"console", UserConsoleResource(self.consoles, root.session_user, self.authn))
        mcfg = self.config.metrics
        if mcfg.enabled:
            root.putChild(
                b"metrics", MetricsPage(self.metrics.registry, mcfg.auth, self.authn, root.session_user)
            )
        self.site = QuietSite(root, soap_observer=self.metrics)
        self.site.displayTracebacks = False
        addr = self.config.listen.api
        tls_options = apitls.server_options(self.config)  # None: api-tls="off"
        if tls_options is not None:
            self.port = self.reactor.listenSSL(addr.port, self.site, tls_options, interface=addr.host)
        else:
            if not apitls.is_loopback(addr.host):
                log.warn(
                    "the user API on {addr} is plain HTTP: passwords and session cookies cross the "
                    "network in clear (set listen/@api-tls to grid or files)",
                    addr=str(addr),
                )
            self.port = self.reactor.listenTCP(addr.port, self.site, interface=addr.host)

    @property
    def api_port(self) -> int:
        return self.port.getHost().port

    @property
    def api_scheme(self) -> str:
        return "http" if self.config.listen.api_tls == "off" else "https"

    @property
    def api_url(self) -> str:
        """``https://host:port`` (or ``http://``): what clients and the web pages' links use."""
        return f"{self.api_scheme}://{Address(self.config.listen.api.host, self.api_port)}"

    @property
    def advertised_api(self) -> str:
        """This host's API in its DOM record: ``host:port`` over HTTP, ``https://host:port`` over TLS."""
        addr = (
            self.config.listen.api
            if self.port is None
            else Address(self.config.listen.api.host, self.api_port)
        )
        return str(addr) if self.api_scheme == "http" else f"https://{addr}"

    @property
    def api_address(self) -> str:
        return f"{self.config.listen.api.host}:{self.api_port}"


def _xml(el) -> bytes:
    return etree.tostring(el, method="c14n")
