"""Guests' cloud-init NoCloud seeds: every seed is checked with Debian's real cloud-init (its
schema check and its network renderers), the ISO is read back, and a property over cluster shapes
checks /etc/hosts, the address and determinism."""

import ipaddress
import os
import re
import shutil
import subprocess

import pycdlib
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import UserRec, VClusterRec, VmRec
from vmwebd.errors import InvalidArgument
from vmwebd.net import seed
from vmwebd.net.seed import SeedSpec, build_iso, kernel_ip_arg, read_iso, seed_files, seed_for, write_seed

CLOUD_INIT = "/usr/bin/cloud-init"
needs_cloud_init = pytest.mark.skipif(
    not os.path.exists(CLOUD_INIT), reason="Debian's cloud-init is not installed"
)


def openssh_key(kind="ed25519", comment="alice@laptop") -> str:
    priv = (
        ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    )
    line = (
        priv.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return f"{line} {comment}" if comment else line


KEYS = [
    openssh_key("ed25519", "alice@laptop"),
    openssh_key("ecdsa", "alice, work"),
    openssh_key("ed25519", ""),
]


def vm_ips(subnet: str, gateway: str, n: int) -> list[str]:
    net = ipaddress.IPv4Network(subnet)
    out = []
    for a in net.hosts():
        if str(a) != gateway:
            out.append(str(a))
        if len(out) == n:
            break
    return out


def make_dom(
    names,
    mode="nat",
    subnet="10.77.2.0/23",
    keys=(),
    dns="10.77.2.1",
    mtu=0,
    absent=(),
    cluster="lab",
    order=None,
) -> Dom:
    """A real DOM with user alice owning cluster ``cluster`` of VMs ``names``."""
    dom = Dom(HybridClock("h1", lambda: 0))
    dom.put(UserRec(id="alice", ssh_keys=UserRec.encode_ssh_keys(keys)))
    gateway = str(ipaddress.IPv4Network(subnet).network_address + 1) if subnet else ""
    dom.put(
        VClusterRec(
            id=cluster, owner="alice", vni=4101, mode=mode, subnet=subnet, gateway=gateway, mtu=mtu, dns=dns
        )
    )
    ips = vm_ips(subnet or "10.9.9.0/24", gateway, len(names))
    assert len(ips) == len(names), f"{subnet} holds {len(ips)} VMs, not {len(names)}"
    recs = [
        VmRec(
            id=f"{cluster}/{n}",
            cluster=cluster,
            name=n,
            ip=ip,
            mac="52:54:00:%02x:%02x:%02x" % (7, i >> 8, i & 0xFF),
            token=f"t{i}",
            desired="absent" if n in absent else "running",
            vcpus=2,
        )
        for i, (n, ip) in enumerate(zip(names, ips))
    ]
    for r in order(recs) if order else recs:
        dom.put(r)
    return dom


def spec_of(dom, name="web-1", cluster="lab") -> SeedSpec:
    return seed_for(dom, dom.get(VmRec, f"{cluster}/{name}"))


def hosts_lines(files) -> list[str]:
    ud = yaml.safe_load(files["user-data"])
    (wf,) = [f for f in ud["write_files"] if f["path"] == "/etc/hosts"]
    return wf["content"].splitlines()


# -- the files, exactly ------------------------------------------------------------------------
def test_nat_seed_files_exact_layout():
    """A nat-mode VM's three files are exactly the documented layout."""
    key = KEYS[0]
    dom = make_dom(["web-0", "web-1", "web-10", "web-2"], keys=[key])
    files = seed_files(spec_of(dom))
    assert files["meta-data"] == b"instance-id: vmweb-lab-web-1-t1\nlocal-hostname: web-1\n"
    assert files["network-config"].decode() == (
        "network:\n"
        "  ethernets:\n"
        "    eth0:\n"
        "      addresses:\n"
        "      - 10.77.2.3/23\n"
        "      gateway4: 10.77.2.1\n"
        "      match:\n"
        "        macaddress: '52:54:00:07:00:01'\n"
        "      mtu: 1450\n"
        "      nameservers:\n"
        "        addresses:\n"
        "        - 10.77.2.1\n"
        "      set-name: eth0\n"
        "  version: 2\n"
    )
    assert files["user-data"].decode() == (
        "#cloud-config\n"
        "fqdn: web-1.lab\n"
        "hostname: web-1\n"
        "manage_etc_hosts: false\n"
        "ssh_authorized_keys:\n"
        f"- {key}\n"
        "write_files:\n"
        "- content: |\n"
        "    127.0.0.1 localhost\n"
        "    ::1 localhost ip6-localhost ip6-loopback\n"
        "    10.77.2.2 web-0.lab web-0\n"
        "    10.77.2.3 web-1.lab web-1\n"
        "    10.77.2.5 web-2.lab web-2\n"
        "    10.77.2.4 web-10.lab web-10\n"
        "  owner: root:root\n"
        "  path: /etc/hosts\n"
        "  permissions: '0644'\n"
    )


def test_awk_contract_lines():
    """The lines a guest's awk reads are where the docstring says, for any MAC."""
    for mac in ("52:54:00:12:34:56", "52:54:00:ab:cd:ef"):
        dom = make_dom(["web-1"])
        vm = dom.get(VmRec, "lab/web-1")
        dom.put(VmRec(**{**vm.__dict__, "mac": mac}))
        lines = seed_files(spec_of(dom))["network-config"].decode().splitlines()
        i = lines.index("      addresses:")
        assert re.fullmatch(r"      - \d+\.\d+\.\d+\.\d+/\d+", lines[i + 1])
        assert "      gateway4: 10.77.2.1" in lines
        assert "      mtu: 1450" in lines
        assert f"        macaddress: '{mac}'" in lines


def test_isolated_has_no_gateway_and_legacy_cluster_falls_back_to_24():
    """Isolated segments get no default route; a cluster made before segments gets /24 and none."""
    iso = spec_of(make_dom(["web-1", "web-2"], mode="isolated"))
    assert iso.gateway == "" and iso.address == "10.77.2.2/23"
    assert b"gateway4" not in seed_files(iso)["network-config"]
    legacy = spec_of(make_dom(["web-1"], mode="nat", subnet="", dns=""))
    assert legacy.address.endswith("/24") and legacy.gateway == "" and legacy.dns == ()
    assert b"nameservers" not in seed_files(legacy)["network-config"]


def test_kernel_ip_arg():
    """The kernel's ip= argument: client, empty server, gateway (or empty), netmask, name."""
    assert (
        kernel_ip_arg(spec_of(make_dom(["web-1"]))) == "ip=10.77.2.2::10.77.2.1:255.255.254.0:web-1:eth0:off"
    )
    assert (
        kernel_ip_arg(spec_of(make_dom(["web-1"], mode="isolated", subnet="10.5.0.0/26")))
        == "ip=10.5.0.2:::255.255.255.192:web-1:eth0:off"
    )


def test_instance_id_changes_with_a_new_creation():
    """The instance id is stable for one creation and new when the VM is made again."""
    dom = make_dom(["web-1"])
    a = spec_of(dom).instance_id
    assert spec_of(dom).instance_id == a
    vm = dom.get(VmRec, "lab/web-1")
    dom.put(VmRec(**{**vm.__dict__, "token": "again"}))
    assert spec_of(dom).instance_id != a == "vmweb-lab-web-1-t0"


def test_cluster_hosts_text_and_mpi_hostfile():
    """The hosts lines list every member with an address; the MPI hostfile only the members
    observed running in this creation, with their vCPUs as slots."""
    from vmwebd.dom.records import VmStatus

    dom = make_dom(["n-1", "n-10", "n-2", "gone"], absent={"gone"})
    c = dom.get(VClusterRec, "lab")
    assert seed.cluster_hosts_text(dom, c) == (
        "10.77.2.2 n-1.lab n-1\n10.77.2.4 n-2.lab n-2\n10.77.2.3 n-10.lab n-10\n"
    )
    assert seed.mpi_hostfile(dom, c) == ""
    dom.put(VmStatus(id="lab/n-1", state="running", token="t0"))
    dom.put(VmStatus(id="lab/n-10", state="running", token="t1"))
    dom.put(VmStatus(id="lab/n-2", state="running", token="an-older-creation"))
    assert seed.mpi_hostfile(dom, c) == "n-1.lab slots=2\nn-10.lab slots=2\n"


@pytest.mark.parametrize(
    "field,change",
    [
        ("ip", {"ip": ""}),
        ("ip", {"ip": "10.77.2.1"}),
        ("ip", {"ip": "10.99.0.5"}),
        ("mac", {"mac": "nope"}),
        ("cluster", {"cluster": "gone"}),
    ],
)
def test_bad_vm_refused_naming_the_field(field, change):
    """A VM lacking what a seed needs is refused with the field named."""
    dom = make_dom(["web-1"])
    vm = dom.get(VmRec, "lab/web-1")
    with pytest.raises(InvalidArgument) as e:
        seed_for(dom, VmRec(**{**vm.__dict__, **change}))
    assert e.value.field == field and "lab/web-1" in str(e.value)


def test_bad_cluster_settings_refused():
    """Malformed DNS servers, too many of them, or too many SSH keys are refused by name."""
    with pytest.raises(InvalidArgument, match="dns"):
        spec_of(make_dom(["web-1"], dns="8.8.8.8 not-an-ip"))
    with pytest.raises(InvalidArgument, match="dns"):
        spec_of(make_dom(["web-1"], dns="1.1.1.1 1.0.0.1 8.8.8.8 8.8.4.4"))
    many = [KEYS[2]] * (seed.MAX_SSH_KEYS + 1)
    with pytest.raises(InvalidArgument) as e:
        spec_of(make_dom(["web-1"], keys=many))
    assert e.value.field == "ssh_keys"


# -- Debian's cloud-init reads them ------------------------------------------------------------
SHAPES = {
    "nat-keys": dict(mode="nat", keys=KEYS),
    "isolated-nokeys": dict(mode="isolated", keys=(), dns=""),
    "legacy": dict(mode="nat", subnet="", dns=""),
    "nat-mtu-small-segment": dict(
        mode="nat", subnet="192.168.50.64/27", mtu=8950, dns="9.9.9.9 1.1.1.1", keys=KEYS[:1]
    ),
}


def _cloud_init(*args, cwd):
    return subprocess.run([CLOUD_INIT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_cloud_init
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cloud_init_accepts_user_data(shape, tmp_path):
    """`cloud-init schema` finds every user-data valid cloud-config."""
    files = seed_files(spec_of(make_dom(["web-0", "web-1", "db"], **SHAPES[shape])))
    (tmp_path / "user-data").write_bytes(files["user-data"])
    r = _cloud_init("schema", "--config-file", "user-data", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Valid cloud-config" in r.stdout


def _net_convert(files, tmp_path, output_kind) -> str:
    (tmp_path / "network-config").write_bytes(files["network-config"])
    out = tmp_path / f"out-{output_kind}"
    r = _cloud_init(
        "devel",
        "net-convert",
        "-p",
        "network-config",
        "-k",
        "yaml",
        "-d",
        str(out),
        "-D",
        "debian",
        "-O",
        output_kind,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return "\n".join(p.read_text() for p in sorted(out.rglob("*")) if p.is_file())


@needs_cloud_init
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cloud_init_renders_the_lease_for_networkd(shape, tmp_path):
    """net-convert to systemd-networkd renders the address/prefix, MTU, gateway and MAC match."""
    spec = spec_of(make_dom(["web-0", "web-1", "db"], **SHAPES[shape]))
    text = _net_convert(seed_files(spec), tmp_path, "networkd")
    assert f"Address={spec.address}" in text
    assert f"MTUBytes={spec.mtu}" in text
    assert f"MACAddress={spec.mac}" in text and "Name=eth0" in text
    if spec.gateway:
        assert f"Gateway={spec.gateway}" in text
    else:
        assert "Gateway=" not in text
    for server in spec.dns:
        assert server in text


@needs_cloud_init
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cloud_init_renders_the_lease_for_ifupdown(shape, tmp_path):
    """net-convert to Debian's ifupdown (ENI) renders a static address, the MTU, ifupdown's own
    gateway option (no net-tools `route` command) and names eth0 by its MAC."""
    spec = spec_of(make_dom(["web-0", "web-1", "db"], **SHAPES[shape]))
    text = _net_convert(seed_files(spec), tmp_path, "eni")
    assert "iface eth0 inet static" in text
    assert f"address {spec.address}" in text
    assert f"mtu {spec.mtu}" in text
    assert f'ATTR{{address}}=="{spec.mac}", NAME="eth0"' in text
    assert "route add" not in text
    if spec.gateway:
        assert f"gateway {spec.gateway}" in text
    else:
        assert "gateway" not in text


# -- the volume --------------------------------------------------------------------------------
def test_iso_reads_back_with_cidata_label_and_real_names():
    """The volume is labelled cidata; Rock Ridge and Joliet both name the three files."""
    files = seed_files(spec_of(make_dom(["web-0", "web-1"], keys=KEYS)))
    data = build_iso(files)
    iso = pycdlib.PyCdlib()
    import io

    iso.open_fp(io.BytesIO(data))
    try:
        assert iso.pvd.volume_identifier.decode().rstrip() == "cidata"
        rr = sorted(c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/") if not c.is_dir())
        joliet = sorted(
            c.file_identifier().decode("utf-16-be")
            for c in iso.list_children(joliet_path="/")
            if not c.is_dir()
        )
        assert rr == joliet == ["meta-data", "network-config", "user-data"]
        for name, content in files.items():
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, joliet_path="/" + name)
            assert buf.getvalue() == content
    finally:
        iso.close()
    assert read_iso(data) == ("cidata", files)


@pytest.mark.skipif(not shutil.which("blkid"), reason="no blkid")
def test_blkid_sees_the_label(tmp_path):
    """util-linux (what a guest's udev uses to find the seed) sees an iso9660 labelled cidata."""
    p = tmp_path / "seed.iso"
    write_seed(p, spec_of(make_dom(["web-1"])))
    r = subprocess.run(["blkid", "-o", "export", str(p)], capture_output=True, text=True)
    assert "LABEL=cidata" in r.stdout and "TYPE=iso9660" in r.stdout


def test_write_seed_writes_only_when_content_changes(tmp_path):
    """write_seed writes a new or changed seed, leaves an equal one alone, replaces a corrupt
    one, and leaves no temporary file behind."""
    p = tmp_path / "web-1.iso"
    dom = make_dom(["web-1", "web-2"])
    assert write_seed(p, spec_of(dom)) is True
    before = p.stat().st_mtime_ns, p.read_bytes()
    assert write_seed(p, spec_of(dom)) is False
    assert (p.stat().st_mtime_ns, p.read_bytes()) == before
    dom.put(UserRec(id="alice", ssh_keys=UserRec.encode_ssh_keys(KEYS[:1])))  # a key added
    assert write_seed(p, spec_of(dom)) is True
    assert KEYS[0].encode() in read_iso(p.read_bytes())[1]["user-data"]
    p.write_bytes(b"not an iso")
    assert write_seed(p, spec_of(dom)) is True
    assert read_iso(p.read_bytes())[0] == "cidata"
    assert sorted(os.listdir(tmp_path)) == ["web-1.iso"]


# -- a property over cluster shapes ------------------------------------------------------------
@st.composite
def clusters(draw):
    prefix = draw(st.integers(22, 28))
    n = draw(st.integers(1, min(30, 2 ** (32 - prefix) - 3)))  # what the segment holds
    names = draw(
        st.lists(
            st.sampled_from([f"{r}-{i}" for r in ("web", "db", "n") for i in range(40)]),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    absent = draw(st.sets(st.sampled_from(names), max_size=len(names) - 1))
    mode = draw(st.sampled_from(["nat", "isolated"]))
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True))
    base = draw(st.sampled_from(["10.77.0.0", "172.20.8.0", "192.168.0.0"]))
    subnet = str(ipaddress.IPv4Network(f"{base}/{prefix}", strict=False))
    return names, absent, mode, keys, subnet


@pytest.mark.property
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_property_hosts_address_determinism(shape):
    """For any cluster: every member is in every guest's /etc/hosts exactly once (absent VMs
    never), each address lies in the segment and is never its network, broadcast or gateway,
    the gateway is there only in nat mode, and the files do not depend on write order."""
    names, absent, mode, keys, subnet = shape
    dom = make_dom(names, mode=mode, subnet=subnet, keys=keys, absent=absent)
    other = make_dom(
        names, mode=mode, subnet=subnet, keys=keys, absent=absent, order=lambda rs: list(reversed(rs))
    )
    net = ipaddress.IPv4Network(subnet)
    gw = net.network_address + 1
    live = [n for n in names if n not in absent]
    for name in live:
        spec = spec_of(dom, name)
        files = seed_files(spec)
        assert files == seed_files(spec_of(other, name)) == seed_files(spec)
        lines = hosts_lines(files)
        for m in names:
            count = sum(1 for ln in lines if ln.split()[1:] == [f"{m}.lab", m])
            assert count == (0 if m in absent else 1), (m, lines)
        iface = ipaddress.IPv4Interface(spec.address)
        assert iface.network == net
        assert iface.ip not in (net.network_address, net.broadcast_address, gw)
        assert (spec.gateway == str(gw)) == (mode == "nat")
        ud = yaml.safe_load(files["user-data"])
        assert ud.get("ssh_authorized_keys", []) == list(keys)
        nc = yaml.safe_load(files["network-config"])["network"]["ethernets"]["eth0"]
        assert nc["addresses"] == [spec.address] and nc["match"]["macaddress"] == spec.mac
