"""The daemon's configuration: ``conf/vmwebd.xml``, loaded and validated once at start.

:func:`load_config` reads the file into frozen dataclasses and either returns a complete
:class:`Config` or raises :class:`~vmwebd.errors.ConfigError` naming the file, the line and the
field (``conf/vmwebd.xml:7: listen/@api: '127.0.0.1:99999' is not a valid host:port``). The
daemon never starts half-configured. The resulting object is passed down to whoever needs it;
nothing reads configuration from globals.

Format (every element but ``host`` is optional; defaults are documented on each field)::

    <vmwebd>
      <host id="host1" cpus="8" memory-mib="16384"/>
      <listen api="127.0.0.1:8470" peer="127.0.0.1:8570" api-tls="off"/>
      <state dir="/var/lib/vmwebd"/>
      <libvirt uri="qemu:///system"/>
      <storage pool="vmweb" dir="/var/lib/vmwebd/images"/>
      <images><image name="debian-12" file="debian-12.qcow2" size-mib="2048" format="qcow2"/></images>
      <pools>
        <ip name="lab" cidr="10.77.0.0/16" reserve="10.77.0.0/24"/>
        <mac prefix="52:54:00"/>
        <vni first="100" last="4095"/>
      </pools>
      <limits max-vms-per-cluster="256" max-request-bytes="1048576" max-clusters="1000"/>
      <templates dir="templates"/>
      <reconcile interval="30"/>
      <peers seeds="10.0.0.2:8570 10.0.0.3:8570" fanout="3"/>
      <network underlay="10.0.0.1" underlay-mtu="1500" devices="auto"/>
      <metrics enabled="true" auth="login"/>
    </vmwebd>

``metrics`` serves Prometheus metrics at ``/metrics`` on the api port (docs/metrics.md):
``enabled`` is ``true`` (default) or ``false``; ``auth`` is ``login`` (default: an admin, by HTTP
Basic or the web pages' session) or ``none`` (anyone who reaches the port).

``listen/@api-tls`` is ``off`` (plain HTTP, default), ``grid`` (the host's grid certificate from
``peers/@cert-dir``) or ``files`` (``listen/@api-cert`` and ``listen/@api-key``); see
:mod:`vmwebd.apitls`.

Relative paths (state dir, storage dir, templates dir, ``test:`` URIs, API certificate and key) are
resolved against the
directory of the configuration file, so a config works wherever its directory is moved to.

XML is read with :mod:`vmwebd.xmlsafe` (no DTD, no entities, no network, bounded size), through
:func:`parse_xml` and :func:`read_xml_file`, which :mod:`vmwebd.templates` uses too: they turn its
refusals into :class:`~vmwebd.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os.path
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lxml import etree

from vmwebd import xmlsafe
from vmwebd.apitls import TLS_MODES, CertFileError, check_cert_files
from vmwebd.errors import ConfigError
from vmwebd.ids import HOST_ID_RE, HOST_ID_RULE, is_host_id
from vmwebd.net import addressing
from vmwebd.xmlsafe import UnsafeXml

# -- defaults (each one documented) ------------------------------------------------------------

#: User API and web pages share one port (design.md, "Ports").
DEFAULT_API_PORT = 8470
#: The peer SOAP endpoint has its own port (design.md, "Ports").
DEFAULT_PEER_PORT = 8570
#: Listen on loopback unless told otherwise: exposing the API is an explicit decision.
DEFAULT_LISTEN_HOST = "127.0.0.1"
#: Holds the DOM store and lease state (design.md, "Contracts").
DEFAULT_STATE_DIR = Path("/var/lib/vmwebd")
#: Production hypervisor; tests and the demo use ``test:`` URIs (design.md, "Hypervisor layer").
DEFAULT_LIBVIRT_URI = "qemu:///system"
#: libvirt storage pool holding base images and per-VM overlays.
DEFAULT_STORAGE_POOL = "vmweb"
#: Locally administered unicast prefix QEMU uses by default.
DEFAULT_MAC_PREFIX = "52:54:00"
#: Network ids handed to virtual clusters; 1..99 are left to the site.
DEFAULT_VNI_FIRST = 100
#: Upper end of the network id range (fits a VLAN id as well as a VXLAN VNI).
DEFAULT_VNI_LAST = 4095
#: Largest virtual cluster a user may ask for.
DEFAULT_MAX_VMS_PER_CLUSTER = 256
#: Largest SOAP request body accepted, in bytes (1 MiB).
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
#: Largest number of virtual clusters in the grid.
DEFAULT_MAX_CLUSTERS = 1000
#: Scenario templates directory, relative to the configuration file.
DEFAULT_TEMPLATES_DIR = "templates"
#: Seconds between two full reconciliation passes over the VMs assigned to this host (jittered by
#: 20%). Changes in the DOM are acted on at once; the full pass finds what changed behind our back.
DEFAULT_RECONCILE_INTERVAL = 30.0
#: Number of random peers a change is pushed to at once (rumor fan-out).
DEFAULT_FANOUT = 3
#: Who may read ``/metrics``: ``login`` (an admin) or ``none`` (anyone reaching the api port).
METRICS_AUTH_MODES = ("login", "none")

#: Largest configuration or template file read, in bytes. Real ones are a few KiB.
MAX_XML_FILE_BYTES = 1024 * 1024

# -- value types -------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_POOL_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
_LIBVIRT_POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_INT_RE = re.compile(r"-?[0-9]+")
_FLOAT_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_URI_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*:")
_MAC_PREFIX_RE = re.compile(r"[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}")
_IMAGE_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP address, ``host:port``; IPv6 literals are written ``[::1]:8470``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = False) -> "Address":
        """Parse ``host:port``; raises ``ValueError`` with a message naming the text."""
        bad = ValueError(f"{text!r} is not a valid host:port")
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^:\[\]\s]+):([0-9]{1,5})", text)
        if not m:
            raise bad
        if m.group(1) is not None:
            host, port = m.group(1), int(m.group(2))
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise bad from None
        else:
            host, port = m.group(3), int(m.group(4))
            if not _HOSTNAME_RE.fullmatch(host):
                raise bad
            if all(label.isdigit() for label in host.split(".")):
                # all-numeric names are IPv4 literals, and must be valid ones (no 999.1.1.1)
                try:
                    ipaddress.IPv4Address(host)
                except ValueError:
                    raise bad from None
        if not (0 if allow_port_zero else 1) <= port <= 65535:
            raise bad
        return cls(host, port)


@dataclass(frozen=True, slots=True)
class HostConfig:
    """This physical host."""

    #: Required. Unique in the grid, ``[a-z0-9][a-z0-9-]{0,62}``; written into the DOM.
    id: str
    #: CPUs offered to VMs; ``None`` (default) means what the hypervisor reports.
    cpus: int | None = None
    #: Memory offered to VMs in MiB; ``None`` (default) means what the hypervisor reports.
    memory_mib: int | None = None


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where this daemon listens. Port 0 asks the OS for a free port (tests only)."""

    #: User SOAP API and web pages; default ``127.0.0.1:8470``.
    api: Address = Address(DEFAULT_LISTEN_HOST, DEFAULT_API_PORT)
    #: Peer SOAP endpoint; default ``127.0.0.1:8570``.
    peer: Address = Address(DEFAULT_LISTEN_HOST, DEFAULT_PEER_PORT)
    #: TLS on the user API port: ``off`` (plain HTTP, default), ``grid`` (the host's grid
    #: certificate) or ``files`` (``api_cert``/``api_key``). See :mod:`vmwebd.apitls`.
    api_tls: str = "off"
    #: With ``files``: the server certificate, PEM, optionally followed by intermediate CAs.
    api_cert: Path | None = None
    #: With ``files``: its unencrypted PEM private key.
    api_key: Path | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """The libvirt storage pool for base images and per-VM overlays."""

    #: libvirt pool name; default ``vmweb``.
    pool: str = DEFAULT_STORAGE_POOL
    #: Directory backing the pool; default ``<state dir>/images``.
    dir: Path = DEFAULT_STATE_DIR / "images"
    #: Where real guests' serial consoles are logged; default ``<state dir>/console``.
    console_dir: Path = DEFAULT_STATE_DIR / "console"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """A base image VMs are cloned from (copy-on-write)."""

    #: Name templates refer to, unique.
    name: str
    #: File name inside the storage directory.
    file: str
    #: Virtual disk size in MiB.
    size_mib: int
    #: ``qcow2`` (default) or ``raw``.
    format: str = "qcow2"


@dataclass(frozen=True, slots=True)
class IpPool:
    """An IPv4 address pool VMs get addresses from, and the address plan of the segments of the
    clusters that use it (see :mod:`vmwebd.net.addressing`).

    Usable addresses are those of ``cidr`` minus the network and broadcast addresses, the gateway,
    every ``reserve`` network and, in pools wider than a /24, addresses ending in .0 or .255;
    handed out lowest first.
    """

    name: str
    cidr: ipaddress.IPv4Network
    #: Networks inside ``cidr`` never handed out; default none.
    reserve: tuple[ipaddress.IPv4Network, ...] = ()
    #: The segments' gateway (answered by each host in ``nat`` mode); default the first host
    #: address of ``cidr``. Never handed out.
    gateway: ipaddress.IPv4Address | None = None

    @property
    def gateway_address(self) -> ipaddress.IPv4Address:
        return self.gateway if self.gateway is not None else addressing.default_gateway(self.cidr)

    def addresses(self) -> Iterator[ipaddress.IPv4Address]:
        """Usable addresses, lowest first."""
        gw = self.gateway_address
        for addr in self.cidr.hosts():
            if addressing.leasable(self.cidr, gw, addr) and not any(addr in r for r in self.reserve):
                yield addr

    def first_address(self) -> ipaddress.IPv4Address | None:
        """The lowest usable address, or ``None`` if the reserve covers the whole pool."""
        return next(self.addresses(), None)

    def __contains__(self, addr: object) -> bool:
        """Whether ``addr`` (an address or its text) is a usable address of this pool."""
        try:
            a = ipaddress.IPv4Address(str(addr))
        except ValueError:
            return False
        return addressing.leasable(self.cidr, self.gateway_address, a) and not any(
            a in r for r in self.reserve
        )


@dataclass(frozen=True, slots=True)
class MacPool:
    #: Three octets, lower case, unicast and locally administered; default ``52:54:00``.
    prefix: str = DEFAULT_MAC_PREFIX


@dataclass(frozen=True, slots=True)
class VniRange:
    """Network ids handed to virtual clusters, both ends included."""

    #: Default 100.
    first: int = DEFAULT_VNI_FIRST
    #: Default 4095.
    last: int = DEFAULT_VNI_LAST


@dataclass(frozen=True, slots=True)
class Limits:
    #: Default 256.
    max_vms_per_cluster: int = DEFAULT_MAX_VMS_PER_CLUSTER
    #: Default 1 MiB.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Default 1000.
    max_clusters: int = DEFAULT_MAX_CLUSTERS


@dataclass(frozen=True, slots=True)
class PeersConfig:
    """Peer discovery. Parsed and validated now; used by the gossip layer."""

    #: Peer endpoints contacted at start to join the grid; default none (first host).
    seeds: tuple[Address, ...] = ()
    #: Peers a change is pushed to at once; default 3.
    fanout: int = DEFAULT_FANOUT
    #: This host's cluster certificate, key and the CA certificate; default ``<state dir>/pki``.
    cert_dir: Path | None = None
    #: Host ids of the consensus members (Paxos acceptors) when the grid starts; default: this
    #: host alone. Every host of a grid must list the same ones; later changes go through
    #: consensus (AddHost / RemoveHost).
    members: tuple[str, ...] = ()
    #: Protocol timing preset: ``lan`` (memberlist's LAN intervals, default) or ``local``
    #: (faster, for tests and demos on one machine).
    timing: str = "lan"


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """How this host carries its clusters' segments (see :mod:`vmwebd.net.plan`)."""

    #: The address other hosts send this host's VXLAN traffic to, which must be on one of its
    #: interfaces; ``None`` (default): the address of ``listen/@peer``.
    underlay: str | None = None
    #: The underlay's MTU; guests get 50 bytes less (the VXLAN header). Default 1500.
    underlay_mtu: int = addressing.DEFAULT_UNDERLAY_MTU
    #: ``auto`` (default): real devices (netlink, nftables) unless the hypervisor is libvirt's
    #: test driver; ``kernel``: always real; ``record``: planned and recorded only.
    devices: str = "auto"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics at ``/metrics`` on the api port (see docs/metrics.md)."""

    #: Served at all; default True.
    enabled: bool = True
    #: ``login`` (default): an admin's HTTP Basic credentials or web session; ``none``: anyone.
    auth: str = "login"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration of one daemon."""

    host: HostConfig
    #: Directory of scenario templates (absolute, exists when loaded from a file).
    templates_dir: Path
    listen: ListenConfig = ListenConfig()
    #: DOM store and lease state; default ``/var/lib/vmwebd``.
    state_dir: Path = DEFAULT_STATE_DIR
    #: Any libvirt URI; relative ``test:`` paths are made absolute. Default ``qemu:///system``.
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    #: How other hosts reach this host's libvirt for live migration; empty: cold moves only.
    migrate_uri: str = ""
    storage: StorageConfig = StorageConfig()
    images: tuple[ImageConfig, ...] = ()
    ip_pools: tuple[IpPool, ...] = ()
    mac: MacPool = MacPool()
    vni: VniRange = VniRange()
    limits: Limits = Limits()
    #: Seconds between full reconciliation passes; default 30.0.
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL
    peers: PeersConfig = PeersConfig()
    network: NetworkConfig = NetworkConfig()
    metrics: MetricsConfig = MetricsConfig()
    #: The file this was loaded from (``None`` when built in code).
    source: Path | None = None

    def with_overrides(self, **changes) -> "Config":
        """A copy with some top-level fields replaced (for tests; not re-validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def image_names(self) -> frozenset[str]:
        return frozenset(i.name for i in self.images)

    @property
    def ip_pool_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.ip_pools)

    def image(self, name: str) -> ImageConfig | None:
        return next((i for i in self.images if i.name == name), None)

    def ip_pool(self, name: str) -> IpPool | None:
        return next((p for p in self.ip_pools if p.name == name), None)


# -- safe XML reading (shared with templates.py) -----------------------------------------------


# comments are dropped so they never count as content.
_XML_OPTIONS = {"remove_comments": True}


def _config_error(e: UnsafeXml) -> ConfigError:
    return ConfigError(e.source, e.line, "file" if e.field == "size" else e.field, e.reason)


def parse_xml(data: bytes, source: str, max_bytes: int = MAX_XML_FILE_BYTES) -> etree._Element:
    """Parse untrusted XML safely into its root element, or raise ConfigError naming ``source``.

    Refuses documents larger than ``max_bytes``, any DOCTYPE (hence any entity declaration),
    entity references and processing instructions (:func:`vmwebd.xmlsafe.parse`, strict).
    """
    try:
        return xmlsafe.parse(data, source, max_bytes, xml_parser=xmlsafe.parser(**_XML_OPTIONS), strict=True)
    except UnsafeXml as e:
        raise _config_error(e) from None


def read_xml_file(path: str | Path, max_bytes: int = MAX_XML_FILE_BYTES) -> etree._Element:
    """Read and safely parse an XML file (see :func:`parse_xml`); errors name the file."""
    try:
        return xmlsafe.read_file(str(path), max_bytes, xml_parser=xmlsafe.parser(**_XML_OPTIONS), strict=True)
    except UnsafeXml as e:
        raise _config_error(e) from None


# -- element checking helpers (shared with templates.py) ---------------------------------------


class ElementReader:
    """Checks one XML file's elements and attributes, raising ConfigError with file/line/field.

    Fields are named by their path below the root element: ``listen/@api``, ``pools/ip/@cidr``.
    """

    def __init__(self, source: str):
        self.source = source

    def error(self, el: etree._Element | None, field: str, message: str) -> ConfigError:
        return ConfigError(self.source, el.sourceline if el is not None else None, field, message)

    def attrs(
        self, el: etree._Element, where: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
    ) -> dict[str, str]:
        """The attributes of ``el``; unknown ones and missing required ones are errors."""
        allowed = required + optional
        for name in el.attrib:
            if name not in allowed:
                raise self.error(
                    el,
                    _join(where, "@" + name),
                    f"unknown attribute (allowed: {', '.join(allowed) or 'none'})",
                )
        for name in required:
            if name not in el.attrib:
                raise self.error(el, _join(where, "@" + name), "required attribute is missing")
        return dict(el.attrib)

    def children(
        self, el: etree._Element, where: str, single: tuple[str, ...] = (), multiple: tuple[str, ...] = ()
    ) -> dict[str, list[etree._Element]]:
        """Child elements by tag; unknown tags, repeated singletons and stray text are errors."""
        found: dict[str, list[etree._Element]] = {t: [] for t in single + multiple}
        if el.text and el.text.strip():
            raise self.error(el, where or el.tag, f"unexpected text {el.text.strip()[:40]!r}")
        for child in el:
            if child.tail and child.tail.strip():
                raise self.error(child, where or el.tag, f"unexpected text {child.tail.strip()[:40]!r}")
            tag = child.tag if isinstance(child.tag, str) else str(child.tag)
            if tag not in found:
                allowed = ", ".join(single + multiple) or "none"
                raise self.error(child, _join(where, tag), f"unknown element (allowed here: {allowed})")
            if tag in single and found[tag]:
                raise self.error(
                    child,
                    _join(where, tag),
                    f"may appear only once (first at line {found[tag][0].sourceline})",
                )
            found[tag].append(child)
        return found

    def integer(self, el: etree._Element, field: str, text: str, lo: int, hi: int) -> int:
        if not _INT_RE.fullmatch(text):
            raise self.error(el, field, f"{text!r} is not an integer")
        value = int(text)
        if not lo <= value <= hi:
            raise self.error(el, field, f"{value} is out of range {lo}..{hi}")
        return value

    def number(self, el: etree._Element, field: str, text: str, lo: float, hi: float) -> float:
        if not _FLOAT_RE.fullmatch(text):
            raise self.error(el, field, f"{text!r} is not a number")
        value = float(text)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise self.error(el, field, f"{text} is out of range {lo}..{hi}")
        return value

    def matching(self, el: etree._Element, field: str, text: str, pattern: re.Pattern, what: str) -> str:
        if not pattern.fullmatch(text):
            raise self.error(el, field, f"{text!r} is not a valid {what}")
        return text


def _join(where: str, name: str) -> str:
    return f"{where}/{name}" if where else name


# -- the loader --------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Load and validate a daemon configuration file; returns a complete Config or raises.

    Raises :class:`~vmwebd.errors.ConfigError` naming the file, line and field of the first
    problem found.
    """
    path = Path(path)
    root = read_xml_file(path)
    return _Loader(str(path), path.resolve().parent).load(root, source=path)


class _Loader(ElementReader):
    def __init__(self, source: str, base_dir: Path):
        super().__init__(source)
        self.base = base_dir

    def _path(self, text: str) -> Path:
        # Relative to the config file's directory; normalised but symlinks kept.
        p = Path(text).expanduser()
        return Path(_normpath(p if p.is_absolute() else self.base / p))

    def load(self, root: etree._Element, source: Path) -> Config:
        if root.tag != "vmwebd":
            raise self.error(root, str(root.tag), "the root element must be <vmwebd>")
        self.attrs(root, "vmwebd")
        kids = self.children(
            root,
            "",
            single=(
                "host",
                "listen",
                "state",
                "libvirt",
                "storage",
                "images",
                "pools",
                "limits",
                "templates",
                "reconcile",
                "peers",
                "network",
                "metrics",
            ),
        )

        def one(tag):
            return kids[tag][0] if kids[tag] else None

        if one("host") is None:
            raise self.error(root, "host", "required element is missing (<host id=\"...\"/>)")
        host = self._host(one("host"))
        listen = self._listen(one("listen"))
        state_dir = self._state(one("state"))
        libvirt_uri = self._libvirt(one("libvirt"))
        migrate_uri = self._migrate_uri(one("libvirt"))
        storage = self._storage(one("storage"), state_dir)
        images = self._images(one("images"))
        ip_pools, mac, vni = self._pools(one("pools"))
        limits = self._limits(one("limits"))
        templates_dir = self._templates(one("templates"), root)
        reconcile = self._reconcile(one("reconcile"))
        peers = self._peers(one("peers"))
        network = self._network_config(one("network"), listen)
        metrics = self._metrics(one("metrics"))
        if listen.api.port and listen.api == listen.peer:
            raise self.error(
                one("listen"), "listen/@peer", f"is the same address as listen/@api ({listen.api})"
            )
        if listen.api_tls == "grid":
            cert_dir = peers.cert_dir or state_dir / "pki"
            if not (cert_dir / "host.crt").is_file():
                raise self.error(
                    one("listen"),
                    "listen/@api-tls",
                    f"'grid' serves the host's grid certificate, but {cert_dir / 'host.crt'} "
                    "does not exist (make it with `vmweb init` or `vmweb host add`, or set "
                    "peers/@cert-dir)",
                )
        return Config(
            host=host,
            templates_dir=templates_dir,
            listen=listen,
            state_dir=state_dir,
            libvirt_uri=libvirt_uri,
            migrate_uri=migrate_uri,
            storage=storage,
            images=images,
            ip_pools=ip_pools,
            mac=mac,
            vni=vni,
            limits=limits,
            reconcile_interval=reconcile,
            peers=peers,
            network=network,
            metrics=metrics,
            source=source,
        )

    def _host(self, el) -> HostConfig:
        self.children(el, "host")
        a = self.attrs(el, "host", required=("id",), optional=("cpus", "memory-mib"))
        hid = self.matching(el, "host/@id", a["id"], HOST_ID_RE, HOST_ID_RULE)
        cpus = self.integer(el, "host/@cpus", a["cpus"], 1, 4096) if "cpus" in a else None
        mem = (
            self.integer(el, "host/@memory-mib", a["memory-mib"], 64, 64 * 1024 * 1024)
            if "memory-mib" in a
            else None
        )
        return HostConfig(hid, cpus, mem)

    def _address(self, el, field, text, allow_port_zero=False) -> Address:
        try:
            return Address.parse(text, allow_port_zero=allow_port_zero)
        except ValueError as e:
            raise self.error(el, field, str(e)) from None

    def _listen(self, el) -> ListenConfig:
        if el is None:
            return ListenConfig()
        self.children(el, "listen")
        a = self.attrs(el, "listen", optional=("api", "peer", "api-tls", "api-cert", "api-key"))
        d = ListenConfig()
        api = self._address(el, "listen/@api", a["api"], True) if "api" in a else d.api
        peer = self._address(el, "listen/@peer", a["peer"], True) if "peer" in a else d.peer
        tls = a.get("api-tls", d.api_tls)
        if tls not in TLS_MODES:
            raise self.error(el, "listen/@api-tls", f"{tls!r} is not one of {', '.join(TLS_MODES)}")
        files = {}
        for name in ("api-cert", "api-key"):
            field = f"listen/@{name}"
            if tls != "files":
                if name in a:
                    raise self.error(el, field, f'is only used with api-tls="files" (here {tls!r})')
                continue
            if not a.get(name, "").strip():
                raise self.error(el, field, 'is required with api-tls="files"')
            files[name] = self._path(a[name])
        for name, path in files.items():
            if not path.is_file():
                raise self.error(el, f"listen/@{name}", f"file {str(path)!r} does not exist")
        if files:
            try:
                check_cert_files(files["api-cert"], files["api-key"])
            except CertFileError as e:
                raise self.error(el, f"listen/@api-{e.role}", str(e)) from None
        return ListenConfig(api, peer, tls, files.get("api-cert"), files.get("api-key"))

    def _state(self, el) -> Path:
        if el is None:
            return DEFAULT_STATE_DIR
        self.children(el, "state")
        a = self.attrs(el, "state", required=("dir",))
        if not a["dir"].strip():
            raise self.error(el, "state/@dir", "is empty")
        return self._path(a["dir"])

    def _migrate_uri(self, el) -> str:
        """``<libvirt migrate-uri=...>``: the URI other hosts' libvirtd use to reach this one for
        live migrations (peer to peer), e.g. ``qemu+tls://host7.lab/system``. Empty: VMs come
        here by cold migration only."""
        if el is None:
            return ""
        uri = el.get("migrate-uri", "")
        if uri and (
            not _URI_SCHEME_RE.match(uri) or any(c.isspace() for c in uri) or uri.startswith("test:")
        ):
            raise self.error(
                el,
                "libvirt/@migrate-uri",
                f"{uri!r} is not a libvirt URI another host can reach (e.g. qemu+tls://host7.lab/system)",
            )
        return uri

    def _libvirt(self, el) -> str:
        if el is None:
            return DEFAULT_LIBVIRT_URI
        self.children(el, "libvirt")
        uri = self.attrs(el, "libvirt", required=("uri",), optional=("migrate-uri",))["uri"]
        if not _URI_SCHEME_RE.match(uri) or any(c.isspace() for c in uri):
            raise self.error(el, "libvirt/@uri", f"{uri!r} is not a libvirt URI (e.g. qemu:///system)")
        # test:relative/host.xml -> test:///ABSOLUTE/host.xml, so each simulated host is its own
        # in-memory hypervisor wherever the daemon is started from.
        m = re.fullmatch(r"test:([^/].*)", uri)
        if m:
            target = self._path(m.group(1))
            if not target.is_file():
                raise self.error(el, "libvirt/@uri", f"test driver file {str(target)!r} does not exist")
            uri = f"test://{target}"
        elif uri.startswith("test:///") and uri != "test:///default":
            target = Path(uri[len("test://") :])
            if not target.is_file():
                raise self.error(el, "libvirt/@uri", f"test driver file {str(target)!r} does not exist")
        return uri

    def _storage(self, el, state_dir: Path) -> StorageConfig:
        default_dir = state_dir / "images"
        default_console = state_dir / "console"
        if el is None:
            return StorageConfig(DEFAULT_STORAGE_POOL, default_dir, default_console)
        self.children(el, "storage")
        a = self.attrs(el, "storage", optional=("pool", "dir", "console-dir"))
        pool = self.matching(
            el, "storage/@pool", a.get("pool", DEFAULT_STORAGE_POOL), _LIBVIRT_POOL_RE, "libvirt pool name"
        )
        for key in ("dir", "console-dir"):
            if key in a and not a[key].strip():
                raise self.error(el, f"storage/@{key}", "is empty")
        return StorageConfig(
            pool,
            self._path(a["dir"]) if "dir" in a else default_dir,
            self._path(a["console-dir"]) if "console-dir" in a else default_console,
        )

    def _images(self, el) -> tuple[ImageConfig, ...]:
        if el is None:
            return ()
        self.attrs(el, "images")
        seen: dict[str, int] = {}
        out = []
        for im in self.children(el, "images", multiple=("image",))["image"]:
            self.children(im, "images/image")
            a = self.attrs(im, "images/image", required=("name", "file", "size-mib"), optional=("format",))
            name = self.matching(im, "images/image/@name", a["name"], _NAME_RE, "image name")
            if name in seen:
                raise self.error(
                    im, "images/image/@name", f"duplicate image name {name!r} (first at line {seen[name]})"
                )
            seen[name] = im.sourceline
            f = a["file"]
            if not f or "/" in f or f in (".", "..") or "\0" in f:
                raise self.error(
                    im, "images/image/@file", f"{f!r} must be a plain file name inside the storage dir"
                )
            size = self.integer(im, "images/image/@size-mib", a["size-mib"], 1, 16 * 1024 * 1024)
            fmt = a.get("format", "qcow2")
            if fmt not in _IMAGE_FORMATS:
                raise self.error(
                    im, "images/image/@format", f"{fmt!r} is not one of {', '.join(_IMAGE_FORMATS)}"
                )
            out.append(ImageConfig(name, f, size, fmt))
        return tuple(out)

    def _pools(self, el):
        if el is None:
            return (), MacPool(), VniRange()
        self.attrs(el, "pools")
        kids = self.children(el, "pools", single=("mac", "vni"), multiple=("ip",))
        ip_pools = self._ip_pools(kids["ip"])
        mac = self._mac(kids["mac"][0]) if kids["mac"] else MacPool()
        vni = self._vni(kids["vni"][0]) if kids["vni"] else VniRange()
        return ip_pools, mac, vni

    def _network(self, el, field, text) -> ipaddress.IPv4Network:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise self.error(el, field, f"{text!r} is not a valid CIDR network ({e})") from None
        if not isinstance(net, ipaddress.IPv4Network):
            raise self.error(el, field, f"{text!r}: only IPv4 pools are supported")
        return net

    def _ip_pools(self, els) -> tuple[IpPool, ...]:
        out: list[IpPool] = []
        lines: dict[str, int] = {}
        for el in els:
            self.children(el, "pools/ip")
            a = self.attrs(el, "pools/ip", required=("name", "cidr"), optional=("reserve", "gateway"))
            name = self.matching(
                el, "pools/ip/@name", a["name"], _POOL_NAME_RE, "pool name ([a-z][a-z0-9-]{0,30})"
            )
            if name in lines:
                raise self.error(
                    el, "pools/ip/@name", f"duplicate pool name {name!r} (first at line {lines[name]})"
                )
            cidr = self._network(el, "pools/ip/@cidr", a["cidr"])
            if cidr.prefixlen > 30:
                raise self.error(el, "pools/ip/@cidr", f"{a['cidr']!r} is too small (at most /30)")
            for other in out:
                if cidr.overlaps(other.cidr):
                    raise self.error(
                        el,
                        "pools/ip/@cidr",
                        f"{cidr} overlaps pool {other.name!r} ({other.cidr}, line {lines[other.name]})",
                    )
            reserve = []
            for part in a.get("reserve", "").replace(",", " ").split():
                r = self._network(el, "pools/ip/@reserve", part)
                if not r.subnet_of(cidr):
                    raise self.error(el, "pools/ip/@reserve", f"{r} is not inside {cidr}")
                reserve.append(r)
            gateway = None
            if "gateway" in a:
                try:
                    gateway = ipaddress.IPv4Address(a["gateway"])
                except ValueError:
                    raise self.error(
                        el, "pools/ip/@gateway", f"{a['gateway']!r} is not an IPv4 address"
                    ) from None
                if gateway not in cidr or gateway in (cidr.network_address, cidr.broadcast_address):
                    raise self.error(el, "pools/ip/@gateway", f"{gateway} is not a host address of {cidr}")
            pool = IpPool(name, cidr, tuple(reserve), gateway)
            if pool.first_address() is None:
                field = "pools/ip/@reserve" if reserve else "pools/ip/@cidr"
                raise self.error(
                    el,
                    field,
                    f"leaves no address for a VM in {cidr} besides its gateway {pool.gateway_address}",
                )
            lines[name] = el.sourceline
            out.append(pool)
        return tuple(out)

    def _mac(self, el) -> MacPool:
        self.children(el, "pools/mac")
        a = self.attrs(el, "pools/mac", required=("prefix",))
        text = a["prefix"].lower()
        if not _MAC_PREFIX_RE.fullmatch(text):
            raise self.error(el, "pools/mac/@prefix", f"{a['prefix']!r} is not three octets like 52:54:00")
        first = int(text[:2], 16)
        if first & 0x01:
            raise self.error(el, "pools/mac/@prefix", f"{text!r} is a multicast prefix")
        if not first & 0x02:
            raise self.error(
                el,
                "pools/mac/@prefix",
                f"{text!r} is not locally administered "
                "(second bit of the first octet unset; use e.g. 52:54:00)",
            )
        return MacPool(text)

    def _vni(self, el) -> VniRange:
        self.children(el, "pools/vni")
        a = self.attrs(el, "pools/vni", optional=("first", "last"))
        top = 2**24 - 1  # VXLAN VNIs are 24 bits
        first = (
            self.integer(el, "pools/vni/@first", a["first"], 1, top) if "first" in a else DEFAULT_VNI_FIRST
        )
        last = self.integer(el, "pools/vni/@last", a["last"], 1, top) if "last" in a else DEFAULT_VNI_LAST
        if first > last:
            raise self.error(el, "pools/vni/@last", f"{last} is below first ({first})")
        return VniRange(first, last)

    def _limits(self, el) -> Limits:
        if el is None:
            return Limits()
        self.children(el, "limits")
        a = self.attrs(el, "limits", optional=("max-vms-per-cluster", "max-request-bytes", "max-clusters"))
        d = Limits()

        def get(name, default, lo, hi):
            return self.integer(el, f"limits/@{name}", a[name], lo, hi) if name in a else default

        return Limits(
            max_vms_per_cluster=get("max-vms-per-cluster", d.max_vms_per_cluster, 1, 100_000),
            max_request_bytes=get("max-request-bytes", d.max_request_bytes, 1024, 256 * 1024 * 1024),
            max_clusters=get("max-clusters", d.max_clusters, 1, 1_000_000),
        )

    def _templates(self, el, root) -> Path:
        text = DEFAULT_TEMPLATES_DIR
        if el is not None:
            self.children(el, "templates")
            text = self.attrs(el, "templates", required=("dir",))["dir"]
        d = self._path(text) if text.strip() else None
        if d is None or not d.is_dir():
            shown = str(d) if d is not None else text
            raise self.error(
                el if el is not None else root, "templates/@dir", f"directory {shown!r} does not exist"
            )
        return d

    def _reconcile(self, el) -> float:
        if el is None:
            return DEFAULT_RECONCILE_INTERVAL
        self.children(el, "reconcile")
        a = self.attrs(el, "reconcile", optional=("interval",))
        if "interval" not in a:
            return DEFAULT_RECONCILE_INTERVAL
        return self.number(el, "reconcile/@interval", a["interval"], 0.05, 3600.0)

    def _peers(self, el) -> PeersConfig:
        if el is None:
            return PeersConfig()
        self.children(el, "peers")
        a = self.attrs(el, "peers", optional=("seeds", "fanout", "cert-dir", "timing", "members"))
        seeds = tuple(
            self._address(el, "peers/@seeds", s) for s in a.get("seeds", "").replace(",", " ").split()
        )
        fanout = self.integer(el, "peers/@fanout", a["fanout"], 1, 64) if "fanout" in a else DEFAULT_FANOUT
        cert_dir = self._path(a["cert-dir"]) if a.get("cert-dir") else None
        timing = a.get("timing", "lan")
        if timing not in ("lan", "local"):
            raise self.error(el, "peers/@timing", f"{timing!r} is not a timing preset (lan, local)")
        members = tuple(a.get("members", "").replace(",", " ").split())
        for m in members:
            if not is_host_id(m):
                raise self.error(el, "peers/@members", f"{m!r} is not a host id")
        if len(set(members)) != len(members):
            raise self.error(el, "peers/@members", "lists a host twice")
        return PeersConfig(seeds, fanout, cert_dir, members, timing)

    def _metrics(self, el) -> MetricsConfig:
        if el is None:
            return MetricsConfig()
        self.children(el, "metrics")
        a = self.attrs(el, "metrics", optional=("enabled", "auth"))
        enabled = a.get("enabled", "true")
        if enabled not in ("true", "false"):
            raise self.error(el, "metrics/@enabled", f"{enabled!r} is not true or false")
        auth = a.get("auth", "login")
        if auth not in METRICS_AUTH_MODES:
            raise self.error(
                el, "metrics/@auth", f"{auth!r} is not an access mode ({', '.join(METRICS_AUTH_MODES)})"
            )
        return MetricsConfig(enabled == "true", auth)

    def _network_config(self, el, listen: ListenConfig) -> NetworkConfig:
        if el is None:
            return NetworkConfig()
        self.children(el, "network")
        a = self.attrs(el, "network", optional=("underlay", "underlay-mtu", "devices"))
        underlay = None
        if "underlay" in a:
            try:
                underlay = str(ipaddress.IPv4Address(a["underlay"]))
            except ValueError:
                raise self.error(
                    el, "network/@underlay", f"{a['underlay']!r} is not an IPv4 address"
                ) from None
            if underlay == "0.0.0.0" or ipaddress.IPv4Address(underlay).is_multicast:
                raise self.error(el, "network/@underlay", f"{underlay} cannot be a host's own address")
        mtu = (
            self.integer(el, "network/@underlay-mtu", a["underlay-mtu"], addressing.MIN_UNDERLAY_MTU, 65535)
            if "underlay-mtu" in a
            else addressing.DEFAULT_UNDERLAY_MTU
        )
        devices = a.get("devices", "auto")
        if devices not in DEVICE_MODES:
            raise self.error(el, "network/@devices", f"{devices!r} is not one of {', '.join(DEVICE_MODES)}")
        return NetworkConfig(underlay, mtu, devices)


#: network/@devices values.
DEVICE_MODES = ("auto", "kernel", "record")


def _normpath(p: Path) -> str:
    return os.path.normpath(str(p))
