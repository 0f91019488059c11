"""NetlinkDevices and NftRules on real kernels: scratch namespaces stand for hosts and guests.

Two "hosts" (namespaces A and B) sit on one underlay, a bridge in a third namespace (the
"switch", which also holds 192.0.2.254, an address outside every segment). Guests are namespaces
whose one NIC is a veth whose other end is on a segment's bridge. Nothing is made in the namespace
the tests run in.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import threading
import time

import pytest
import pytest_twisted

from netns import Namespaces, run, unavailable, wait_until
from vmwebd.errors import ConfigError
from vmwebd.net.addressing import VXLAN_PORT, gateway_mac
from vmwebd.net.devices import Applied
from vmwebd.net.netlink import MARKER, NetlinkDevices, check_underlay
from vmwebd.net.nft import NftRules, digest, ruleset
from vmwebd.net.plan import HostPlan, Segment

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

UNDERLAY = {"a": "192.0.2.1", "b": "192.0.2.2"}
OUTSIDE = "192.0.2.254"
MTU = 1450


def seg(vni, cluster, mode="isolated", subnet="10.10.0.0/24", peers=(), mtu=MTU, local=()) -> Segment:
    net = ipaddress.IPv4Network(subnet)
    return Segment(
        vni=vni,
        cluster=cluster,
        mode=mode,
        mtu=mtu,
        subnet=subnet,
        gateway=str(net.network_address + 1),
        peers=tuple(sorted(peers)),
        local=tuple(local) if mode == "nat" else (),
    )


def plan(host: str, *segments: Segment, underlay: str | None = None) -> HostPlan:
    return HostPlan(
        host=host, underlay=UNDERLAY[host] if underlay is None else underlay, segments=tuple(sorted(segments))
    )


def apply(devices: NetlinkDevices, p: HostPlan):
    """``devices.apply(p)``: a Deferred firing with an :class:`Applied` (tests yield it)."""
    return devices.apply(p)


class Grid:
    def __init__(self, spaces: Namespaces, switch: str, hosts: dict[str, str]):
        self.ns, self.switch, self.hosts = spaces, switch, hosts
        self.guests: list[str] = []

    def devices(self, host: str, **kw) -> NetlinkDevices:
        from twisted.internet import reactor

        return NetlinkDevices(reactor, netns=self.hosts[host], **kw)

    def links(self, host: str) -> dict[str, dict]:
        return self.ns.links(self.hosts[host])

    def guest(self, tag: str, host: str, s: Segment, address: str) -> str:
        g = self.ns.guest(tag, self.hosts[host], s.bridge, f"{address}/{s.prefix}", s.mtu, gateway=s.gateway)
        self.guests.append(g)
        return g

    def reset(self) -> None:
        """Back to bare hosts: guests gone, every device but the underlay's deleted, no rules."""
        for g in self.guests:
            self.ns.remove(g)
        self.guests.clear()
        for ns in self.hosts.values():
            for name in self.ns.links(ns):
                if name not in ("lo", "ul"):
                    self.ns.ip(ns, "link", "del", name, check=False)
            if shutil.which("nft"):
                self.ns.exec(ns, "nft", "flush", "ruleset", check=False)


@pytest.fixture(scope="module")
def grid():
    spaces = Namespaces()
    try:
        switch = spaces.add("u")
        spaces.ip(switch, "link", "add", "sw0", "type", "bridge")
        spaces.ip(switch, "addr", "add", f"{OUTSIDE}/24", "dev", "sw0")
        spaces.ip(switch, "link", "set", "sw0", "up")
        hosts = {}
        for h, addr in UNDERLAY.items():
            hosts[h] = spaces.add(h)
            spaces.veth(hosts[h], "ul", switch, f"sw-{h}")
            spaces.ip(switch, "link", "set", f"sw-{h}", "master", "sw0")
            spaces.ip(hosts[h], "addr", "add", f"{addr}/24", "dev", "ul")
        probe = spaces.ip(
            hosts["a"],
            "link",
            "add",
            "vxprobe",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            str(VXLAN_PORT),
            "local",
            UNDERLAY["a"],
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip(f"vxlan devices cannot be made here: {probe.stderr.strip()}")
        spaces.ip(hosts["a"], "link", "del", "vxprobe")
        if (
            shutil.which("nft") is None
            or spaces.exec(hosts["a"], "nft", "list", "tables", check=False).returncode != 0
        ):
            pytest.skip("nftables (the nft command) is not usable here")
        yield Grid(spaces, switch, hosts)
    finally:
        spaces.close()


@pytest.fixture
def hosts(grid):
    grid.reset()
    yield grid
    grid.reset()


# -- the rules as text -----------------------------------------------------------------------------
def test_ruleset_text_is_accepted_by_nft(tmp_path):
    """Every shape of plan yields a script the real nft accepts in check mode."""
    if shutil.which("nft") is None:
        pytest.skip("needs the nft command")
    spaces = Namespaces(prefix=f"vmwt-{id(tmp_path) & 0xFFFF:x}")
    try:
        ns = spaces.add("c")
        plans = [
            plan("a"),
            plan("a", seg(100, "lab1")),
            plan(
                "a",
                seg(100, "lab1", "nat", peers=["192.0.2.2"]),
                seg(200, "lab2"),
                seg(300, "lab3", "nat", "10.30.0.0/26"),
            ),
            plan("a", Segment(400, "old", "nat", MTU, "", "", ())),  # nat without a subnet
        ]
        for i, p in enumerate(plans):
            path = tmp_path / f"rules{i}.nft"
            path.write_text(ruleset(p))
            res = spaces.exec(ns, "nft", "-c", "-f", str(path), check=False)
            assert res.returncode == 0, (res.stderr, path.read_text())
    finally:
        spaces.close()


def test_ruleset_names_each_cluster_and_replaces_only_its_tables():
    """Each rule of a segment carries its cluster's name; the script touches vmweb's tables only;
    a plan without segments only removes them."""
    p = plan("a", seg(100, "lab1", "nat"), seg(200, "lab2"))
    text = ruleset(p)
    for line in text.splitlines():
        if "vmbr100" in line or "vmvx100" in line:
            assert 'comment "cluster lab1"' in line, line
        if "vmbr200" in line:
            assert 'comment "cluster lab2"' in line, line
    tables = set(re.findall(r"table (\w+) (\w+)", text))
    assert tables == {("inet", "vmweb"), ("bridge", "vmweb")}
    assert "masquerade" in text and "10.10.0.1" in text
    empty = ruleset(plan("a"))
    assert "chain" not in empty and "delete table inet vmweb" in empty
    assert digest(p) != digest(plan("a", seg(100, "lab1", "nat")))


# -- devices ---------------------------------------------------------------------------------------
@pytest_twisted.inlineCallbacks
def test_devices_are_made_as_planned(hosts):
    """Bridge and VXLAN device have the planned id, port, local address, learning off, MTU,
    master and marker; forwarding entries are exactly the peers; only a nat bridge has an
    address, the gateway, with the gateway MAC; IPv4 forwarding is on."""
    nat, iso = (
        seg(100, "lab1", "nat", peers=["192.0.2.2", "192.0.2.3"]),
        seg(200, "lab2", "isolated", "10.20.0.0/24", peers=["192.0.2.2"]),
    )
    res = yield apply(hosts.devices("a"), plan("a", nat, iso))
    assert res.failed == {} and res.changed
    links = hosts.links("a")
    for s in (nat, iso):
        br, vx = links[s.bridge], links[s.vxlan]
        assert br["linkinfo"]["info_kind"] == "bridge"
        assert br["linkinfo"]["info_data"]["stp_state"] == 0
        assert br["linkinfo"]["info_data"]["forward_delay"] == 0
        info = vx["linkinfo"]["info_data"]
        assert vx["linkinfo"]["info_kind"] == "vxlan"
        assert (info["id"], info["port"], info["local"], info["learning"]) == (
            s.vni,
            VXLAN_PORT,
            UNDERLAY["a"],
            False,
        )
        assert info["link"] == "ul"
        assert vx["master"] == s.bridge
        assert br["mtu"] == vx["mtu"] == MTU
        assert br["ifalias"] == vx["ifalias"] == f"{MARKER}{s.cluster}"
        assert "UP" in br["flags"] and "UP" in vx["flags"]
        assert hosts.ns.fdb_zero(hosts.hosts["a"], s.vxlan) == set(s.peers)
    assert hosts.ns.addresses(hosts.hosts["a"], nat.bridge) == [("inet", "10.10.0.1", 24)]
    assert links[nat.bridge]["address"] == gateway_mac(100)
    assert hosts.ns.addresses(hosts.hosts["a"], iso.bridge) == []
    assert hosts.ns.exec(hosts.hosts["a"], "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    listing = hosts.ns.exec(hosts.hosts["a"], "nft", "list", "table", "inet", "vmweb").stdout
    assert 'comment "cluster lab1"' in listing and 'comment "cluster lab2"' in listing


@pytest_twisted.inlineCallbacks
def test_reapply_is_a_no_op_and_a_change_touches_only_what_differs(hosts):
    """The same plan twice changes nothing; new peers change the forwarding entries and keep the
    devices (same interface indexes)."""
    devices = hosts.devices("a")
    p = plan("a", seg(100, "lab1", "nat", peers=["192.0.2.2"]), seg(200, "lab2", peers=["192.0.2.2"]))
    assert (yield apply(devices, p)).changed
    before = {n: lk["ifindex"] for n, lk in hosts.links("a").items()}
    assert (yield apply(devices, p)) == Applied()
    assert devices.current() == p
    p2 = plan(
        "a", seg(100, "lab1", "nat", peers=["192.0.2.3", "192.0.2.4"]), seg(200, "lab2", peers=["192.0.2.2"])
    )
    res = yield apply(devices, p2)
    assert res.changed and res.failed == {} and res.removed == ()
    assert hosts.ns.fdb_zero(hosts.hosts["a"], "vmvx100") == {"192.0.2.3", "192.0.2.4"}
    assert hosts.ns.fdb_zero(hosts.hosts["a"], "vmvx200") == {"192.0.2.2"}
    assert {n: lk["ifindex"] for n, lk in hosts.links("a").items()} == before
    assert (yield apply(hosts.devices("a"), p2)) == Applied()  # a new instance sees the same


@pytest_twisted.inlineCallbacks
def test_a_segment_left_out_is_removed(hosts):
    """A plan without a segment deletes its devices (and so its forwarding entries); an empty
    plan leaves no device and no table of ours."""
    devices = hosts.devices("a")
    (yield apply(devices, plan("a", seg(100, "lab1", "nat", peers=["192.0.2.2"]), seg(200, "lab2"))))
    res = yield apply(devices, plan("a", seg(200, "lab2")))
    assert res.removed == ("vmbr100", "vmvx100") and res.changed and res.failed == {}
    links = hosts.links("a")
    assert "vmbr100" not in links and "vmvx100" not in links and "vmbr200" in links
    assert "vmvx100" not in run("bridge", "-n", hosts.hosts["a"], "fdb", "show").stdout
    res = yield apply(devices, plan("a"))
    assert res.removed == ("vmbr200", "vmvx200")
    assert set(hosts.links("a")) == {"lo", "ul"}
    assert NftRules(hosts.hosts["a"]).loaded_digests() == (None, None)
    assert (yield apply(devices, plan("a"))) == Applied()


@pytest_twisted.inlineCallbacks
def test_a_new_underlay_address_remakes_only_the_vxlan_devices(hosts):
    """When the underlay address changes, the VXLAN devices are made again from the new one
    (their local address cannot change in place); the bridges stay."""
    ns = hosts.hosts["a"]
    devices = hosts.devices("a")
    s = seg(100, "lab1", "nat", peers=["192.0.2.2"])
    (yield apply(devices, plan("a", s)))
    before = hosts.links("a")
    hosts.ns.ip(ns, "addr", "add", "192.0.2.11/24", "dev", "ul")
    res = yield apply(devices, plan("a", s, underlay="192.0.2.11"))
    assert res.changed and res.failed == {}
    after = hosts.links("a")
    assert after["vmvx100"]["linkinfo"]["info_data"]["local"] == "192.0.2.11"
    assert after["vmvx100"]["ifindex"] != before["vmvx100"]["ifindex"]
    assert after["vmbr100"]["ifindex"] == before["vmbr100"]["ifindex"]
    assert after["vmvx100"]["master"] == "vmbr100"
    assert hosts.ns.fdb_zero(ns, "vmvx100") == {"192.0.2.2"}
    hosts.ns.ip(ns, "addr", "del", "192.0.2.11/24", "dev", "ul")


@pytest_twisted.inlineCallbacks
def test_a_leftover_of_a_previous_run_is_removed(hosts):
    """Devices made by an earlier instance (before a crash) and not in a new instance's plan
    are recognised by their marker and deleted."""
    (yield apply(hosts.devices("a"), plan("a", seg(100, "lab1"), seg(200, "lab2"))))
    res = yield apply(hosts.devices("a"), plan("a", seg(200, "lab2")))
    assert res.removed == ("vmbr100", "vmvx100")
    assert "vmbr100" not in hosts.links("a")


@pytest_twisted.inlineCallbacks
def test_devices_not_ours_are_left_alone(hosts):
    """A vmvx device without our marker fails its segment, named, and stays as it was; so does a
    VXLAN device of another name using the segment's network id; other segments are made."""
    ns = hosts.hosts["a"]
    hosts.ns.ip(
        ns,
        "link",
        "add",
        "vmvx100",
        "type",
        "vxlan",
        "id",
        "999",
        "dstport",
        str(VXLAN_PORT),
        "local",
        UNDERLAY["a"],
    )
    hosts.ns.ip(
        ns,
        "link",
        "add",
        "other300",
        "type",
        "vxlan",
        "id",
        "300",
        "dstport",
        str(VXLAN_PORT),
        "local",
        UNDERLAY["a"],
    )
    hosts.ns.ip(ns, "link", "add", "vmbr400", "type", "bridge")
    before = hosts.links("a")
    res = yield apply(
        hosts.devices("a"),
        plan("a", seg(100, "lab1"), seg(200, "lab2"), seg(300, "lab3"), seg(400, "lab4", "nat")),
    )
    assert set(res.failed) == {100, 300, 400}
    assert "device vmvx100 exists and is not vmweb's" in res.failed[100]
    assert "other300" in res.failed[300] and "300" in res.failed[300]
    assert "device vmbr400 exists and is not vmweb's" in res.failed[400]
    assert hosts.ns.addresses(ns, "vmbr400") == [] and "vmvx400" not in hosts.links("a")
    rules = hosts.ns.exec(ns, "nft", "list", "table", "inet", "vmweb").stdout
    assert '"vmbr200"' in rules and '"vmbr400"' not in rules  # nothing forwarded for others
    after = hosts.links("a")
    for name in ("vmvx100", "other300"):
        assert after[name]["ifindex"] == before[name]["ifindex"]
        assert after[name]["linkinfo"]["info_data"]["id"] == before[name]["linkinfo"]["info_data"]["id"]
        assert "ifalias" not in after[name] and "master" not in after[name]
    assert "vmvx200" in after and "vmbr300" not in after
    # and an empty plan still does not touch them
    res = yield apply(hosts.devices("a"), plan("a"))
    assert "vmvx100" in hosts.links("a") and "vmvx100" not in res.removed


@pytest_twisted.inlineCallbacks
def test_missing_underlay_fails_every_segment(hosts):
    """With the underlay address on no interface, every segment fails naming it; check_underlay
    raises a ConfigError naming it, and names the interface of one that is there."""
    res = yield apply(
        hosts.devices("a"), plan("a", seg(100, "lab1"), seg(200, "lab2"), underlay="192.0.2.77")
    )
    assert set(res.failed) == {100, 200}
    assert all("192.0.2.77" in why for why in res.failed.values())
    assert "vmbr100" not in hosts.links("a")
    with pytest.raises(ConfigError, match=r"conf/vmwebd.xml: network/@underlay: .*192\.0\.2\.77"):
        check_underlay("192.0.2.77", netns=hosts.hosts["a"], source="conf/vmwebd.xml")
    with pytest.raises(ValueError, match="192.0.2.77 is not configured on any interface"):
        check_underlay("192.0.2.77", netns=hosts.hosts["a"])
    assert check_underlay(UNDERLAY["a"], netns=hosts.hosts["a"]) == "ul"


@pytest_twisted.inlineCallbacks
def test_a_missing_namespace_fails_every_segment_and_is_not_created(hosts):
    """An executor for a namespace that does not exist reports every segment failed, naming it,
    and creates no namespace."""
    from twisted.internet import reactor

    name = f"{hosts.ns.prefix}-missing"
    res = yield apply(NetlinkDevices(reactor, netns=name), plan("a", seg(100, "lab1")))
    assert set(res.failed) == {100} and name in res.failed[100]
    assert name not in run("ip", "netns", "list").stdout


@pytest_twisted.inlineCallbacks
def test_an_mtu_the_underlay_cannot_carry_fails_that_segment(hosts):
    """A guest MTU above the underlay's minus the VXLAN overhead fails the segment, saying so."""
    res = yield apply(hosts.devices("a"), plan("a", seg(100, "lab1", mtu=1480), seg(200, "lab2")))
    assert set(res.failed) == {100}
    assert "vmvx100" in res.failed[100] and "MTU 1480" in res.failed[100]
    assert "vmvx200" in hosts.links("a")


@pytest_twisted.inlineCallbacks
def test_applies_run_off_the_reactor_thread_one_at_a_time(hosts):
    """Concurrent applies never overlap, none runs on the reactor's thread, and the last
    submitted is what remains."""
    seen = {"threads": set(), "inside": 0, "overlap": False}

    class Watched(NetlinkDevices):
        def apply_blocking(self, p):
            seen["threads"].add(threading.current_thread())
            seen["inside"] += 1
            seen["overlap"] |= seen["inside"] > 1
            try:
                return super().apply_blocking(p)
            finally:
                seen["inside"] -= 1

    from twisted.internet import defer, reactor

    devices = Watched(reactor, netns=hosts.hosts["a"])
    plans = [plan("a", seg(100 + i, f"c{i}")) for i in range(4)]
    yield defer.gatherResults([devices.apply(p) for p in plans])
    assert not seen["overlap"]
    assert threading.main_thread() not in seen["threads"]
    assert devices.current() == plans[-1]
    assert {n for n in hosts.links("a") if n.startswith("vm")} == {"vmbr103", "vmvx103"}


# -- traffic ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_segments_carry_their_traffic_and_nothing_else(hosts):
    """Guests of one cluster on two hosts reach each other; a nat cluster's guests reach their
    gateway and, masqueraded to their host's underlay address, the outside, but not the host
    itself; an isolated cluster on the same hosts and subnet reaches neither them nor anything
    outside; a second nat cluster on the same host is unreachable until vmweb's rules are gone,
    and an apply puts them back."""
    if shutil.which("busybox") is None:
        pytest.skip("needs busybox (its ping)")
    peer = {"a": [UNDERLAY["b"]], "b": [UNDERLAY["a"]]}
    local1 = {"a": ["10.10.0.2"], "b": ["10.10.0.3"]}
    lab1 = {h: seg(100, "lab1", "nat", peers=peer[h], local=local1[h]) for h in "ab"}
    lab2 = {h: seg(200, "lab2", "isolated", peers=peer[h]) for h in "ab"}
    lab3 = seg(300, "lab3", "nat", "10.30.0.0/24", local=["10.30.0.2"])
    lab4 = seg(400, "lab4", "nat", local=["10.10.0.7"])
    devices = {h: hosts.devices(h) for h in "ab"}
    for h in "ab":
        extra = (lab3, lab4) if h == "a" else ()
        assert (yield apply(devices[h], plan(h, lab1[h], lab2[h], *extra))).failed == {}
    a1 = hosts.guest("a1", "a", lab1["a"], "10.10.0.2")
    b1 = hosts.guest("b1", "b", lab1["b"], "10.10.0.3")
    a2 = hosts.guest("a2", "a", lab2["a"], "10.10.0.4")
    b2 = hosts.guest("b2", "b", lab2["b"], "10.10.0.5")
    a3 = hosts.guest("a3", "a", lab3, "10.30.0.2")
    a4 = hosts.guest("a4", "a", lab4, "10.10.0.7")
    # a counter on the outside tells which source addresses reach it
    hosts.ns.exec(
        hosts.switch,
        "nft",
        "-f",
        "-",
        stdin=(
            "table inet probe {\n chain in {\n type filter hook input priority 0;\n"
            f" ip saddr {UNDERLAY['a']} icmp type echo-request counter\n"
            f" ip saddr {UNDERLAY['b']} icmp type echo-request counter\n"
            " ip saddr 10.0.0.0/8 counter\n }\n}\n"
        ),
    )

    ping = hosts.ns
    assert ping.reaches(a1, "10.10.0.3"), "lab1 across hosts"
    assert ping.reaches(b1, "10.10.0.2"), "lab1 back"
    assert ping.reaches(a2, "10.10.0.5") and ping.reaches(b2, "10.10.0.4"), "lab2 across hosts"
    assert ping.reaches(a1, "10.10.0.1") and ping.reaches(b1, "10.10.0.1"), "gateway on each host"
    assert ping.reaches(a1, OUTSIDE) and ping.reaches(b1, OUTSIDE), "nat out"
    counters = [
        int(n)
        for n in re.findall(
            r"counter packets (\d+)", ping.exec(hosts.switch, "nft", "list", "table", "inet", "probe").stdout
        )
    ]
    assert counters[0] >= 1 and counters[1] >= 1 and counters[2] == 0, counters
    assert ping.reaches(a3, "10.30.0.1")
    assert ping.reaches(a4, OUTSIDE), "a second nat cluster of the same network out"
    assert ping.reaches(a1, OUTSIDE), "the first one still"
    # b1 asked for its gateway, which B answered: had the request crossed the VXLAN, A would
    # have learnt b1's address from it
    neigh = ping.ip(hosts.hosts["a"], "neigh", "show", "10.10.0.3", "dev", "vmbr100").stdout
    assert "10.10.0.3" not in neigh, neigh

    assert not ping.ping(a1, "10.10.0.5"), "lab1 reached a lab2 guest on another host"
    assert not ping.ping(a1, "10.10.0.4"), "lab1 reached a lab2 guest on its host"
    assert not ping.ping(a2, "10.10.0.1"), "an isolated guest reached a gateway"
    assert not ping.ping(a2, OUTSIDE), "an isolated guest reached the outside"
    assert not ping.ping(a1, UNDERLAY["a"]), "a guest reached its host's own address"
    assert not ping.ping(a1, "10.30.0.2"), "lab1 reached lab3 through their host"

    # the rules are what keeps lab1 from lab3: without them the host routes between them
    ping.exec(hosts.hosts["a"], "nft", "delete", "table", "inet", "vmweb")
    assert ping.reaches(a1, "10.30.0.2")
    res = yield apply(devices["a"], plan("a", lab1["a"], lab2["a"], lab3, lab4))
    assert res.changed and res.failed == {}
    wait_until(lambda: not ping.ping(a1, "10.30.0.2"), "lab1 cut from lab3 again", timeout=8)


@pytest_twisted.inlineCallbacks
def test_apply_time_grows_with_segments(hosts, capsys):
    """Measures an apply of 1, 10 and 40 segments, then a no-op re-apply (printed with -s)."""
    devices = hosts.devices("a")
    for n in (1, 10, 40):
        p = plan(
            "a",
            *[
                seg(
                    1000 + i,
                    f"m{i}",
                    "nat" if i % 2 else "isolated",
                    f"10.{i // 250 + 64}.{i % 250}.0/24",
                    peers=["192.0.2.2", "192.0.2.3"],
                )
                for i in range(n)
            ],
        )
        t0 = time.monotonic()
        res = yield apply(devices, p)
        made = time.monotonic() - t0
        t0 = time.monotonic()
        again = yield apply(devices, p)
        noop = time.monotonic() - t0
        assert res.failed == {} and not again.changed
        with capsys.disabled():
            print(f"\napply {n} segments: {made * 1000:.0f} ms, again: {noop * 1000:.0f} ms")
