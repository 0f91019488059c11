"""What each guest is told about itself: a cloud-init *NoCloud* seed, from the DOM.

A guest boots with a small ISO 9660 volume labelled ``cidata`` attached (cloud-init's NoCloud
data source reads it) that carries three files, all made from what the grid leased to the VM:

``meta-data``::

    instance-id: vmweb-lab-web-1-9f2c4a
    local-hostname: web-1

The instance id is ``vmweb-CLUSTER-NAME-TOKEN``: the same for one creation of the VM (cloud-init
then runs its once-per-instance modules once), a new one when the VM is made again.

``network-config`` (version 2, keys sorted)::

    network:
      ethernets:
        eth0:
          addresses:
          - 10.77.2.5/23
          gateway4: 10.77.2.1
          match:
            macaddress: '52:54:00:12:34:56'
          mtu: 1450
          nameservers:
            addresses:
            - 10.77.2.1
          set-name: eth0
      version: 2

``gateway4`` (the default route) is there only in ``nat`` mode (an isolated segment has no way
out), ``nameservers`` only when the cluster names DNS servers. Tools that read this file without
a YAML parser (the test guest's init scripts use awk) may rely on this layout, exactly: the
leased address is the line ``      - A.B.C.D/P`` (six spaces) right after the first line
``      addresses:``; the gateway is the line ``      gateway4: A.B.C.D``; the MTU the line
``      mtu: N``; the MAC the line ``        macaddress: 'xx:xx:xx:xx:xx:xx'`` (always in single
quotes, lower case).

``user-data`` (``#cloud-config`` first, keys sorted)::

    #cloud-config
    fqdn: web-1.lab
    hostname: web-1
    manage_etc_hosts: false
    ssh_authorized_keys:
    - ssh-ed25519 AAAAC3Nza... alice@laptop
    write_files:
    - content: |
        127.0.0.1 localhost
        ::1 localhost ip6-localhost ip6-loopback
        10.77.2.2 web-0.lab web-0
        10.77.2.5 web-1.lab web-1
      owner: root:root
      path: /etc/hosts
      permissions: '0644'

``/etc/hosts`` is written by ``write_files`` (cloud-init's own ``manage_etc_hosts`` is off): the
two loopback lines, then one ``IP FQDN SHORT`` line per member VM of the cluster (every VM not
being removed that holds an address), in natural order of names (``web-2`` before ``web-10``).
Its text is always a YAML literal block scalar: ``content: |`` and then the lines, indented.
``ssh_authorized_keys`` is there only when the cluster's owner has keys.

A kernel booted directly (no cloud-init in its initrd) gets the same address through the
kernel's own ``ip=`` argument (:func:`kernel_ip_arg`).

Everything here is a pure function of the DOM except :func:`write_seed`, which blocks on the
disk: callers run it off the reactor thread.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
from dataclasses import dataclass

import yaml

from vmwebd.atomicfile import write_atomic
from vmwebd.dom.records import UserRec, VClusterRec, VmRec, status_of
from vmwebd.errors import InvalidArgument
from vmwebd.net import addressing

#: The volume label cloud-init's NoCloud data source looks for.
VOLUME_ID = "cidata"
#: The files of a seed, in the order they go on the volume.
FILES = ("meta-data", "network-config", "user-data")
#: The prefix assumed for clusters made before segments existed (their subnet is unknown).
FALLBACK_PREFIX = 24
#: Bounds on what a seed carries (a guest reads all of it at every boot).
MAX_SSH_KEYS = 32
MAX_SSH_KEY_CHARS = 8192
MAX_DNS = 3
#: The guest's interface name, fixed by ``set-name`` (and the kernel's ``ip=``).
IFACE = "eth0"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class SeedSpec:
    """Everything one guest's seed says; see the module docstring for the files made from it."""

    instance_id: str
    hostname: str  # the VM's name
    fqdn: str  # NAME.CLUSTER
    mac: str
    address: str  # IP/PREFIX
    gateway: str  # "" when the guest has no way out
    dns: tuple[str, ...]
    mtu: int
    hosts: tuple[tuple[str, str, str], ...]  # (ip, fqdn, short name) of every member
    ssh_keys: tuple[str, ...]  # the cluster owner's OpenSSH public keys


def natural_key(name: str) -> tuple:
    """Sort key putting ``web-2`` before ``web-10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def members(dom, cluster: str) -> list[VmRec]:
    """The VMs of ``cluster`` that count (not being removed), in natural order of names."""
    vms = [vm for vm in dom.select(VmRec, "cluster", cluster) if vm.desired != "absent"]
    return sorted(vms, key=lambda vm: (natural_key(vm.name), vm.id))


def hosts_of(dom, cluster: VClusterRec) -> tuple[tuple[str, str, str], ...]:
    """``(ip, fqdn, name)`` of every member of ``cluster`` that holds an address."""
    return tuple((vm.ip, f"{vm.name}.{cluster.id}", vm.name) for vm in members(dom, cluster.id) if vm.ip)


def cluster_hosts_text(dom, cluster: VClusterRec) -> str:
    """The members' lines of the cluster's ``/etc/hosts`` (``IP FQDN NAME``), as its guests have
    them, without the loopback lines."""
    return "".join(f"{ip} {fqdn} {short}\n" for ip, fqdn, short in hosts_of(dom, cluster))


def mpi_hostfile(dom, cluster: VClusterRec) -> str:
    """An MPI hostfile in Open MPI's syntax: ``FQDN slots=VCPUS`` per member observed running,
    in natural order of names."""
    lines = []
    for vm in members(dom, cluster.id):
        st = status_of(dom, vm)
        if st is not None and st.state == "running":
            lines.append(f"{vm.name}.{cluster.id} slots={vm.vcpus}\n")
    return "".join(lines)


def seed_for(dom, vm: VmRec) -> SeedSpec:
    """The seed of ``vm`` as the DOM stands. InvalidArgument naming the field if the VM lacks
    what a seed needs (its cluster, a leased address in the segment, a MAC) or its cluster's
    settings are malformed."""
    c = dom.get(VClusterRec, vm.cluster)
    if c is None:
        raise InvalidArgument("cluster", f"vm {vm.id!r} names cluster {vm.cluster!r}, which does not exist")
    if not _MAC_RE.match(vm.mac or ""):
        raise InvalidArgument("mac", f"vm {vm.id!r} has no valid MAC ({vm.mac!r})")
    try:
        ip = ipaddress.IPv4Address(vm.ip)
    except ValueError:
        raise InvalidArgument("ip", f"vm {vm.id!r} has no leased IPv4 address ({vm.ip!r})") from None
    if c.subnet:
        try:
            net = ipaddress.IPv4Network(c.subnet)
        except ValueError:
            raise InvalidArgument("subnet", f"cluster {c.id!r} has a malformed subnet {c.subnet!r}") from None
        if (
            ip not in net
            or (net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address))
            or (c.gateway and vm.ip == c.gateway)
        ):
            raise InvalidArgument(
                "ip",
                f"vm {vm.id!r} has address {vm.ip}, which is not one a VM of segment {c.subnet} may hold",
            )
        prefix = net.prefixlen
    else:
        prefix = FALLBACK_PREFIX
    gateway = ""
    if c.mode == "nat" and c.gateway:
        try:
            gw = ipaddress.IPv4Address(c.gateway)
        except ValueError:
            raise InvalidArgument(
                "gateway", f"cluster {c.id!r} has a malformed gateway {c.gateway!r}"
            ) from None
        if gw not in ipaddress.IPv4Interface(f"{ip}/{prefix}").network:
            raise InvalidArgument("gateway", f"cluster {c.id!r}: gateway {gw} is outside {ip}/{prefix}")
        gateway = str(gw)
    dns = tuple(c.dns.split())
    for server in dns:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument("dns", f"cluster {c.id!r}: {server!r} is not an IP address") from None
    if len(dns) > MAX_DNS:
        raise InvalidArgument(
            "dns", f"cluster {c.id!r} names {len(dns)} name servers; a guest takes at most {MAX_DNS}"
        )
    owner = dom.get(UserRec, c.owner) if c.owner else None
    keys = owner.ssh_key_list() if owner is not None else ()
    spec = SeedSpec(
        instance_id=f"vmweb-{c.id}-{vm.name}-{vm.token}" if vm.token else f"vmweb-{c.id}-{vm.name}",
        hostname=vm.name,
        fqdn=f"{vm.name}.{c.id}",
        mac=vm.mac,
        address=f"{ip}/{prefix}",
        gateway=gateway,
        dns=dns,
        mtu=c.mtu or addressing.guest_mtu(addressing.DEFAULT_UNDERLAY_MTU),
        hosts=hosts_of(dom, c),
        ssh_keys=tuple(keys),
    )
    check_spec(spec)
    return spec


def check_spec(spec: SeedSpec) -> None:
    """InvalidArgument naming the field if a seed would carry more than a guest should read."""
    if len(spec.ssh_keys) > MAX_SSH_KEYS:
        raise InvalidArgument(
            "ssh_keys", f"{len(spec.ssh_keys)} SSH keys for {spec.fqdn}; at most {MAX_SSH_KEYS}"
        )
    for i, key in enumerate(spec.ssh_keys, 1):
        if len(key) > MAX_SSH_KEY_CHARS or any(ord(ch) < 0x20 or ch == "\x7f" for ch in key):
            raise InvalidArgument(
                "ssh_keys", f"key {i} for {spec.fqdn} is over {MAX_SSH_KEY_CHARS} characters or not one line"
            )
    if not 68 <= spec.mtu <= 65535:
        raise InvalidArgument("mtu", f"{spec.mtu} is not an MTU from 68 to 65535")


# -- the files ---------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Safe YAML whose multi-line strings are literal block scalars (``|``)."""


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(obj) -> str:
    return yaml.dump(
        obj, Dumper=_Dumper, default_flow_style=False, sort_keys=True, allow_unicode=False, width=1 << 16
    )


def hosts_text(spec: SeedSpec) -> str:
    """The guest's ``/etc/hosts``: loopback, then ``IP FQDN SHORT`` per member."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    lines += [f"{ip} {fqdn} {short}" for ip, fqdn, short in spec.hosts]
    return "\n".join(lines) + "\n"


class _Quoted(str):
    """A string always written in single quotes (a MAC of only digits, ``52:54:00:12:34:56``,
    would be quoted anyway: YAML 1.1 reads it as a base-60 number; one with a letter would not)."""


def _quoted(dumper, value):
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style="'")


_Dumper.add_representer(_Quoted, _quoted)


def network_config(spec: SeedSpec) -> dict:
    eth = {
        "match": {"macaddress": _Quoted(spec.mac)},
        "set-name": IFACE,
        "addresses": [spec.address],
        "mtu": spec.mtu,
    }
    if spec.gateway:
        # ``gateway4``, not ``routes: [{to: 0.0.0.0/0, via: GW}]``: cloud-init 22.4 renders both
        # for networkd, but for ifupdown (Debian's images) it turns the route into
        # ``post-up route add default gw GW || true``, which needs net-tools and fails silently
        # without it, while ``gateway4`` becomes ifupdown's own ``gateway GW``. netplan only
        # warns that gateway4 is deprecated.
        eth["gateway4"] = spec.gateway
    if spec.dns:
        eth["nameservers"] = {"addresses": list(spec.dns)}
    return {"network": {"version": 2, "ethernets": {IFACE: eth}}}


def user_data(spec: SeedSpec) -> dict:
    cfg = {
        "hostname": spec.hostname,
        "fqdn": spec.fqdn,
        "manage_etc_hosts": False,
        "write_files": [
            {"path": "/etc/hosts", "content": hosts_text(spec), "owner": "root:root", "permissions": "0644"}
        ],
    }
    if spec.ssh_keys:
        cfg["ssh_authorized_keys"] = list(spec.ssh_keys)
    return cfg


def seed_files(spec: SeedSpec) -> dict[str, bytes]:
    """The three files of ``spec``'s seed (see the module docstring), as UTF-8 bytes."""
    check_spec(spec)
    meta = {"instance-id": spec.instance_id, "local-hostname": spec.hostname}
    return {
        "meta-data": _yaml(meta).encode("utf-8"),
        "network-config": _yaml(network_config(spec)).encode("utf-8"),
        "user-data": ("#cloud-config\n" + _yaml(user_data(spec))).encode("utf-8"),
    }


def kernel_ip_arg(spec: SeedSpec) -> str:
    """The kernel's ``ip=`` argument for the same address (for guests booted from a kernel):
    ``ip=CLIENT::GATEWAY:NETMASK:HOSTNAME:eth0:off``, the gateway empty when there is none."""
    iface = ipaddress.IPv4Interface(spec.address)
    return f"ip={iface.ip}::{spec.gateway}:{iface.netmask}:{spec.hostname}:{IFACE}:off"


# -- the volume --------------------------------------------------------------------------------
def _iso_name(name: str) -> str:
    """A file's plain ISO 9660 name (level 1: upper case 8.3); Rock Ridge and Joliet carry the
    real one."""
    base = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:8]
    return f"/{base}.;1"


def build_iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 volume labelled ``cidata`` holding ``files`` at its root, with Rock Ridge and
    Joliet names (so guests see ``meta-data``, not ``META_DAT``).

    pycdlib stamps the volume and every record with the current time and offers no way to fix
    it, so two volumes of the same files differ in their dates; compare what they carry
    (:func:`read_iso`) rather than their bytes."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, sys_ident="LINUX", rock_ridge="1.09", joliet=3)
    seen = set()
    try:
        for name in sorted(files):
            iso_path = _iso_name(name)
            if iso_path in seen or not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", name):
                raise InvalidArgument("files", f"{name!r} is not a seed file name")
            seen.add(iso_path)
            data = files[name]
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path,
                rr_name=name,
                joliet_path="/" + name,
                file_mode=0o100444,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    """``(volume id, {Rock Ridge name: content})`` of a volume made by :func:`build_iso`."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        vol = iso.pvd.volume_identifier.decode("ascii", "replace").rstrip()
        out = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dir():
                continue
            name = child.rock_ridge.name().decode("utf-8")
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/" + name)
            out[name] = buf.getvalue()
        return vol, out
    finally:
        iso.close()


def write_seed(path: str | os.PathLike, spec: SeedSpec) -> bool:
    """Makes the file at ``path`` the seed volume of ``spec``: written only if what the volume
    there carries differs (read back; an unreadable one is replaced), atomically (a temporary
    file beside it, then a rename). Returns whether it wrote. Blocks: run it off the reactor."""
    files = seed_files(spec)
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            have = f.read()
        vol, carried = read_iso(have)
        if vol == VOLUME_ID and carried == files:
            return False
    except FileNotFoundError:
        pass
    except Exception:  # a truncated or foreign file: replace it
        pass
    data = build_iso(files)
    # qemu reads it; it holds nothing secret (public keys, names)
    write_atomic(path, data, mode=0o644)
    return True
