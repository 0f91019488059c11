"""The address plan of clusters' segments: pure arithmetic on IPv4 addresses, no I/O.

Every virtual cluster is its own L2 segment (a bridge and a VXLAN id per cluster, see
:mod:`vmwebd.net.plan`), and the clusters of one pool share the pool's network as their address
plan:

* a guest's address is leased from its template's pool (unique in the grid), its prefix is the
  pool's, and its gateway is the pool's gateway address;
* never leased: the pool's network and broadcast addresses, its gateway (``pools/ip/@gateway``,
  default the first host address), every ``reserve`` network and, in pools wider than a /24, every
  address ending in ``.0`` or ``.255`` (valid, but guests' tools and firewalls often take them for
  a /24's network or broadcast address);
* in ``nat`` mode every host that holds VMs of the cluster answers the gateway address on the
  cluster's bridge, with a MAC derived from the network id (:func:`gateway_mac`), the same on every
  host: after a live migration the guest's ARP entry for its gateway is still right;
* in ``isolated`` mode no host has an address on the segment and guests get no default route.

Sharing the pool's network keeps a cluster growing to the pool's size without renumbering and
wastes no addresses per cluster; isolation comes from the segments (and the rules of
:mod:`vmwebd.net.nft`), not from the addressing. The price is on the host of routed segments: the
same gateway address on several bridges, so it goes on without its prefix route and each local
guest's address is routed to its own bridge (:attr:`vmwebd.net.plan.Segment.local`).
"""

from __future__ import annotations

import ipaddress

#: Bytes a VXLAN encapsulation adds to a frame over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 +
#: inner Ethernet 14): a guest's MTU is the underlay's minus this.
VXLAN_OVERHEAD = 50
#: The UDP port VXLAN uses (IANA).
VXLAN_PORT = 4789
DEFAULT_UNDERLAY_MTU = 1500
#: The smallest underlay MTU accepted: guests then get 1280, IPv6's minimum.
MIN_UNDERLAY_MTU = 1280 + VXLAN_OVERHEAD


def default_gateway(cidr: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """A pool's gateway unless configured: its first host address."""
    return cidr.network_address + 1


def leasable(
    cidr: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address | None, addr: ipaddress.IPv4Address
) -> bool:
    """Whether ``addr`` may be given to a guest by the address plan (reserves aside)."""
    if addr not in cidr:
        return False
    if cidr.prefixlen < 31 and addr in (cidr.network_address, cidr.broadcast_address):
        return False
    if gateway is not None and addr == gateway:
        return False
    if cidr.prefixlen < 24 and int(addr) & 0xFF in (0, 255):
        return False
    return True


def gateway_mac(vni: int) -> str:
    """The MAC of a segment's gateway, the same on every host (locally administered, unicast)."""
    if not 0 <= vni < 2**24:
        raise ValueError(f"network id {vni} is not a 24-bit VXLAN id")
    return f"02:76:6d:{vni >> 16 & 0xFF:02x}:{vni >> 8 & 0xFF:02x}:{vni & 0xFF:02x}"


def guest_mtu(underlay_mtu: int) -> int:
    """The MTU guests of a segment get on an underlay of ``underlay_mtu``."""
    return underlay_mtu - VXLAN_OVERHEAD


def sort_key(addr: str) -> tuple[int, ...]:
    return tuple(int(x) for x in addr.split("."))


def prefix_of(subnet: str) -> int:
    return ipaddress.IPv4Network(subnet).prefixlen
