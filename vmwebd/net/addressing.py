"""The address plan of a cluster's segment: pure arithmetic on IPv4 networks, no I/O.

Each virtual cluster leases one *segment* (an IPv4 network cut from its template's pool, see
:func:`vmwebd.lease.pools.segment_candidates`). In a segment ``N/P``:

* the network address ``N`` and the broadcast address are never handed out;
* the first host address ``N+1`` is the gateway: in ``nat`` mode every host that holds VMs of the
  cluster answers it on the cluster's bridge (with the same MAC everywhere, :func:`gateway_mac`);
  in ``isolated`` mode it is simply never handed out, so a cluster can switch mode later without
  renumbering;
* the VMs get the others, lowest first (:func:`vm_addresses`).

A segment's size comes from the pool's ``segment-prefix`` or, by default, from the largest cluster
the grid allows (:func:`segment_prefix_for`): a cluster can grow to that size without renumbering.
"""
from __future__ import annotations

import ipaddress
from typing import Iterator

#: Bytes a VXLAN encapsulation adds to a frame over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 +
#: inner Ethernet 14): a guest's MTU is the underlay's minus this.
VXLAN_OVERHEAD = 50
#: The UDP port VXLAN uses (IANA).
VXLAN_PORT = 4789
DEFAULT_UNDERLAY_MTU = 1500
#: The smallest segment: a /30 holds a gateway and one VM.
MAX_SEGMENT_PREFIX = 30


def segment_prefix_for(max_vms: int) -> int:
    """The longest prefix whose network holds ``max_vms`` VMs besides its gateway (network and
    broadcast addresses excluded): 253 VMs fit a /24, 256 need a /23."""
    if max_vms < 1:
        raise ValueError(f"max_vms must be at least 1, not {max_vms}")
    prefix = MAX_SEGMENT_PREFIX
    while prefix > 0 and usable(prefix) < max_vms:
        prefix -= 1
    return prefix


def usable(prefix: int) -> int:
    """How many VMs a segment of this prefix holds (its hosts minus the gateway)."""
    return max(0, 2 ** (32 - prefix) - 3)


def gateway_of(subnet: str | ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    net = ipaddress.IPv4Network(subnet)
    return net.network_address + 1


def vm_addresses(subnet: str | ipaddress.IPv4Network) -> Iterator[ipaddress.IPv4Address]:
    """A segment's addresses VMs may get, lowest first."""
    net = ipaddress.IPv4Network(subnet)
    gw = gateway_of(net)
    for addr in net.hosts():
        if addr != gw:
            yield addr


def is_vm_address(subnet: str | ipaddress.IPv4Network, addr: str) -> bool:
    """Whether ``addr`` is one a VM of segment ``subnet`` may hold."""
    net = ipaddress.IPv4Network(subnet)
    try:
        a = ipaddress.IPv4Address(addr)
    except ValueError:
        return False
    return (a in net and a not in (net.network_address, net.broadcast_address)
            and a != gateway_of(net))


def gateway_mac(vni: int) -> str:
    """The MAC of a segment's gateway, the same on every host (locally administered, unicast):
    after a live migration a guest's ARP entry for its gateway stays right."""
    if not 0 <= vni < 2 ** 24:
        raise ValueError(f"network id {vni} is not a 24-bit VXLAN id")
    return f"02:76:6d:{vni >> 16 & 0xff:02x}:{vni >> 8 & 0xff:02x}:{vni & 0xff:02x}"


def guest_mtu(underlay_mtu: int) -> int:
    return underlay_mtu - VXLAN_OVERHEAD


def prefix_of(subnet: str) -> int:
    return ipaddress.IPv4Network(subnet).prefixlen
