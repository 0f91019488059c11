"""The narrow hypervisor interface every driver implements, and the plain values it speaks.

Callers (the reconcile loop, migration, the load balancer) see only this module: names of
domains, pools, volumes and networks go in; frozen dataclasses and paths come out. No libvirt
object, id or error ever crosses this boundary (errors are ``vmwebd.errors.HypervisorError`` and
``NoSuchDomain``).

Every public method returns a ``twisted.internet.defer.Deferred``: drivers do their blocking work
off the reactor thread. Lifecycle operations are idempotent because a reconcile loop calls them
again and again until the observed state matches the desired one.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred

from vmwebd.errors import InvalidArgument

#: The states a domain can be observed in; ``missing`` means "not defined on this host".
DOMAIN_STATES = frozenset({"running", "shutoff", "paused", "crashed", "missing", "other"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class HostFacts:
    """What a host offers: CPUs and memory from the hypervisor, load and free memory measured.

    ``hostname`` is whatever the hypervisor reports; every ``test:///`` host reports the same one,
    so callers identify hosts by their configuration, never by this field.
    """

    cpus: int
    memory_mib: int
    free_memory_mib: int
    load1: float
    hostname: str


@dataclass(frozen=True)
class DomainSpec:
    """Everything needed to define one VM (a libvirt domain) on a host.

    ``metadata`` is stored in the domain definition under our own XML namespace so a host can tell
    which cluster and VM a domain belongs to after a restart. ``ip`` is recorded there too (the
    guest learns it from ``cmdline`` or DHCP, not from this field).
    """

    name: str
    vcpus: int
    memory_mib: int
    disk_path: str
    network: str
    mac: str
    ip: str | None = None
    domain_type: str = "qemu"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    serial_log: str | None = None
    #: The NIC goes on this bridge (a cluster's segment) instead of the libvirt network ``network``.
    bridge: str = ""
    #: The NIC's MTU (0: the hypervisor's default).
    mtu: int = 0
    #: A cloud-init seed (ISO 9660) attached read-only as a CD-ROM.
    seed_path: str | None = None
    # hash=False: a dict is unhashable, and the name already identifies a spec.
    metadata: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if not _NAME_RE.match(self.name or ""):
            raise InvalidArgument("name", f"{self.name!r} is not a valid domain name")
        if not isinstance(self.vcpus, int) or self.vcpus < 1:
            raise InvalidArgument("vcpus", f"domain {self.name!r}: must be a positive integer")
        if not isinstance(self.memory_mib, int) or self.memory_mib < 1:
            raise InvalidArgument("memory_mib", f"domain {self.name!r}: must be a positive integer")
        if not _MAC_RE.match(self.mac or ""):
            raise InvalidArgument("mac", f"domain {self.name!r}: {self.mac!r} is not a lower-case MAC")
        if not self.disk_path:
            raise InvalidArgument("disk_path", f"domain {self.name!r}: must not be empty")
        if not self.network and not self.bridge:
            raise InvalidArgument("network", f"domain {self.name!r}: needs a network or a bridge")
        if not isinstance(self.mtu, int) or not (self.mtu == 0 or 576 <= self.mtu <= 65535):
            raise InvalidArgument("mtu", f"domain {self.name!r}: {self.mtu!r} is not an MTU")
        for key in self.metadata:
            if not isinstance(key, str) or not key:
                raise InvalidArgument("metadata", f"domain {self.name!r}: key {key!r} is not a name")


@dataclass(frozen=True)
class DomainInfo:
    """One observation of a domain; ``state`` is one of ``DOMAIN_STATES``."""

    name: str
    state: str
    vcpus: int
    memory_mib: int
    cpu_time_ns: int

    @classmethod
    def missing(cls, name: str) -> "DomainInfo":
        """The observation of a domain that is not defined on this host."""
        return cls(name=name, state="missing", vcpus=0, memory_mib=0, cpu_time_ns=0)


@dataclass(frozen=True)
class MigrationStats:
    """What a finished live migration moved and cost, as the hypervisor reports it."""

    total_ms: int
    downtime_ms: int
    memory_bytes: int
    disk_bytes: int


class Driver(abc.ABC):
    """A hypervisor on one host, behind the operations vmweb needs and nothing more.

    Capabilities are class attributes so callers can choose a path (live or cold migration)
    without trying and failing. Every method returns a Deferred.
    """

    #: Can a running domain move to another host of the same driver kind without stopping?
    supports_live_migration: bool = False
    #: Are volumes real files on the host's disk (False: in memory, as with the test driver)?
    volumes_on_disk: bool = False
    #: Do guests really run (False: states are simulated, as with the test driver)?
    runs_guests: bool = False

    # -- domains ---------------------------------------------------------------------------
    @abc.abstractmethod
    def define(self, spec: DomainSpec) -> Deferred:
        """Define (or redefine) the domain described by ``spec``; fires with None."""

    @abc.abstractmethod
    def start(self, name: str) -> Deferred:
        """Start a defined domain; no-op when it runs, resumes it when paused.

        Fails with ``NoSuchDomain`` when the domain is not defined."""

    @abc.abstractmethod
    def shutdown(self, name: str) -> Deferred:
        """Ask the guest to power off (ACPI); no-op when it is not running or not defined.

        Fires once the request is made, not when the guest is off: callers look at ``state``
        and ``destroy`` a guest that does not stop in time. Asking again while the guest shuts
        down is harmless."""

    @abc.abstractmethod
    def destroy(self, name: str) -> Deferred:
        """Power the domain off at once; no-op when it is not running or not defined."""

    @abc.abstractmethod
    def undefine(self, name: str) -> Deferred:
        """Remove the domain from this host (destroying it first if it runs); no-op if missing."""

    @abc.abstractmethod
    def list_domains(self) -> Deferred:
        """Fire with a ``list[DomainInfo]`` of every domain defined or running here, by name."""

    @abc.abstractmethod
    def state(self, name: str) -> Deferred:
        """Fire with the ``DomainInfo`` of ``name``; state ``missing`` if not defined (no error)."""

    @abc.abstractmethod
    def stats(self, name: str) -> Deferred:
        """Fire with a dict of counters: ``cpu_time_ns``, ``memory_mib``, ``vcpus``, ``state``, ...

        Fails with ``NoSuchDomain`` when the domain is not defined."""

    @abc.abstractmethod
    def get_metadata(self, name: str) -> Deferred:
        """Fire with the metadata dict stored by ``define`` (``{}`` if the domain has none)."""

    # -- storage ---------------------------------------------------------------------------
    @abc.abstractmethod
    def ensure_pool(self, name: str, path: str) -> Deferred:
        """Make a directory pool ``name`` at ``path`` exist, be built, started and autostarted."""

    @abc.abstractmethod
    def create_base_volume(self, pool: str, name: str, capacity_mib: int, fmt: str = "qcow2") -> Deferred:
        """Create an empty base image (or keep the existing one); fires with its path."""

    @abc.abstractmethod
    def create_overlay(
        self, pool: str, name: str, backing_path: str, capacity_mib: int, backing_format: str = "qcow2"
    ) -> Deferred:
        """Create a qcow2 overlay backed by ``backing_path`` (or keep it); fires with its path."""

    @abc.abstractmethod
    def delete_volume(self, pool: str, name: str) -> Deferred:
        """Delete a volume; no-op when it does not exist."""

    @abc.abstractmethod
    def list_volumes(self, pool: str) -> Deferred:
        """Fire with the sorted ``list[str]`` of volume names in ``pool``."""

    # -- networks --------------------------------------------------------------------------
    @abc.abstractmethod
    def define_network(self, name: str, bridge: str) -> Deferred:
        """Make an isolated network ``name`` on bridge ``bridge`` exist and run."""

    @abc.abstractmethod
    def destroy_network(self, name: str) -> Deferred:
        """Stop and remove network ``name``; no-op when it does not exist."""

    @abc.abstractmethod
    def list_networks(self) -> Deferred:
        """Fire with the sorted ``list[str]`` of network names."""

    # -- moving domains between hosts --------------------------------------------------------
    def volume_allocation(self, pool: str, name: str) -> Deferred:
        """Fire with the bytes a volume really uses on disk (0 when it is not on disk)."""
        raise NotImplementedError

    def migrate_live(
        self, name: str, dest_uri: str, dest_xml: str | None, full_disk: bool = False
    ) -> Deferred:
        """Live-migrate running domain ``name`` to the libvirt at ``dest_uri`` (peer to peer).

        ``full_disk`` False copies only the top image (the overlay, pre-created at the
        destination over its own copy of the base); True copies the whole disk chain flattened.
        Fires with a ``MigrationStats``. On failure the domain keeps running here."""
        raise NotImplementedError

    def save(self, name: str, path: str) -> Deferred:
        """Stop domain ``name`` and write its memory state to ``path`` (cold migration)."""
        raise NotImplementedError

    def restore(self, path: str, xml: str | None = None) -> Deferred:
        """Start a domain from a state file written by ``save`` (with its XML replaced by
        ``xml`` if given)."""
        raise NotImplementedError

    def domain_xml(self, name: str) -> Deferred:
        """Fire with the domain's definition as XML (migratable form)."""
        raise NotImplementedError

    def job_running(self, name: str) -> Deferred:
        """Fire True while a job (such as an outgoing migration) of domain ``name`` runs here;
        False when none does, or the driver keeps no jobs."""
        raise NotImplementedError

    # -- console ---------------------------------------------------------------------------
    def open_console(self, name: str) -> Deferred:
        """Fire with a :class:`ConsoleStream` on running domain ``name``'s serial console (opened
        off the reactor thread); ``HypervisorError`` naming the domain when it has none, is not
        running, or the driver cannot open consoles."""
        from twisted.internet.defer import fail

        from vmwebd.errors import HypervisorError

        return fail(
            HypervisorError(f"open the console of domain {name!r}: this hypervisor driver has no consoles")
        )

    # -- host ------------------------------------------------------------------------------
    @abc.abstractmethod
    def host_facts(self) -> Deferred:
        """Fire with this host's ``HostFacts``."""

    @abc.abstractmethod
    def close(self) -> Deferred:
        """Release the connection and threads; later calls fail with ``HypervisorError``."""


class ConsoleStream(abc.ABC):
    """A domain's serial console as a blocking byte stream, for threads, never the reactor.

    One thread reads until ``read`` answers ``b""`` (the console ended, or ``interrupt`` was
    called), one thread writes, any other thread may ``interrupt``; ``release`` frees everything
    and is called once, by the reader, after its last read and the writer's last write."""

    @abc.abstractmethod
    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes the guest wrote, blocking until some come; ``b""`` at the end."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Sends all of ``data`` to the guest (blocking while the console does not take it)."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Makes a blocked ``read`` (and any later one) end with ``b""``."""

    @abc.abstractmethod
    def release(self) -> None:
        """Frees the console's connection, descriptors or processes."""
