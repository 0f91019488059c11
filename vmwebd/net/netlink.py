"""The executor that makes a real host's kernel match its network plan (netlink and nftables).

:class:`NetlinkDevices` carries out a :class:`~vmwebd.net.plan.HostPlan`: per segment, a bridge
``vmbr<VNI>`` and a VXLAN device ``vmvx<VNI>`` on it, the VXLAN device's all-zeros forwarding
entries towards the other holders, the gateway address in ``nat`` mode; then vmweb's nftables
tables (:mod:`vmwebd.net.nft`) and, with a ``nat`` segment, IPv4 forwarding. The work is
blocking netlink and runs on the reactor's thread pool, one apply at a time.

Which devices are ours
    Every device vmweb makes carries the interface alias ``vmweb:<cluster>``. A device named
    ``vmbr*``/``vmvx*`` with that alias whose network id the plan does not list is deleted (a
    cluster gone from this host, or a leftover after a crash). A device with such a name and
    without the alias is never touched: its segment fails, naming it. A device is made under a
    temporary name (``vmnew<VNI>b``/``vmnew<VNI>x``), given the alias, and only then renamed, so a
    crash never leaves an unmarked ``vmbr``/``vmvx`` device that would block the segment for good;
    a ``vmnew*`` device is a leftover of ours and is deleted.

The underlay
    The VXLAN device sends from the plan's underlay address, bound to the interface holding it
    (the kernel then bounds its MTU by that interface's). Without that address on any interface of
    the namespace, every segment fails with a reason naming the address; :func:`check_underlay`
    says so at start.

The host itself stays out of the segments
    Bridges and VXLAN devices get no IPv6 link-local address (address generation off), and a
    bridge has no IPv4 address but, in ``nat`` mode, its segment's gateway. The nftables rules drop
    what guests send to the host's own services.

Network namespace
    With ``netns=NAME`` everything happens in the named namespace (``/run/netns/NAME``): netlink
    through pyroute2's ``IPRoute(netns=NAME)`` (a socket opened in the namespace, this process
    never changes namespace), nft through ``ip netns exec NAME nft``, and the ``ip_forward``
    sysctl (per namespace) written by a short child process that enters the namespace first
    (pyroute2's ``ChildProcess``). A namespace that does not exist is never created.

Failures
    A segment that cannot be made is reported in ``Applied.failed`` (network id -> reason) and the
    others are made. When nft refuses the rules, every segment fails with nft's message (the
    isolation between segments is the rules' work); when forwarding cannot be turned on, every
    ``nat`` segment does. Segments held by another owner's devices get no rules.

Applying the same plan twice changes nothing (``Applied.changed`` is False); a changed plan changes
only what differs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from twisted.internet import defer, threads
from twisted.logger import Logger

from vmwebd.errors import ConfigError
from vmwebd.net.addressing import VXLAN_PORT
from vmwebd.net.devices import Applied
from vmwebd.net.nft import NftRules, RulesError
from vmwebd.net.plan import BRIDGE_PREFIX, VXLAN_PREFIX, HostPlan, Segment

#: The interface alias of every device vmweb made (followed by the cluster's name).
MARKER = "vmweb:"
#: Devices being made are named so until they carry the marker (see the module's docstring).
TEMP_PREFIX = "vmnew"
#: The all-zeros MAC of head-end replication entries.
ZERO_MAC = "00:00:00:00:00:00"
IPV4_FORWARD = "/proc/sys/net/ipv4/ip_forward"
#: Seconds the child that writes a sysctl inside a namespace may take.
SYSCTL_TIMEOUT = 10
IFF_UP = 0x1
ADDR_GEN_MODE_NONE = 1

log = Logger()
_DEFAULT = object()


class SegmentError(Exception):
    """One segment cannot be made; the message names the device or address concerned.
    ``foreign``: because a device that is not ours holds its name or network id."""

    def __init__(self, message: str, foreign: bool = False):
        super().__init__(message)
        self.foreign = foreign


#: Address flag: no prefix route for this address (linux/if_addr.h).
IFA_F_NOPREFIXROUTE = 0x200
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RTPROT_STATIC = 4


def _is_ours(link) -> bool:
    return (link.get("ifalias") or "").startswith(MARKER)


def _kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _info_data(link):
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_DATA") if info is not None else None


def _addr_gen_mode(link) -> int | None:
    spec = link.get_attr("IFLA_AF_SPEC")
    inet6 = spec.get_attr("AF_INET6") if spec is not None else None
    return inet6.get_attr("IFLA_INET6_ADDR_GEN_MODE") if inet6 is not None else None


def _vni_of(name: str) -> int | None:
    for prefix in (BRIDGE_PREFIX, VXLAN_PREFIX):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return int(name[len(prefix) :])
    return None


def _why(e: Exception) -> str:
    if isinstance(e, NetlinkError):
        return f"{os.strerror(e.code)}" + (
            f" ({e.args[1]})" if len(e.args) > 1 and e.args[1] and e.args[1] != os.strerror(e.code) else ""
        )
    return str(e) or type(e).__name__


def _open(netns: str | None) -> IPRoute:
    # flags=0: pyroute2 would otherwise create a missing namespace instead of failing.
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


def _underlay_index(ipr: IPRoute, address: str) -> int | None:
    for a in ipr.get_addr(family=socket.AF_INET):
        if address in (a.get_attr("IFA_LOCAL"), a.get_attr("IFA_ADDRESS")):
            return a["index"]
    return None


def _underlay_problem(address: str, netns: str | None) -> str:
    where = f" in network namespace {netns}" if netns else ""
    if not address:
        return "this host has no underlay address (neither published nor in its peer endpoint)"
    try:
        if ipaddress.ip_address(address).version != 4:
            return f"underlay address {address} is not IPv4 (VXLAN over IPv6 is not supported)"
    except ValueError:
        return f"underlay {address!r} is not an IP address"
    return f"underlay address {address} is not configured on any interface of this host{where}"


class UnderlayError(ValueError):
    """The underlay address is not this host's (or not usable); the message names it."""


def check_underlay(
    address: str, netns: str | None = None, source: str | None = None, field: str = "network/@underlay"
) -> str:
    """The name of the interface that holds ``address`` in this host's (or ``netns``'s) network.

    When no interface does (VXLAN segments could not be sent from it), raises
    :class:`~vmwebd.errors.ConfigError` naming ``source`` (the configuration file), ``field`` and
    the address; without ``source``, :class:`UnderlayError` (a ``ValueError``) with the reason
    only, for a caller that knows better which file and field the address came from.
    """

    def fail(reason: str) -> Exception:
        return ConfigError(source, None, field, reason) if source else UnderlayError(reason)

    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise fail(_underlay_problem(address, netns)) from None
    try:
        with _open(netns) as ipr:
            idx = _underlay_index(ipr, address)
            name = ipr.get_links(idx)[0].get("ifname") if idx is not None else None
    except (OSError, NetlinkError) as e:
        where = f" in network namespace {netns}" if netns else ""
        raise fail(f"cannot read this host's addresses{where}: {_why(e)}") from None
    if name is None:
        raise fail(_underlay_problem(address, netns))
    return name


def _write_sysctl_child(netns: str, path: str, value: bytes) -> bytes:
    # Runs in a forked child: enter the namespace (sysctls under /proc/sys/net are resolved in
    # the namespace of whoever opens them), write if different, answer the previous value.
    from pyroute2 import netns as pyr_netns

    pyr_netns.setns(netns, flags=0)
    with open(path, "rb") as f:
        before = f.read().strip()
    if before != value:
        with open(path, "wb") as f:
            f.write(value)
    return before


def ensure_sysctl(path: str, value: str, netns: str | None = None) -> bool:
    """Set a per-namespace sysctl file to ``value``; True when it was different before."""
    want = value.encode()
    if netns is None:
        with open(path, "rb") as f:
            before = f.read().strip()
        if before != want:
            with open(path, "wb") as f:
                f.write(want)
        return before != want
    from pyroute2.process import ChildProcess

    with ChildProcess(target=_write_sysctl_child, args=[netns, path, want]) as child:
        return child.get_data(timeout=SYSCTL_TIMEOUT) != want


class NetlinkDevices:
    """Makes this host's bridges, VXLAN devices, forwarding entries, gateway addresses and
    nftables rules match a :class:`HostPlan` (see the module's docstring).

    ``netns``: the named network namespace to work in (None: this process's). ``nft``: the
    :class:`NftRules` to load the rules with; by default one for the same namespace; None leaves
    nftables alone (for a host whose firewall is managed otherwise: isolation is then its job).
    """

    real = True

    def __init__(self, reactor, netns: str | None = None, nft: NftRules | None = _DEFAULT):
        self.reactor = reactor
        self.netns = netns
        self.nft = NftRules(netns) if nft is _DEFAULT else nft
        self._plan: HostPlan | None = None
        # Applies run one at a time: two threads editing the same devices would race.
        self._lock = defer.DeferredLock()

    def current(self) -> HostPlan | None:
        return self._plan

    def apply(self, plan: HostPlan) -> defer.Deferred:
        """Make the kernel match ``plan``; fires with an :class:`Applied`."""
        return self._lock.run(self._apply, plan)

    def _apply(self, plan: HostPlan) -> defer.Deferred:
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.apply_blocking, plan)

        def done(applied: Applied) -> Applied:
            self._plan = plan
            return applied

        return d.addCallback(done)

    # -- the blocking part, on a pool thread --------------------------------------------------------
    def apply_blocking(self, plan: HostPlan) -> Applied:
        """What :meth:`apply` does, in the calling thread (never the reactor's)."""
        start = time.monotonic()
        failed: dict[int, str] = {}
        foreign: set[int] = set()  # segments whose names or id another owner holds
        removed: list[str] = []
        changed = False
        try:
            ipr = _open(self.netns)
        except (OSError, NetlinkError) as e:
            if isinstance(e, FileNotFoundError) and self.netns:
                reason = f"network namespace {self.netns} does not exist"
            else:
                where = f" in network namespace {self.netns}" if self.netns else ""
                reason = f"cannot open netlink{where}: {_why(e)}"
            return Applied(failed={s.vni: reason for s in plan.segments})
        with ipr:
            try:
                removed = self._remove_unplanned(ipr, plan)
                changed = bool(removed)
                under = _underlay_index(ipr, plan.underlay) if plan.underlay else None
                if under is None:
                    reason = _underlay_problem(plan.underlay, self.netns)
                    failed.update({s.vni: reason for s in plan.segments})
                else:
                    seen = _Snapshot(ipr)
                    for seg in plan.segments:
                        try:
                            changed |= _Segment(ipr, plan, seg, under, seen).make()
                        except SegmentError as e:
                            failed[seg.vni] = str(e)
                            if e.foreign:
                                foreign.add(seg.vni)
            except (OSError, NetlinkError) as e:
                # reading the namespace's devices failed: no segment is known to be right
                for s in plan.segments:
                    failed.setdefault(s.vni, f"reading this host's devices: {_why(e)}")
        changed |= self._forwarding(plan, failed)
        changed |= self._rules(plan, failed, foreign)
        ms = (time.monotonic() - start) * 1000
        # a periodic apply that changes nothing is not news
        emit = log.info if changed or failed else log.debug
        emit(
            "network plan applied: {n} segments, {failed} failed ({reasons}), removed {removed}, "
            "changed {changed}, in {ms:.0f} ms",
            n=len(plan.segments),
            failed=len(failed),
            reasons="; ".join(f"{v}: {r}" for v, r in sorted(failed.items())) or "-",
            removed=removed,
            changed=changed,
            ms=ms,
        )
        return Applied(failed=failed, removed=tuple(sorted(removed)), changed=changed)

    def _remove_unplanned(self, ipr: IPRoute, plan: HostPlan) -> list[str]:
        """Delete our devices the plan does not list, and half-made ones; their names."""
        wanted = {s.vni for s in plan.segments}
        doomed = []
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            if name.startswith(TEMP_PREFIX):
                doomed.append(link)
            elif _is_ours(link) and name.startswith((BRIDGE_PREFIX, VXLAN_PREFIX)):
                vni = _vni_of(name)
                data = _info_data(link) if _kind(link) == "vxlan" else None
                # A VXLAN device of ours with another id than its name says would collide with
                # the one made for that id: remade rather than kept.
                if vni not in wanted or (data is not None and data.get_attr("IFLA_VXLAN_ID") != vni):
                    doomed.append(link)
        out = []
        # VXLAN devices first: a bridge goes once nothing of ours is on it.
        for link in sorted(doomed, key=lambda lk: _kind(lk) == "bridge"):
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as e:
                if e.code != 19:  # ENODEV: gone with its bridge or by another hand meanwhile
                    log.warn("cannot delete {name}: {why}", name=link.get("ifname"), why=_why(e))
                    continue
            if not link.get("ifname").startswith(TEMP_PREFIX):
                out.append(link.get("ifname"))
        return out

    def _forwarding(self, plan: HostPlan, failed: dict[int, str]) -> bool:
        """IPv4 forwarding on when a nat segment was made (never turned off: other things on the
        host may need it)."""
        routed = [s for s in plan.segments if s.routed and s.vni not in failed]
        if not routed:
            return False
        try:
            return ensure_sysctl(IPV4_FORWARD, "1", self.netns)
        except Exception as e:  # the child reports any error by its class and arguments
            for s in routed:
                failed[s.vni] = f"cannot turn IPv4 forwarding on: {_why(e)}"
            return False

    def _rules(self, plan: HostPlan, failed: dict[int, str], foreign: set[int]) -> bool:
        """Load the plan's nftables rules: failed segments included (the rules isolate every
        vmbr* device, and a segment that failed now may still have devices of ours), but not
        those whose devices are another owner's (our rules would forward and masquerade for
        them)."""
        if self.nft is None:
            return False
        if foreign:
            plan = dataclasses.replace(plan, segments=tuple(s for s in plan.segments if s.vni not in foreign))
        try:
            return self.nft.apply(plan)
        except RulesError as e:
            for s in plan.segments:
                failed.setdefault(s.vni, str(e))
            return False


class _Snapshot:
    """The namespace's devices, addresses and all-zeros forwarding entries, read once per apply
    (one dump each: reading them per segment made an apply quadratic in its segments)."""

    def __init__(self, ipr: IPRoute):
        self.links = {lk.get("ifname"): lk for lk in ipr.get_links()}
        #: VXLAN devices by (network id, UDP port): who uses which id.
        self.vxlan_ids: dict[tuple[int, int], list[str]] = {}
        for name, link in self.links.items():
            data = _info_data(link) if _kind(link) == "vxlan" else None
            if data is not None:
                key = (data.get_attr("IFLA_VXLAN_ID"), data.get_attr("IFLA_VXLAN_PORT"))
                self.vxlan_ids.setdefault(key, []).append(name)
        self.addrs: dict[int, list] = {}
        for a in ipr.get_addr():
            self.addrs.setdefault(a["index"], []).append(a)
        #: Host routes (/32, main table) by output device: the local guests' routes.
        self.routes: dict[int, set[str]] = {}
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN):
            if r["dst_len"] == 32 and r.get_attr("RTA_OIF") and r["proto"] == RTPROT_STATIC:
                self.routes.setdefault(r.get_attr("RTA_OIF"), set()).add(r.get_attr("RTA_DST"))
        self.fdb: dict[int, set[str]] = {}
        for e in ipr.fdb("dump"):
            if e.get_attr("NDA_LLADDR") == ZERO_MAC and e.get_attr("NDA_DST"):
                self.fdb.setdefault(e["ifindex"], set()).add(e.get_attr("NDA_DST"))


class _Segment:
    """Makes one segment's devices; :meth:`make` answers whether anything changed."""

    def __init__(self, ipr: IPRoute, plan: HostPlan, seg: Segment, underlay_index: int, seen: _Snapshot):
        self.ipr, self.plan, self.seg, self.under = ipr, plan, seg, underlay_index
        self.seen = seen
        self.links = seen.links
        self.alias = f"{MARKER}{seg.cluster}"
        self.changed = False
        self.doing = ""

    def _link(self, name: str):
        """The device named so, read now (after a change), or None."""
        try:
            return self.ipr.link("get", ifname=name)[0]
        except NetlinkError as e:
            if e.code == 19:  # ENODEV
                return None
            raise

    def _set(self, index: int, **kw) -> None:
        self.ipr.link("set", index=index, **kw)
        self.changed = True

    def make(self) -> bool:
        try:
            self._make()
        except (OSError, NetlinkError) as e:
            raise SegmentError(f"{self.doing}: {_why(e)}") from None
        return self.changed

    def _make(self) -> None:
        seg = self.seg
        br, vx = self.links.get(seg.bridge), self.links.get(seg.vxlan)
        for link, name in ((br, seg.bridge), (vx, seg.vxlan)):
            if link is not None and not _is_ours(link):
                raise SegmentError(f"device {name} exists and is not vmweb's", foreign=True)
        self._check_vni_free()
        self.doing = f"bridge {seg.bridge}"
        if br is not None and _kind(br) != "bridge":
            self._delete(br)
            br = None
        br_index = self._bridge(br)
        self.doing = f"vxlan device {seg.vxlan} (network id {seg.vni}, MTU {seg.mtu})"
        if vx is not None and not self._vxlan_fits(vx):
            self._delete(vx)
            vx = None
        vx_index = self._vxlan(vx, br_index)
        self.doing = f"addresses of bridge {seg.bridge}"
        self._addresses(br_index)
        self.doing = f"routes to the guests on bridge {seg.bridge}"
        self._routes(br_index)
        self.doing = f"forwarding entries of {seg.vxlan}"
        self._fdb(vx_index)

    def _delete(self, link) -> None:
        self.ipr.link("del", index=link["index"])
        self.changed = True

    def _check_vni_free(self) -> None:
        for name in self.seen.vxlan_ids.get((self.seg.vni, VXLAN_PORT), ()):
            if name != self.seg.vxlan:
                raise SegmentError(
                    f"network id {self.seg.vni} is already used by vxlan device {name} "
                    f"(UDP {VXLAN_PORT}), which is not vmweb's",
                    foreign=True,
                )

    def _create(self, final: str, suffix: str, **kw) -> int:
        temp = f"{TEMP_PREFIX}{self.seg.vni}{suffix}"
        self.ipr.link("add", ifname=temp, **kw)
        index = self._link(temp)["index"]
        try:
            self.ipr.link("set", index=index, ifalias=self.alias)
            # Before it is ever up, so it never gets an IPv6 link-local address.
            self.ipr.link(
                "set",
                index=index,
                af_spec={
                    "attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_MODE_NONE]]}]]
                },
            )
            self.ipr.link("set", index=index, ifname=final)
        except NetlinkError:
            self.ipr.link("del", index=index)
            raise
        self.changed = True
        return index

    def _common(self, link, index: int) -> None:
        """Alias, MTU, no IPv6 address generation, up: what both devices share."""
        if link.get("ifalias") != self.alias:
            self._set(index, ifalias=self.alias)
        if link.get("mtu") != self.seg.mtu:
            self._set(index, mtu=self.seg.mtu)
        if _addr_gen_mode(link) != ADDR_GEN_MODE_NONE:
            self._set(
                index,
                af_spec={
                    "attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_MODE_NONE]]}]]
                },
            )

    def _up(self, link, index: int) -> None:
        if not link["flags"] & IFF_UP:
            self._set(index, state="up")

    def _bridge(self, link) -> int:
        seg = self.seg
        if link is None:
            kw = {"address": seg.gateway_mac} if seg.routed else {}
            self._create(
                seg.bridge, "b", kind="bridge", br_stp_state=0, br_forward_delay=0, mtu=seg.mtu, **kw
            )
            link = self._link(seg.bridge)
        index = link["index"]
        self._common(link, index)
        data = _info_data(link)
        if (
            data is None
            or data.get_attr("IFLA_BR_STP_STATE") != 0
            or data.get_attr("IFLA_BR_FORWARD_DELAY") != 0
        ):
            self._set(index, kind="bridge", br_stp_state=0, br_forward_delay=0)
        if seg.routed and (link.get("address") or "").lower() != seg.gateway_mac:
            self._set(index, address=seg.gateway_mac)
        self._up(link, index)
        return index

    def _vxlan_fits(self, link) -> bool:
        data = _info_data(link)
        return (
            _kind(link) == "vxlan"
            and data is not None
            and data.get_attr("IFLA_VXLAN_ID") == self.seg.vni
            and data.get_attr("IFLA_VXLAN_PORT") == VXLAN_PORT
            and data.get_attr("IFLA_VXLAN_LOCAL") == self.plan.underlay
            and data.get_attr("IFLA_VXLAN_LEARNING") == 0
            and data.get_attr("IFLA_VXLAN_LINK") == self.under
        )

    def _vxlan(self, link, bridge_index: int) -> int:
        seg = self.seg
        if link is None:
            self._create(
                seg.vxlan,
                "x",
                kind="vxlan",
                vxlan_id=seg.vni,
                vxlan_local=self.plan.underlay,
                vxlan_port=VXLAN_PORT,
                vxlan_learning=0,
                vxlan_link=self.under,
                mtu=seg.mtu,
                master=bridge_index,
            )
            link = self._link(seg.vxlan)
        index = link["index"]
        self._common(link, index)
        if link.get("master") != bridge_index:
            self._set(index, master=bridge_index)
        self._up(link, index)
        return index

    def _addresses(self, bridge_index: int) -> None:
        # Clusters of one pool share its network (vmwebd/net/addressing.py), so several bridges
        # may carry the same gateway: without its prefix route, each guest routed by _routes.
        seg = self.seg
        want = {(seg.gateway, seg.prefix)} if seg.routed else set()
        have = set()
        for a in self.seen.addrs.get(bridge_index, []):
            key = (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
            flags = a.get_attr("IFA_FLAGS") or 0
            if key in want and a["family"] == socket.AF_INET and flags & IFA_F_NOPREFIXROUTE:
                have.add(key)
            else:
                self.ipr.addr("del", index=bridge_index, address=key[0], prefixlen=key[1])
                self.changed = True
        for address, prefix in want - have:
            self.ipr.addr(
                "add", index=bridge_index, address=address, prefixlen=prefix, IFA_FLAGS=IFA_F_NOPREFIXROUTE
            )
            self.changed = True

    def _routes(self, bridge_index: int) -> None:
        """One host route per local guest of a routed segment, through its bridge."""
        have = self.seen.routes.get(bridge_index, set())
        want = set(self.seg.local) if self.seg.routed else set()
        for dst in sorted(want - have):
            self.ipr.route(
                "replace",
                dst=f"{dst}/32",
                oif=bridge_index,
                scope=RT_SCOPE_LINK,
                proto=RTPROT_STATIC,
                table=RT_TABLE_MAIN,
            )
            self.changed = True
        for dst in sorted(have - want):
            self.ipr.route("del", dst=f"{dst}/32", oif=bridge_index, table=RT_TABLE_MAIN)
            self.changed = True

    def _fdb(self, vxlan_index: int) -> None:
        have = self.seen.fdb.get(vxlan_index, set())
        want = set(self.seg.peers)
        for dst in sorted(want - have):
            self.ipr.fdb("append", ifindex=vxlan_index, lladdr=ZERO_MAC, dst=dst)
            self.changed = True
        for dst in sorted(have - want):
            self.ipr.fdb("del", ifindex=vxlan_index, lladdr=ZERO_MAC, dst=dst)
            self.changed = True
