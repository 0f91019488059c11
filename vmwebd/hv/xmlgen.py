"""libvirt XML for domains, pools, volumes and networks, built with lxml (never by formatting).

Pure functions: a spec goes in, a string comes out. lxml escapes every text and attribute, so a
kernel command line or a metadata value holding ``<``, ``&`` or quotes stays what it was.
"""

from __future__ import annotations

import uuid

from lxml import etree
from lxml.builder import E, ElementMaker

from vmwebd import xmlsafe
from vmwebd.hv.driver import DomainSpec

#: Namespace of our own element inside a domain's <metadata>.
METADATA_NS = "urn:vmweb:hv:1"
METADATA_PREFIX = "vmweb"
#: Deterministic domain UUIDs: redefining the same name keeps the same UUID, which libvirt
#: requires (a second define with a fresh UUID is refused as "already exists").
_UUID_NS = uuid.UUID("9a0f8b8e-4f4e-5b83-a3f4-0a6e2b1c7d10")

_M = ElementMaker(namespace=METADATA_NS, nsmap={METADATA_PREFIX: METADATA_NS})


def _tostring(element) -> str:
    return etree.tostring(element, pretty_print=True, encoding="unicode")


def domain_uuid(name: str) -> str:
    """The UUID vmweb gives domain ``name`` on every host (stable across redefinition)."""
    return str(uuid.uuid5(_UUID_NS, name))


def metadata_element(spec: DomainSpec):
    """Our ``<vmweb:vm>`` element: the spec's metadata as ``<vmweb:entry key=...>`` children."""
    vm = _M.vm()
    if spec.ip is not None:
        vm.set("ip", spec.ip)
    for key in sorted(spec.metadata):
        vm.append(_M.entry(str(spec.metadata[key]), key=key))
    return vm


def domain_xml(spec: DomainSpec) -> str:
    """The ``<domain>`` definition of ``spec``: TCG CPU, virtio disk and NIC, optional kernel."""
    os_el = E.os(E.type("hvm"))
    if spec.kernel:
        os_el.append(E.kernel(spec.kernel))
    if spec.initrd:
        os_el.append(E.initrd(spec.initrd))
    if spec.cmdline:
        os_el.append(E.cmdline(spec.cmdline))
    if not spec.kernel:
        os_el.append(E.boot(dev="hd"))

    nic = E.interface(
        E.mac(address=spec.mac),
        E.source(bridge=spec.bridge) if spec.bridge else E.source(network=spec.network),
        E.model(type="virtio"),
        type="bridge" if spec.bridge else "network",
    )
    if spec.mtu:
        nic.append(E.mtu(size=str(spec.mtu)))
    devices = E.devices(
        E.disk(
            E.driver(name="qemu", type="qcow2"),
            E.source(file=spec.disk_path),
            E.target(dev="vda", bus="virtio"),
            type="file",
            device="disk",
        ),
    )
    if spec.seed_path:
        # The machine type is QEMU's default (i440fx), whose CD-ROMs are on IDE.
        devices.append(
            E.disk(
                E.driver(name="qemu", type="raw"),
                E.source(file=spec.seed_path),
                E.target(dev="hdc", bus="ide"),
                E.readonly(),
                type="file",
                device="cdrom",
            )
        )
    devices.append(nic)
    if spec.serial_log:
        # The serial port on a pty, so libvirt can open it as a console (vmwebd/console); what
        # the guest prints is also appended to the log file (a file serial port cannot be opened).
        devices.append(E.serial(E.log(file=spec.serial_log, append="on"), E.target(port="0"), type="pty"))
        devices.append(E.console(E.target(type="serial", port="0"), type="pty"))

    dom = E.domain(
        E.name(spec.name),
        E.uuid(domain_uuid(spec.name)),
        E.metadata(metadata_element(spec)),
        E.memory(str(spec.memory_mib), unit="MiB"),
        E.vcpu(str(spec.vcpus)),
        os_el,
        # KVM is advertised on these machines but does not work: TCG with a generic model.
        E.cpu(E.model("qemu64", fallback="allow"), mode="custom", match="exact"),
        E.on_poweroff("destroy"),
        E.on_reboot("restart"),
        E.on_crash("destroy"),
        devices,
        type=spec.domain_type,
    )
    return _tostring(dom)


def parse_metadata(xml: str | None) -> dict[str, str]:
    """The key/values of our ``<vmweb:vm>`` element (as ``virDomainGetMetadata`` returns it).

    The ``ip`` attribute, when present, is returned under the key ``ip`` unless an entry of that
    name exists."""
    if not xml:
        return {}
    root = etree.fromstring(xml.encode(), xmlsafe.parser())
    out = {}
    # libvirt hands the element back without our prefix but in our namespace (or none).
    for entry in root:
        if etree.QName(entry).localname == "entry":
            out[entry.get("key")] = entry.text or ""
    if root.get("ip") is not None:
        out.setdefault("ip", root.get("ip"))
    return out


def dir_pool_xml(name: str, path: str) -> str:
    """A directory storage pool ``name`` rooted at ``path``."""
    return _tostring(E.pool(E.name(name), E.target(E.path(path)), type="dir"))


def volume_xml(
    name: str,
    capacity_mib: int,
    fmt: str = "qcow2",
    backing_path: str | None = None,
    backing_fmt: str = "qcow2",
) -> str:
    """A volume of ``capacity_mib``; with ``backing_path`` it is a copy-on-write overlay."""
    vol = E.volume(
        E.name(name),
        E.capacity(str(capacity_mib), unit="MiB"),
        E.target(E.format(type=fmt)),
    )
    if backing_path is not None:
        vol.append(E.backingStore(E.path(backing_path), E.format(type=backing_fmt)))
    return _tostring(vol)


def isolated_network_xml(name: str, bridge: str) -> str:
    """An isolated network (no ``<forward>``, so no route out) on bridge ``bridge``."""
    return _tostring(E.network(E.name(name), E.bridge(name=bridge, stp="on", delay="0")))


def volume_backing_path(xml: str) -> str | None:
    """The ``<backingStore><path>`` of a volume's XML, or None for a volume without one."""
    root = etree.fromstring(xml.encode(), xmlsafe.parser())
    return root.findtext("backingStore/path")


def pool_path(xml: str) -> str | None:
    """The ``<target><path>`` of a storage pool's XML."""
    return etree.fromstring(xml.encode(), xmlsafe.parser()).findtext("target/path")


def network_bridge(xml: str) -> str | None:
    """The bridge name in a network's XML."""
    bridge = etree.fromstring(xml.encode(), xmlsafe.parser()).find("bridge")
    return None if bridge is None else bridge.get("name")
