"""Typed records for the entities of the cluster DOM.

A record is a frozen dataclass; its fields map one-to-one to XML attributes (``memory_mib`` is the
attribute ``memory-mib``). ``KIND`` names the entity element; ``PART`` is empty for an entity's main
part, or the name of a sub-part with its own version and its own single writer (a VM's ``status`` is
written only by the host that runs it, its main part by whoever handles the user's request).

Records never hold versions: the :class:`~vmwebd.dom.document.Dom` stamps them on write.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Mapping, TypeVar

from lxml import etree

if TYPE_CHECKING:
    from vmwebd.dom.document import Dom

NS = "urn:vmweb:dom:1"

# kind -> container element name, in document order
CONTAINERS: dict[str, str] = {
    "host": "hosts",
    "user": "users",
    "image": "images",
    "template": "templates",
    "setting": "settings",
    "vcluster": "vclusters",
    "vm": "vms",
    "lease": "leases",
    "migration": "migrations",
    "audit": "audits",
}
# kind -> names of sub-parts (child elements with their own version)
PARTS: dict[str, tuple[str, ...]] = {kind: () for kind in CONTAINERS}
PARTS["vm"] = ("status",)


def attr_name(field: str) -> str:
    return field.replace("_", "-")


RecT = TypeVar("RecT", bound="Record")


class Record:
    """Base of typed DOM records (dataclasses)."""

    KIND: ClassVar[str]
    PART: ClassVar[str] = ""
    id: str

    def to_attrs(self) -> dict[str, str]:
        out = {}
        for name, attr, _conv, _required in _field_specs(type(self)):
            if name == "body":
                continue
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            out[attr] = str(value)
        return out

    def to_body(self) -> list[etree._Element]:
        """Child elements of the main part (opaque payload), e.g. a template's roles."""
        return []

    @classmethod
    def from_attrs(
        cls: type[RecT], id_: str, attrs: Mapping[str, str], body: Iterable[etree._Element] = ()
    ) -> RecT:
        kwargs: dict[str, object] = {}
        for name, attr, conv, required in _field_specs(cls):
            if name == "body":
                kwargs["body"] = tuple(body)
                continue
            raw = attrs.get(attr)
            if raw is None:
                if required:
                    raise ValueError(f"{cls.KIND} {id_!r}: missing attribute {attr!r}")
                continue
            kwargs[name] = conv(raw)
        return cls(id=id_, **kwargs)  # type: ignore[call-arg]  # every subclass is a dataclass


# Per record class: (field, attribute, converter, required) for every field but ``id``. Worked
# out once per class: evaluating the type hints on every decode was most of a busy daemon's time.
_Converter = Callable[[str], object]
_SPECS: dict[type, tuple[tuple[str, str, _Converter, bool], ...]] = {}


def _field_specs(cls: type[Record]) -> tuple[tuple[str, str, _Converter, bool], ...]:
    specs = _SPECS.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls)
        specs = tuple(
            (
                f.name,
                attr_name(f.name),
                _converter(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name != "id"
        )
        _SPECS[cls] = specs
    return specs


def _bool(raw: str) -> bool:
    return raw == "true"


def _converter(hint: object) -> _Converter:
    """The function that turns an attribute's text into a value of type ``hint``."""
    if hint in (str, "str"):
        return str
    origin = typing.get_origin(hint)
    if (
        origin is typing.Union
        or str(origin) == "types.UnionType"
        or origin is not None
        and type(None) in typing.get_args(hint)
    ):
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        return _converter(inner)
    if hint is bool:
        return _bool
    if hint is int:
        return int
    if hint is float:
        return float
    return str


@dataclass(frozen=True)
class HostRec(Record):
    """A physical host; written only by that host."""

    KIND: ClassVar[str] = "host"
    id: str
    api: str = ""
    peer: str = ""
    liveness: str = "alive"  # alive | suspect | dead | left
    incarnation: int = 0
    cpus: int = 0
    memory_mib: int = 0
    free_memory_mib: int = 0
    load1: float = 0.0
    vms: int = 0
    started_at: int = 0  # ms since epoch
    images: str = ""  # names of the content images held here, space-separated
    migrate_uri: str = ""  # libvirt URI other hosts' libvirtd use to live-migrate here
    cvv: str = ""  # what this host holds of the DOM (see vmwebd/dom/gc.py)
    underlay: str = ""  # address other hosts reach its clusters' segments at (VXLAN)


@dataclass(frozen=True)
class UserRec(Record):
    """A user account; id is the user name. Only its hash of the password is kept
    (``scrypt$N$r$p$SALT$HASH``, see :mod:`vmwebd.accounts`), and no view given to a caller shows it."""

    KIND: ClassVar[str] = "user"
    id: str
    role: str = "user"  # admin | user
    password_hash: str = ""
    quota_vms: int = 16
    ssh_keys: str = ""  # OpenSSH public keys, one attribute line (see encode_ssh_keys)

    # One key is ``TYPE BLOB`` or ``TYPE BLOB COMMENT``; type and blob never hold a space or a
    # comma. The attribute joins keys with ``,`` and percent-encodes each comment's ``%``, ``,``,
    # space and every byte outside printable ASCII, so the value is one line of printable ASCII:
    # XML attribute normalisation (newlines and tabs become spaces) cannot change it, and
    # ``ssh-ed25519 AAAA… alice@laptop`` stays readable in the DOM.
    @staticmethod
    def encode_ssh_keys(keys: Iterable[str]) -> str:
        """The ``ssh-keys`` attribute for OpenSSH key lines already checked (see vmwebd.accounts)."""
        from urllib.parse import quote

        out = []
        for key in keys:
            kind, blob, comment = (key.split(" ", 2) + [""])[:3]
            out.append(f"{kind} {blob} {quote(comment, safe=_COMMENT_SAFE)}".rstrip())
        return ",".join(out)

    def ssh_key_list(self) -> tuple[str, ...]:
        """The user's OpenSSH public key lines (``TYPE BLOB [COMMENT]``), in the order added."""
        from urllib.parse import unquote

        out = []
        for item in self.ssh_keys.split(",") if self.ssh_keys else ():
            kind, _, rest = item.partition(" ")
            blob, _, comment = rest.partition(" ")
            out.append(f"{kind} {blob} {unquote(comment)}".rstrip() if comment else f"{kind} {blob}")
        return tuple(out)


#: Printable ASCII a key's comment keeps as is in the ``ssh-keys`` attribute.
_COMMENT_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "%,")


@dataclass(frozen=True)
class ImageRec(Record):
    """A base image VMs are cloned from (copy-on-write overlays on top of it).

    ``size_mib`` is the virtual disk size. With ``sha256`` the image is a content image: its file
    (``bytes`` long) is the same on every host, hosts that lack it fetch it from a host that holds
    it (``HostRec.images``) and check the hash before use. Without one it is a blank image every
    host creates empty. ``kernel``/``initrd``/``cmdline`` boot guests directly (files that must be
    at that path on every host)."""

    KIND: ClassVar[str] = "image"
    id: str
    file: str = ""
    format: str = "qcow2"
    size_mib: int = 0
    sha256: str = ""
    bytes: int = 0
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""


@dataclass(frozen=True)
class TemplateRec(Record):
    """A scenario template; ``body`` holds the template's own XML element."""

    KIND: ClassVar[str] = "template"
    id: str
    description: str = ""
    body: tuple[etree._Element, ...] = ()

    def to_body(self) -> list[etree._Element]:
        return list(self.body)


@dataclass(frozen=True)
class SettingRec(Record):
    KIND: ClassVar[str] = "setting"
    id: str
    value: str = ""


@dataclass(frozen=True)
class VClusterRec(Record):
    """A virtual cluster: desired state written by the host that took the user's request."""

    KIND: ClassVar[str] = "vcluster"
    id: str
    owner: str = ""
    template: str = ""
    count: int = 0
    vni: int = 0
    network: str = ""  # libvirt network name
    bridge: str = ""
    state: str = "active"  # creating | active | destroying
    created_at: int = 0
    token: str = ""  # unique per creation: lease holders carry it
    mode: str = "isolated"  # isolated | nat (from its template, fixed at creation)
    subnet: str = ""  # its segment's IPv4 network, leased (empty: made before segments)
    gateway: str = ""  # the segment's gateway address (nat mode answers it on each host)
    mtu: int = 0  # its guests' MTU (0: the default, see vmwebd/net/addressing.py)
    dns: str = ""  # name servers its guests are given, space-separated


@dataclass(frozen=True)
class VmRec(Record):
    """A VM's desired state; id is ``CLUSTER/NAME``."""

    KIND: ClassVar[str] = "vm"
    id: str
    cluster: str = ""
    name: str = ""
    role: str = ""
    host: str = ""
    vcpus: int = 1
    memory_mib: int = 512
    image: str = ""
    ip: str = ""
    mac: str = ""
    desired: str = "running"  # running | stopped | absent
    token: str = ""  # unique per creation of this VM (a name can come back)
    # How a stop or removal powers the guest off: None asks it to shut down and waits up to the
    # setting stop_timeout_s, True powers it off at once (written only when true, so records
    # that never asked for a forced stop read as before).
    force: bool | None = None


@dataclass(frozen=True)
class VmStatus(Record):
    """A VM's observed state; written only by the host that runs it."""

    KIND: ClassVar[str] = "vm"
    PART: ClassVar[str] = "status"
    id: str
    host: str = ""
    state: str = "pending"  # pending | running | shutoff | paused | crashed | missing | error | absent
    detail: str = ""
    restarts: int = 0
    observed_at: int = 0
    token: str = ""  # the VmRec token it was observed for


@dataclass(frozen=True)
class LeaseRec(Record):
    """A unique thing (address, name, network id) and who holds it."""

    KIND: ClassVar[str] = "lease"
    id: str  # e.g. ip/lab/10.77.1.5, mac/52:54:00:.., name/vcluster/c1, vni/100
    holder: str = ""
    granted_at: int = 0


@dataclass(frozen=True)
class MigrationRec(Record):
    """One move of a VM between hosts; id is a fresh token. Written in turn by the host that took
    the request (phase ``prepare``), the destination (``ready``, and ``restored`` for cold moves)
    and the source (the others); see docs/migration.md for the state diagram."""

    KIND: ClassVar[str] = "migration"
    id: str
    vm: str = ""
    source: str = ""
    dest: str = ""
    phase: str = ""  # prepare ready migrating saved restored done failed
    mode: str = ""  # live | cold
    requested_by: str = ""  # user name, or "balancer"
    started_at: int = 0
    finished_at: int = 0
    bytes: int = 0  # disk + memory bytes moved
    disk_bytes: int = 0
    total_ms: int = 0
    downtime_ms: int = 0
    dest_disk: str = ""  # where the destination put the overlay
    dest_console: str = ""  # and the serial log
    dest_seed: str = ""  # and the guest's cloud-init seed
    error: str = ""


@dataclass(frozen=True)
class AuditRec(Record):
    """One change a user asked of the grid, as the host that took the request answered it
    (see vmwebd/audit.py). Written once by that host, never changed; deleted by it when it holds
    too many or they are too old. ``id`` is ``HOST/WALLMS.COUNTER`` (a clock reading of that
    host: unique, and in order of time per host)."""

    KIND: ClassVar[str] = "audit"
    id: str
    at: int = 0  # ms since epoch, when the request was taken
    host: str = ""  # the host that took it
    user: str = ""  # who asked
    op: str = ""  # the operation, by its SOAP name (CreateCluster, SetQuota...)
    object: str = ""  # what it acted on: cluster/c1, vm/c1/web-0, user/bob, host/h2...
    outcome: str = "ok"  # ok, or the faultcode it was refused or failed with
    detail: str = ""  # the fault's message (shortened), empty when ok
    ms: int = 0  # how long the request took


def status_of(dom: Dom, vm: VmRec) -> VmStatus | None:
    """The observed state of this creation of ``vm``. A VM deleted and created again under the
    same name (a cluster destroyed and re-made, a scale down then up) keeps its old status part
    in the DOM (parts outlive a tombstone in the merge); its token tells the two apart."""
    st = dom.get(VmStatus, vm.id)
    return st if st is not None and st.token == vm.token else None


RECORD_TYPES: list[type[Record]] = [
    HostRec,
    UserRec,
    ImageRec,
    TemplateRec,
    SettingRec,
    VClusterRec,
    VmRec,
    VmStatus,
    LeaseRec,
    MigrationRec,
    AuditRec,
]
