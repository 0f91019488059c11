"""Tests for vmwebd.config: the shipped config, defaults, and errors naming file, line and field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from vmwebd.config import (
    DEFAULT_API_PORT,
    DEFAULT_PEER_PORT,
    MAX_XML_FILE_BYTES,
    Address,
    Config,
    HostConfig,
    IpPool,
    Limits,
    load_config,
    parse_xml,
)
from vmwebd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "conf" / "vmwebd.xml"


def write(tmp_path: Path, text: str, name: str = "vmwebd.xml") -> Path:
    """Write a config next to an existing templates/ directory and return its path."""
    (tmp_path / "templates").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return path


def cfg(body: str = "", host: str = '<host id="h1"/>') -> str:
    """A config whose root is on line 1, ``host`` on line 2 and ``body`` from line 3 on."""
    return f'<vmwebd>\n{host}\n{body}\n</vmwebd>\n'


def expect_error(path: Path, line: int | None, field: str, fragment: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    e = info.value
    assert (e.path, e.line, e.field) == (str(path), line, field), str(e)
    assert fragment in str(e)
    where = f"{path}:{line}" if line else str(path)
    assert str(e).startswith(f"{where}: {field}: ")
    return e


# -- what loads --------------------------------------------------------------------------------


def test_shipped_config_loads_with_production_defaults():
    """The shipped conf/vmwebd.xml loads into a complete Config with qemu:///system."""
    c = load_config(SHIPPED)
    assert c.host == HostConfig("host1")
    assert c.libvirt_uri == "qemu:///system"
    assert c.listen.api == Address("127.0.0.1", 8470)
    assert c.listen.peer == Address("127.0.0.1", 8570)
    assert c.state_dir == Path("/var/lib/vmwebd")
    assert c.templates_dir == REPO / "conf" / "templates"
    assert c.image_names == {"debian-12"}
    assert c.ip_pool_names == {"lab"}
    assert c.ip_pool("lab").first_address() == ipaddress.IPv4Address("10.77.1.1")
    assert c.mac.prefix == "52:54:00"
    assert (c.vni.first, c.vni.last) == (100, 4095)
    assert c.limits == Limits(256, 1048576, 1000)
    assert c.reconcile_interval == 30.0
    assert c.peers.seeds == () and c.peers.fanout == 3
    assert c.source == SHIPPED


def test_minimal_config_gets_documented_defaults(tmp_path):
    """A config with only <host> gets every documented default."""
    c = load_config(write(tmp_path, cfg()))
    assert c.listen.api.port == DEFAULT_API_PORT and c.listen.peer.port == DEFAULT_PEER_PORT
    assert c.libvirt_uri == "qemu:///system"
    assert c.storage.pool == "vmweb" and c.storage.dir == Path("/var/lib/vmwebd/images")
    assert c.templates_dir == tmp_path / "templates"
    assert c.images == () and c.ip_pools == ()
    assert c.limits == Limits()


def test_relative_paths_and_test_uri_resolve_against_config_dir(tmp_path):
    """Relative state/storage/template dirs and test: URIs become absolute paths under the config's directory."""
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "h1.xml").write_text("<node/>")
    (tmp_path / "tpl").mkdir()
    path = write(
        tmp_path, cfg('<state dir="state"/>\n<libvirt uri="test:hosts/h1.xml"/>\n<templates dir="tpl"/>')
    )
    c = load_config(path)
    assert c.state_dir == tmp_path / "state"
    assert c.storage.dir == tmp_path / "state" / "images"
    assert c.libvirt_uri == f"test://{tmp_path}/hosts/h1.xml"
    assert c.templates_dir == tmp_path / "tpl"


def test_absolute_test_uri_and_default_test_uri_are_kept(tmp_path):
    """An absolute test:/// URI to an existing file and test:///default are kept as written."""
    host = tmp_path / "h.xml"
    host.write_text("<node/>")
    assert (
        load_config(write(tmp_path, cfg(f'<libvirt uri="test://{host}"/>'))).libvirt_uri == f"test://{host}"
    )
    assert (
        load_config(write(tmp_path, cfg('<libvirt uri="test:///default"/>'))).libvirt_uri == "test:///default"
    )


def test_ipv6_listen_port_zero_and_seed_lists(tmp_path):
    """IPv6 literals, port 0 for listening and comma- or space-separated seeds are accepted."""
    c = load_config(
        write(
            tmp_path,
            cfg(
                '<listen api="[::1]:0" peer="localhost:9000"/>\n'
                '<peers seeds="10.0.0.2:8570, host-b.example:8570 [fd00::3]:8570" fanout="5"/>'
            ),
        )
    )
    assert c.listen.api == Address("::1", 0) and str(c.listen.api) == "[::1]:0"
    assert c.listen.peer == Address("localhost", 9000)
    assert [str(s) for s in c.peers.seeds] == ["10.0.0.2:8570", "host-b.example:8570", "[fd00::3]:8570"]
    assert c.peers.fanout == 5


def test_several_ip_pools_and_usable_addresses(tmp_path):
    """Several disjoint pools load; usable addresses skip network, broadcast and reserved ranges."""
    c = load_config(
        write(
            tmp_path,
            cfg(
                '<pools>\n<ip name="a" cidr="10.1.0.0/29" reserve="10.1.0.0/30"/>\n'
                '<ip name="b" cidr="10.2.0.0/24" reserve="10.2.0.1/32,10.2.0.2/32"/>\n</pools>'
            ),
        )
    )
    a, b = c.ip_pools
    assert [str(x) for x in a.addresses()] == ["10.1.0.4", "10.1.0.5", "10.1.0.6"]
    assert b.first_address() == ipaddress.IPv4Address("10.2.0.3")
    assert "10.2.0.3" in b and "10.2.0.1" not in b and "10.2.0.255" not in b and "10.3.0.1" not in b


def test_with_overrides_replaces_fields_and_keeps_the_rest():
    """Config.with_overrides returns a modified copy and leaves the original untouched."""
    c = load_config(SHIPPED)
    d = c.with_overrides(host=HostConfig("host2"), reconcile_interval=0.5)
    assert d.host.id == "host2" and d.reconcile_interval == 0.5 and d.images == c.images
    assert c.host.id == "host1"


def test_config_is_frozen():
    """A loaded Config cannot be mutated."""
    c = load_config(SHIPPED)
    with pytest.raises(AttributeError):
        c.host = HostConfig("x")  # type: ignore[misc]


def test_config_built_in_code_needs_only_host_and_templates_dir(tmp_path):
    """Config can be built in code from a host and a templates dir, with defaults for the rest."""
    c = Config(host=HostConfig("h1"), templates_dir=tmp_path)
    assert c.listen.api == Address("127.0.0.1", 8470) and c.source is None


# -- what is refused: each error names file, line and field -------------------------------------

BAD = [
    # (id, text, line, field, fragment)
    (
        "api-port",
        cfg('<listen api="127.0.0.1:99999"/>'),
        3,
        "listen/@api",
        "'127.0.0.1:99999' is not a valid host:port",
    ),
    ("api-no-port", cfg('<listen api="localhost"/>'), 3, "listen/@api", "not a valid host:port"),
    ("api-bad-ipv4", cfg('<listen api="999.1.1.1:80"/>'), 3, "listen/@api", "not a valid host:port"),
    ("api-bad-ipv6", cfg('<listen api="[fd00::zz]:80"/>'), 3, "listen/@api", "not a valid host:port"),
    ("peer-port", cfg('<listen peer="127.0.0.1:8x"/>'), 3, "listen/@peer", "not a valid host:port"),
    ("api-eq-peer", cfg('<listen api="127.0.0.1:9" peer="127.0.0.1:9"/>'), 3, "listen/@peer", "same address"),
    (
        "listen-unknown-attr",
        cfg('<listen api="127.0.0.1:1" web="x"/>'),
        3,
        "listen/@web",
        "unknown attribute",
    ),
    ("listen-twice", cfg('<listen/>\n<listen/>'), 4, "listen", "only once (first at line 3)"),
    ("host-missing", "<vmwebd>\n<state dir='/x'/>\n</vmwebd>", 1, "host", "required element is missing"),
    ("host-id-missing", cfg(host='<host cpus="2"/>'), 2, "host/@id", "required attribute is missing"),
    ("host-id-bad", cfg(host='<host id="Host_1"/>'), 2, "host/@id", "'Host_1' is not a valid host id"),
    ("host-cpus-zero", cfg(host='<host id="h" cpus="0"/>'), 2, "host/@cpus", "0 is out of range 1..4096"),
    ("host-cpus-empty", cfg(host='<host id="h" cpus=""/>'), 2, "host/@cpus", "'' is not an integer"),
    ("host-mem-text", cfg(host='<host id="h" memory-mib="lots"/>'), 2, "host/@memory-mib", "not an integer"),
    ("host-child", cfg(host='<host id="h"><cpu/></host>'), 2, "host/cpu", "unknown element"),
    ("unknown-element", cfg('<frobnicate/>'), 3, "frobnicate", "unknown element"),
    ("unknown-nested", cfg('<pools>\n<vlan/>\n</pools>'), 4, "pools/vlan", "unknown element"),
    ("namespaced-element", cfg('<x:listen xmlns:x="urn:x"/>'), 3, "{urn:x}listen", "unknown element"),
    ("stray-text", cfg('<state dir="/x">hello</state>'), 3, "state", "unexpected text 'hello'"),
    (
        "root-attr",
        '<vmwebd version="1">\n<host id="h"/>\n</vmwebd>',
        1,
        "vmwebd/@version",
        "unknown attribute",
    ),
    ("root-name", '<config>\n<host id="h"/>\n</config>', 1, "config", "root element must be <vmwebd>"),
    ("state-no-dir", cfg('<state/>'), 3, "state/@dir", "required attribute is missing"),
    ("libvirt-bad-uri", cfg('<libvirt uri="not a uri"/>'), 3, "libvirt/@uri", "is not a libvirt URI"),
    (
        "libvirt-missing-test-file",
        cfg('<libvirt uri="test:nope/h1.xml"/>'),
        3,
        "libvirt/@uri",
        "does not exist",
    ),
    (
        "libvirt-missing-abs-test-file",
        cfg('<libvirt uri="test:///nonexistent/h1.xml"/>'),
        3,
        "libvirt/@uri",
        "does not exist",
    ),
    ("storage-pool", cfg('<storage pool="my pool"/>'), 3, "storage/@pool", "not a valid libvirt pool name"),
    (
        "image-dup",
        cfg(
            '<images>\n<image name="d" file="a.qcow2" size-mib="1"/>\n'
            '<image name="d" file="b.qcow2" size-mib="1"/>\n</images>'
        ),
        5,
        "images/image/@name",
        "duplicate image name 'd' (first at line 4)",
    ),
    (
        "image-size",
        cfg('<images><image name="d" file="d" size-mib="-1"/></images>'),
        3,
        "images/image/@size-mib",
        "out of range",
    ),
    (
        "image-format",
        cfg('<images><image name="d" file="d" size-mib="1" format="vmdk"/></images>'),
        3,
        "images/image/@format",
        "'vmdk'",
    ),
    (
        "image-file-path",
        cfg('<images><image name="d" file="../x" size-mib="1"/></images>'),
        3,
        "images/image/@file",
        "plain file name",
    ),
    (
        "image-no-file",
        cfg('<images><image name="d" size-mib="1"/></images>'),
        3,
        "images/image/@file",
        "required attribute",
    ),
    (
        "image-bad-name",
        cfg('<images><image name="-d" file="d" size-mib="1"/></images>'),
        3,
        "images/image/@name",
        "not a valid image name",
    ),
    (
        "ip-host-bits",
        cfg('<pools><ip name="lab" cidr="10.77.0.1/16"/></pools>'),
        3,
        "pools/ip/@cidr",
        "has host bits set",
    ),
    (
        "ip-bad-octet",
        cfg('<pools><ip name="lab" cidr="10.300.0.0/16"/></pools>'),
        3,
        "pools/ip/@cidr",
        "not a valid CIDR",
    ),
    ("ip-v6", cfg('<pools><ip name="lab" cidr="fd00::/64"/></pools>'), 3, "pools/ip/@cidr", "only IPv4"),
    ("ip-tiny", cfg('<pools><ip name="lab" cidr="10.0.0.0/31"/></pools>'), 3, "pools/ip/@cidr", "too small"),
    ("ip-no-cidr", cfg('<pools><ip name="lab"/></pools>'), 3, "pools/ip/@cidr", "required attribute"),
    (
        "ip-reserve-outside",
        cfg('<pools><ip name="lab" cidr="10.77.0.0/16" reserve="10.78.0.0/24"/></pools>'),
        3,
        "pools/ip/@reserve",
        "not inside 10.77.0.0/16",
    ),
    (
        "ip-reserve-all",
        cfg('<pools><ip name="lab" cidr="10.77.0.0/24" reserve="10.77.0.0/24"/></pools>'),
        3,
        "pools/ip/@reserve",
        "leaves no address for a VM",
    ),
    (
        "ip-only-gateway",
        cfg('<pools><ip name="lab" cidr="10.77.0.0/30" reserve="10.77.0.2/32"/></pools>'),
        3,
        "pools/ip/@reserve",
        "besides its gateway 10.77.0.1",
    ),
    (
        "ip-gateway-outside",
        cfg('<pools><ip name="lab" cidr="10.77.0.0/24" gateway="10.78.0.1"/></pools>'),
        3,
        "pools/ip/@gateway",
        "not a host address of 10.77.0.0/24",
    ),
    (
        "ip-gateway-broadcast",
        cfg('<pools><ip name="lab" cidr="10.77.0.0/24" gateway="10.77.0.255"/></pools>'),
        3,
        "pools/ip/@gateway",
        "not a host address",
    ),
    ("net-underlay", cfg('<network underlay="10.0.0.300"/>'), 3, "network/@underlay", "not an IPv4 address"),
    (
        "net-underlay-any",
        cfg('<network underlay="0.0.0.0"/>'),
        3,
        "network/@underlay",
        "cannot be a host's own",
    ),
    ("net-mtu", cfg('<network underlay-mtu="1000"/>'), 3, "network/@underlay-mtu", "out of range"),
    (
        "net-devices",
        cfg('<network devices="magic"/>'),
        3,
        "network/@devices",
        "is not one of auto, kernel, record",
    ),
    (
        "ip-dup-name",
        cfg('<pools>\n<ip name="lab" cidr="10.1.0.0/16"/>\n<ip name="lab" cidr="10.2.0.0/16"/>\n</pools>'),
        5,
        "pools/ip/@name",
        "duplicate pool name 'lab' (first at line 4)",
    ),
    (
        "ip-overlap",
        cfg('<pools>\n<ip name="a" cidr="10.1.0.0/16"/>\n<ip name="b" cidr="10.1.2.0/24"/>\n</pools>'),
        5,
        "pools/ip/@cidr",
        "overlaps pool 'a'",
    ),
    ("mac-short", cfg('<pools><mac prefix="52:54"/></pools>'), 3, "pools/mac/@prefix", "three octets"),
    ("mac-multicast", cfg('<pools><mac prefix="03:00:5e"/></pools>'), 3, "pools/mac/@prefix", "multicast"),
    (
        "mac-global",
        cfg('<pools><mac prefix="00:16:3e"/></pools>'),
        3,
        "pools/mac/@prefix",
        "not locally administered",
    ),
    ("vni-order", cfg('<pools><vni first="200" last="100"/></pools>'), 3, "pools/vni/@last", "below first"),
    ("vni-range", cfg('<pools><vni last="16777216"/></pools>'), 3, "pools/vni/@last", "out of range"),
    (
        "limits-zero",
        cfg('<limits max-vms-per-cluster="0"/>'),
        3,
        "limits/@max-vms-per-cluster",
        "out of range",
    ),
    (
        "limits-float",
        cfg('<limits max-request-bytes="1e6"/>'),
        3,
        "limits/@max-request-bytes",
        "not an integer",
    ),
    ("limits-plus", cfg('<limits max-clusters="+5"/>'), 3, "limits/@max-clusters", "not an integer"),
    ("templates-missing", cfg('<templates dir="nope"/>'), 3, "templates/@dir", "does not exist"),
    ("reconcile-text", cfg('<reconcile interval="fast"/>'), 3, "reconcile/@interval", "not a number"),
    ("reconcile-zero", cfg('<reconcile interval="0"/>'), 3, "reconcile/@interval", "out of range"),
    ("reconcile-nan", cfg('<reconcile interval="nan"/>'), 3, "reconcile/@interval", "not a number"),
    (
        "seeds-no-port",
        cfg('<peers seeds="10.0.0.1"/>'),
        3,
        "peers/@seeds",
        "'10.0.0.1' is not a valid host:port",
    ),
    ("seeds-port-zero", cfg('<peers seeds="10.0.0.1:0"/>'), 3, "peers/@seeds", "not a valid host:port"),
    ("fanout-zero", cfg('<peers fanout="0"/>'), 3, "peers/@fanout", "out of range"),
    ("not-well-formed", cfg('<listen api="x"\n'), 5, "xml", "not well-formed"),
    (
        "api-tls-value",
        cfg('<listen api-tls="on"/>'),
        3,
        "listen/@api-tls",
        "'on' is not one of off, grid, files",
    ),
    ("api-tls-case", cfg('<listen api-tls="GRID"/>'), 3, "listen/@api-tls", "'GRID' is not one of"),
    ("api-tls-empty", cfg('<listen api-tls=""/>'), 3, "listen/@api-tls", "'' is not one of"),
    (
        "api-cert-without-files",
        cfg('<listen api-cert="c.pem"/>'),
        3,
        "listen/@api-cert",
        'only used with api-tls="files" (here \'off\')',
    ),
    (
        "api-key-with-grid",
        cfg('<listen api-tls="grid" api-key="k.pem"/>'),
        3,
        "listen/@api-key",
        'only used with api-tls="files" (here \'grid\')',
    ),
    (
        "api-files-no-cert",
        cfg('<listen api-tls="files" api-key="k.pem"/>'),
        3,
        "listen/@api-cert",
        'is required with api-tls="files"',
    ),
    (
        "api-files-no-key",
        cfg('<listen api-tls="files" api-cert="c.pem"/>'),
        3,
        "listen/@api-key",
        'is required with api-tls="files"',
    ),
    (
        "api-files-missing",
        cfg('<listen api-tls="files" api-cert="nope.pem" api-key="nope.key"/>'),
        3,
        "listen/@api-cert",
        "nope.pem' does not exist",
    ),
    (
        "api-tls-grid-no-cert",
        cfg('<listen api-tls="grid"/>\n<state dir="st"/>'),
        3,
        "listen/@api-tls",
        "st/pki/host.crt does not exist",
    ),
]


@pytest.mark.parametrize("text,line,field,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_file_line_and_field(tmp_path, text, line, field, fragment):
    """Each kind of mistake raises ConfigError naming the file, the line and the field."""
    expect_error(write(tmp_path, text), line, field, fragment)


def test_default_templates_dir_must_exist(tmp_path):
    """Without <templates>, a missing templates/ next to the config is an error on the root line."""
    path = tmp_path / "vmwebd.xml"
    path.write_text(cfg())
    expect_error(path, 1, "templates/@dir", "does not exist")


def test_missing_file_names_the_file(tmp_path):
    """A missing config file raises ConfigError naming the file, without a line."""
    expect_error(tmp_path / "absent.xml", None, "file", "cannot read")


def test_oversized_file_is_refused(tmp_path):
    """A config file larger than the size limit is refused before parsing."""
    pad = "<!-- " + "x" * MAX_XML_FILE_BYTES + " -->"
    expect_error(write(tmp_path, cfg(pad)), None, "file", "limit")


# -- hostile XML -------------------------------------------------------------------------------


def test_doctype_with_internal_entity_is_refused(tmp_path):
    """A DOCTYPE declaring an entity is refused and names the DOCTYPE line."""
    text = '<?xml version="1.0"?>\n<!DOCTYPE vmwebd [<!ENTITY h "h1">]>\n<vmwebd><host id="&h;"/></vmwebd>'
    expect_error(write(tmp_path, text), 2, "DOCTYPE", "not allowed")


def test_billion_laughs_is_refused(tmp_path):
    """Nested entity expansion (billion laughs) is refused without expanding anything."""
    ents = '<!ENTITY l0 "ha">' + "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10))
    text = f'<!DOCTYPE vmwebd [{ents}]>\n<vmwebd><host id="h"/><state dir="&l9;"/></vmwebd>'
    expect_error(write(tmp_path, text), 1, "DOCTYPE", "not allowed")


def test_external_entity_is_not_read(tmp_path):
    """An external entity (XXE) is refused and the referenced file's content never appears."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    text = f'<!DOCTYPE vmwebd [<!ENTITY x SYSTEM "file://{secret}">]>\n<vmwebd><host id="&x;"/></vmwebd>'
    e = expect_error(write(tmp_path, text), 1, "DOCTYPE", "not allowed")
    assert "TOPSECRET" not in str(e)


def test_external_dtd_is_refused(tmp_path):
    """A DOCTYPE pointing to an external DTD is refused (and no network is used)."""
    text = '<!DOCTYPE vmwebd SYSTEM "http://192.0.2.1/evil.dtd">\n<vmwebd><host id="h"/></vmwebd>'
    expect_error(write(tmp_path, text), 1, "DOCTYPE", "not allowed")


def test_undefined_entity_reference_is_refused(tmp_path):
    """An entity reference without a declaration is a well-formedness error on its line."""
    expect_error(write(tmp_path, cfg('<state dir="&foo;"/>')), 3, "xml", "not well-formed")


def test_processing_instruction_is_refused(tmp_path):
    """Processing instructions (e.g. xml-stylesheet or xinclude tricks) are refused."""
    expect_error(write(tmp_path, cfg('<?xml-stylesheet href="x"?>')), 3, "xml", "processing instructions")


def test_parse_xml_names_source_for_bytes():
    """parse_xml names the given source in errors about in-memory documents."""
    with pytest.raises(ConfigError) as info:
        parse_xml(b"<a>", "<dom>")
    assert info.value.path == "<dom>" and info.value.field == "xml"


@pytest.mark.parametrize("text", ["a:1", "10.0.0.1:65535", "[::1]:80", "host-1.example.org:8470"])
def test_address_round_trips_through_text(text):
    """Address.parse and str() are inverse on valid host:port text."""
    assert str(Address.parse(text)) == text


def test_ip_pool_addresses_are_lowest_first():
    """IpPool.addresses yields usable addresses in ascending order after the reserve."""
    pool = IpPool("p", ipaddress.IPv4Network("192.168.0.0/28"), (ipaddress.IPv4Network("192.168.0.0/29"),))
    assert [str(a) for a in pool.addresses()] == [f"192.168.0.{i}" for i in range(8, 15)]


def test_doctype_in_utf16_document_is_refused():
    """A DOCTYPE is refused even in a UTF-16 document the byte scan cannot read."""
    data = '<!DOCTYPE vmwebd [<!ENTITY e "x">]>\n<vmwebd>&e;</vmwebd>'.encode("utf-16")
    with pytest.raises(ConfigError) as info:
        parse_xml(data, "u16.xml")
    assert info.value.field == "DOCTYPE"


# -- TLS on the user API port (listen/@api-tls) ----------------------------------------------------


@pytest.fixture
def certs(tmp_path):
    """A grid CA with host h1's certificate in tmp/pki, and a server certificate from another CA
    (as an admin would get from a public CA) in tmp/web."""
    from vmwebd.gossip import pki

    pki.init_ca(tmp_path / "ca", grid_name="cfg-test")
    pki.issue_host_cert(tmp_path / "ca", "h1", tmp_path / "pki", ["127.0.0.1"])
    pki.init_ca(tmp_path / "public-ca", grid_name="public")
    pki.issue_host_cert(tmp_path / "public-ca", "www", tmp_path / "web", ["www.example.org"])
    return tmp_path


def test_api_tls_defaults_to_off(tmp_path):
    """Without api-tls the user API is plain HTTP, with no certificate files."""
    c = load_config(write(tmp_path, cfg()))
    assert (c.listen.api_tls, c.listen.api_cert, c.listen.api_key) == ("off", None, None)


def test_api_tls_grid_uses_the_peers_cert_dir(certs):
    """api-tls="grid" loads when the host certificate is in peers/@cert-dir (relative paths resolved)."""
    c = load_config(write(certs, cfg('<listen api-tls="grid"/>\n<peers cert-dir="pki"/>')))
    assert c.listen.api_tls == "grid" and c.peers.cert_dir == certs / "pki"


def test_api_tls_grid_defaults_to_state_dir_pki(certs):
    """Without peers/@cert-dir, grid looks in <state dir>/pki."""
    c = load_config(write(certs, cfg('<listen api-tls="grid"/>\n<state dir="."/>')))
    assert c.listen.api_tls == "grid" and c.state_dir == certs


def test_api_tls_files_with_a_chain(certs):
    """api-tls="files" takes a certificate followed by its CA (a chain file) and its key."""
    chain = certs / "chain.pem"
    chain.write_bytes(
        (certs / "web" / "host.crt").read_bytes() + (certs / "public-ca" / "ca.crt").read_bytes()
    )
    c = load_config(
        write(certs, cfg('<listen api-tls="files" api-cert="chain.pem" api-key="web/host.key"/>'))
    )
    assert (c.listen.api_tls, c.listen.api_cert, c.listen.api_key) == (
        "files",
        chain,
        certs / "web" / "host.key",
    )


def test_api_tls_files_one_file_with_key_and_certificate(certs):
    """The key and the certificate may be one file (api-cert and api-key naming it both)."""
    both = certs / "both.pem"
    both.write_bytes((certs / "web" / "host.key").read_bytes() + (certs / "web" / "host.crt").read_bytes())
    c = load_config(_files(certs, "both.pem", "both.pem"))
    assert c.listen.api_cert == c.listen.api_key == both


def _files(certs, cert, key):
    return write(certs, cfg(f'<listen api-tls="files" api-cert="{cert}" api-key="{key}"/>'))


def test_api_tls_files_key_of_another_certificate(certs):
    """A key that is not the certificate's is refused, naming the key file."""
    e = expect_error(_files(certs, "web/host.crt", "pki/host.key"), 3, "listen/@api-key", "is not the key of")
    assert "pki/host.key" in str(e)


def test_api_tls_files_not_pem(certs):
    """A certificate file that is not PEM (here: a key) and a key file that is not one are refused."""
    (certs / "key-only.pem").write_bytes((certs / "web" / "host.key").read_bytes())
    expect_error(
        _files(certs, "key-only.pem", "web/host.key"), 3, "listen/@api-cert", "is not a PEM certificate"
    )
    expect_error(
        _files(certs, "web/host.crt", "web/host.crt"), 3, "listen/@api-key", "is not a PEM private key"
    )


def test_api_tls_files_encrypted_key(certs):
    """An encrypted key is refused with a message saying so (the daemon cannot ask for a passphrase)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((certs / "web" / "host.key").read_bytes(), None)
    (certs / "enc.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    expect_error(_files(certs, "web/host.crt", "enc.key"), 3, "listen/@api-key", "is an encrypted key")


def test_api_tls_files_expired_certificate(certs):
    """An expired certificate is refused with its end date."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old.example.org")])
    when = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(when)
        .not_valid_after(when + datetime.timedelta(days=90))
        .sign(key, hashes.SHA256())
    )
    (certs / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (certs / "old.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    expect_error(_files(certs, "old.crt", "old.key"), 3, "listen/@api-cert", "expired on 2020-03-31")
