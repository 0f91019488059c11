"""The collaborators one service of a node is given by another, as protocols.

:class:`vmwebd.node.Node` builds every service with what it uses, in its constructor (see
docs/architecture.md, "Wiring"). Most collaborators are another service or one of the node's
views of the grid; those that tests replace with doubles, or that have more than one
implementation (the node's view with peers, a single host's view without), are typed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred


class HostSet(Protocol):
    """A view of the grid's hosts from here: ``live_hosts`` (alive or suspect) or
    ``placeable_hosts`` (alive); always holds this host."""

    def __call__(self) -> set[str]: ...


class Liveness(Protocol):
    """The failure detector's word on a host: alive, suspect, dead, left or unknown."""

    def __call__(self, host_id: str, /) -> str: ...


class PeerDirectory(Protocol):
    """Where a host's peer endpoint is (``host:port``), or None when not known."""

    def __call__(self, host_id: str, /) -> str | None: ...


class Publisher(Protocol):
    """Publishes this host's record again (after what it holds changed); fires once written."""

    def __call__(self) -> Deferred[Any]: ...


class PeerSender(Protocol):
    """Sends consensus messages to a host's peer endpoint; fires True once delivered."""

    def __call__(self, dst: str, msgs: Any, timeout: float | None = None) -> Deferred[Any]: ...


class LeaseReceiver(Protocol):
    """Where consensus messages from peers go (:class:`vmwebd.lease.service.LeaseService`)."""

    def receive(self, src: str, msgs: Any, inline: bool = False) -> Deferred[Any]: ...


class HostFacts(Protocol):
    """What samples this host's load and memory (the hypervisor driver)."""

    def host_facts(self) -> Deferred[Any]: ...


class ConsoleGate(Protocol):
    """A VM's view when ``principal`` may open its console now (NotAuthorized, NoSuchCluster,
    NoSuchVm or ConsoleUnavailable otherwise): the application's ``open_console``."""

    def __call__(self, principal: Any, cluster: str, vm: str, /) -> Any: ...


class ConsoleRelay(Protocol):
    """Reaches a VM's console on another host (:class:`vmwebd.console.wire.Relay`)."""

    def attach(self, host: str, vm_id: str, viewer: Any, user: str) -> Deferred[Any]: ...

    def stop(self) -> None: ...


class BlockingRunner(Protocol):
    """Runs blocking work (file and store I/O) off the reactor thread: ``run(f, *args, **kw)``
    fires with ``f(*args, **kw)`` or its failure. Production runs it on a thread pool; tests on
    a ``task.Clock`` run it at once (:mod:`vmwebd.blocking`). ``start`` and ``stop`` bracket
    its use by the service that owns it (a pool of its own is started and stopped there; a
    shared pool or an inline runner does nothing)."""

    def __call__(self, f: Callable[..., Any], /, *args: Any, **kw: Any) -> Deferred[Any]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class EntitySink(Protocol):
    """Told of own decided leases recorded without a push (``GossipService.note_own``)."""

    def __call__(self, entities: Iterable[Any], /) -> None: ...


__all__ = [
    "HostSet",
    "Liveness",
    "PeerDirectory",
    "Publisher",
    "PeerSender",
    "LeaseReceiver",
    "HostFacts",
    "ConsoleGate",
    "ConsoleRelay",
    "EntitySink",
    "BlockingRunner",
]
