"""Users' SSH public keys: strict validation, the DOM representation, permissions, and the SOAP,
CLI and web ways to add, list and remove them; plus a cluster's hosts file over SOAP and the CLI."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree
from twisted.internet import threads

from procs import ADMIN, password_of
from test_auth import fault_of
from test_web_views import Browserless, vmweb
from vmwebd.accounts import (
    MAX_SSH_KEYS,
    SSH_KEY_TYPES,
    parse_ssh_key,
    parse_ssh_key_file,
    write_bootstrap_admin,
)
from vmwebd.auth import apply_bootstrap_admin
from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import UserRec
from vmwebd.dom.validate import entity_error
from vmwebd.errors import InvalidArgument


# -- keys of every type ----------------------------------------------------------------------------
def _ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _openssh(priv) -> str:
    return (
        priv.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _line(kind: str, blob: bytes, comment: str = "") -> str:
    text = f"{kind} {base64.b64encode(blob).decode()}"
    return f"{text} {comment}" if comment else text


def sk_ed25519() -> str:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    kind = "sk-ssh-ed25519@openssh.com"
    return _line(kind, _ssh_string(kind.encode()) + _ssh_string(raw) + _ssh_string(b"ssh:"), "yubikey")


def sk_ecdsa() -> str:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    kind = "sk-ecdsa-sha2-nistp256@openssh.com"
    return _line(
        kind,
        _ssh_string(kind.encode()) + _ssh_string(b"nistp256") + _ssh_string(point) + _ssh_string(b"ssh:"),
        "token",
    )


GOOD = {
    "ssh-ed25519": lambda: _openssh(ed25519.Ed25519PrivateKey.generate()) + " alice@laptop",
    "ssh-rsa": lambda: _openssh(rsa.generate_private_key(65537, 2048)) + " rsa key",
    "ecdsa-sha2-nistp256": lambda: _openssh(ec.generate_private_key(ec.SECP256R1())),
    "ecdsa-sha2-nistp384": lambda: _openssh(ec.generate_private_key(ec.SECP384R1())) + " p384",
    "ecdsa-sha2-nistp521": lambda: _openssh(ec.generate_private_key(ec.SECP521R1())) + " p521",
    "sk-ssh-ed25519@openssh.com": sk_ed25519,
    "sk-ecdsa-sha2-nistp256@openssh.com": sk_ecdsa,
}


def ed_key(comment: str = "") -> str:
    line = _openssh(ed25519.Ed25519PrivateKey.generate())
    return f"{line} {comment}" if comment else line


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_good_keys_of_every_type_are_accepted(kind):
    """A real key of each accepted type parses, keeps its comment, and prints its fingerprint."""
    assert kind in SSH_KEY_TYPES
    line = GOOD[kind]()
    k = parse_ssh_key(line)
    assert (k.kind, k.line) == (kind, line)
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", k.fingerprint)


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="no ssh-keygen")
@pytest.mark.parametrize("kind", ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp384"])
def test_fingerprint_is_the_one_openssh_prints(kind, tmp_path):
    """Our fingerprint is what `ssh-keygen -l` prints for the same key."""
    line = GOOD[kind]()
    (tmp_path / "k.pub").write_text(line + "\n")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "k.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[1] == parse_ssh_key(line).fingerprint


def _ed_blob(kind=b"ssh-ed25519", key=b"k" * 32, extra=b"") -> bytes:
    return _ssh_string(kind) + _ssh_string(key) + extra


def _rsa_1024() -> str:
    return _openssh(rsa.generate_private_key(65537, 1024))


def _ecdsa_wrong_curve() -> str:
    point = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    return _line(
        "ecdsa-sha2-nistp256",
        _ssh_string(b"ecdsa-sha2-nistp256") + _ssh_string(b"nistp384") + _ssh_string(point),
    )


BAD = [
    ("", "required"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "not an SSH key type"),
    ('command="rm -rf /" ' + "ssh-ed25519 AAAA", "not an SSH key type"),
    ("ssh-ed25519", "no base64 blob"),
    ("ssh-ed25519 not*base64!", "not base64"),
    (_line("ssh-ed25519", _ed_blob(kind=b"ssh-rsa")), "another key type"),
    (_line("ssh-ed25519", _ed_blob(key=b"k" * 31)), "31 bytes, not 32"),
    (_line("ssh-ed25519", _ed_blob(extra=b"\0")), "bytes after the key"),
    (_line("ssh-ed25519", _ssh_string(b"ssh-ed25519")), "ends early"),
    (None, "1024 bits"),  # RSA too short, made below
    (None, "curve"),  # ECDSA of another curve, made below
    (ed_key("evil\x1b[2Jcomment"), "control character"),
    (ed_key() + "\n" + ed_key(), "line break"),
    (ed_key("x" * 300), "comment has at most"),
    (ed_key("y" * 5000), "at most 4096 characters"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_malformed_keys_are_refused_naming_the_field(i):
    """Each malformed key is refused with InvalidArgument naming the field and the fault."""
    text, why = BAD[i]
    if text is None:
        text = _rsa_1024() if "bits" in why else _ecdsa_wrong_curve()
    with pytest.raises(InvalidArgument) as e:
        parse_ssh_key(text)
    assert e.value.field == "key" and why in str(e.value), str(e.value)


def test_a_key_file_names_the_bad_line():
    """A key file's bad line is named by its number; blank and # lines are skipped."""
    good = ed_key("a")
    assert [k.line for k in parse_ssh_key_file(f"# mine\n\n{good}\n")] == [good]
    with pytest.raises(InvalidArgument) as e:
        parse_ssh_key_file(f"{good}\nssh-ed25519 ***\n")
    assert e.value.field == "key 2" and str(e.value) == "key 2: ssh-ed25519 key: its blob is not base64"
    with pytest.raises(InvalidArgument, match="holds no SSH public key"):
        parse_ssh_key_file("# nothing\n")


# -- the DOM representation ------------------------------------------------------------------------
comments = st.text(st.characters(min_codepoint=0x20, blacklist_categories=("Cs", "Cc")), max_size=40).map(
    str.strip
)


@given(st.lists(comments, min_size=0, max_size=5))
def test_keys_survive_the_dom_and_xml_text_whatever_their_comments(cs):
    """Keys whose comments hold commas, percent signs, spaces or any Unicode come back equal
    from the ssh-keys attribute, through XML text, and the entity is valid for the schema."""
    keys = [
        f"ssh-ed25519 {base64.b64encode(_ed_blob(key=bytes([i]) * 32)).decode()}" + (f" {c}" if c else "")
        for i, c in enumerate(cs)
    ]
    dom = Dom(HybridClock("h1", lambda: 0))
    el = dom.put(UserRec(id="alice", ssh_keys=UserRec.encode_ssh_keys(keys)))
    assert entity_error(el) is None
    assert "\n" not in el.get("ssh-keys", "")
    other = Dom(HybridClock("h2", lambda: 0))
    other.merge(etree.fromstring(etree.tostring(el)))
    assert other.get(UserRec, "alice").ssh_key_list() == tuple(keys)


# -- over SOAP, with permissions -------------------------------------------------------------------
@pytest_twisted.inlineCallbacks
def test_soap_add_list_remove_and_permissions(start_node):
    """Alice manages her own keys; bob can neither see nor change them; an admin can do both;
    duplicates, unknown keys and malformed keys get specific faults."""
    h = yield start_node()
    alice, bob = h.as_user("alice"), h.as_user("bob")
    k1, k2 = GOOD["ssh-ed25519"](), GOOD["ecdsa-sha2-nistp256"]()
    added = yield alice.call("AddSshKey", None, k1)
    assert added["key"] == k1 and added["fingerprint"] == parse_ssh_key(k1).fingerprint
    assert added["comment"] == "alice@laptop" and added["type"] == "ssh-ed25519"
    yield h.call("AddSshKey", "alice", k2)  # an admin adds to anyone
    listed = yield alice.call("ListSshKeys", "alice")
    assert [k["key"] for k in listed] == [k1, k2]
    for op, args in [
        ("ListSshKeys", ("alice",)),
        ("AddSshKey", ("alice", ed_key())),
        ("RemoveSshKey", ("alice", added["fingerprint"])),
    ]:
        f = yield fault_of(bob.call(op, *args))
        assert f.code == "Client.NotAuthorized" and "'alice'" in f.message, (op, f)
    assert not (yield bob.call("ListSshKeys", None))
    dup = yield fault_of(alice.call("AddSshKey", None, k1))
    assert dup.code == "Client.SshKeyExists" and added["fingerprint"] in dup.message
    bad = yield fault_of(alice.call("AddSshKey", None, "ssh-ed25519 %%%"))
    assert bad.code == "Client.InvalidArgument" and bad.message.startswith("key: ")
    nouser = yield fault_of(h.call("ListSshKeys", "zed"))
    assert nouser.code == "Client.NoSuchUser"
    gone = yield alice.call("RemoveSshKey", None, added["fingerprint"])
    assert gone["key"] == k1
    gone = yield h.call("RemoveSshKey", "alice", k2)  # by its whole line
    assert gone["key"] == k2
    missing = yield fault_of(alice.call("RemoveSshKey", None, added["fingerprint"]))
    assert missing.code == "Client.NoSuchSshKey"
    assert not (yield alice.call("ListSshKeys", None))


@pytest_twisted.inlineCallbacks
def test_keys_survive_password_quota_and_bootstrap_changes(start_node):
    """A key added stays when the password or quota changes, and when a bootstrap file resets
    an existing admin."""
    h = yield start_node()
    key = ed_key("carol@desk")
    yield h.as_user("carol").call("AddSshKey", None, key)
    yield h.call("SetPassword", "carol", "carols-new-password")
    yield h.call("SetQuota", "carol", 7)
    assert [
        k["key"] for k in (yield h.as_user("carol", "carols-new-password").call("ListSshKeys", None))
    ] == [key]
    akey = ed_key("root")
    yield h.call("AddSshKey", None, akey)
    state = h.node.config.state_dir
    write_bootstrap_admin(state, ADMIN[0], ADMIN[1])
    yield apply_bootstrap_admin(h.node.domsvc, state)
    assert h.node.domsvc.dom.get(UserRec, ADMIN[0]).ssh_key_list() == (akey,)


@pytest_twisted.inlineCallbacks
def test_a_users_key_list_is_bounded(start_node):
    """The 33rd key is refused with the field named; the 32 stay."""
    h = yield start_node()
    keys = [ed_key(f"k{i}") for i in range(MAX_SSH_KEYS)]
    yield h.node.access.add_ssh_key_file(_principal(h, "dave"), "dave", "\n".join(keys))
    f = yield fault_of(h.as_user("dave").call("AddSshKey", None, ed_key()))
    assert f.code == "Client.InvalidArgument" and f.message.startswith("key: ") and "32" in f.message
    assert len((yield h.as_user("dave").call("ListSshKeys", None))) == MAX_SSH_KEYS


def _principal(h, name):
    from vmwebd.auth import Principal

    return Principal(name, h.node.domsvc.dom.get(UserRec, name).role)


@pytest_twisted.inlineCallbacks
def test_cluster_hosts_over_soap(start_node):
    """GetClusterHosts gives the members' hosts lines and an MPI hostfile, to the owner and
    admins only."""
    h = yield start_node()
    alice = h.as_user("alice")
    yield alice.call("CreateCluster", "k1", "lab", "alice", 3)
    got = yield alice.call("GetClusterHosts", "k1")
    vms = (yield alice.call("GetCluster", "k1"))["vms"]
    assert got["hosts"].splitlines() == [f"{v['ip']} {v['name']}.k1 {v['name']}" for v in vms]
    for line in (got["mpi"] or "").splitlines():
        assert re.fullmatch(r"[a-z0-9-]+\.k1 slots=\d+", line)
    f = yield fault_of(h.as_user("bob").call("GetClusterHosts", "k1"))
    assert f.code == "Client.NotAuthorized"
    assert (yield fault_of(alice.call("GetClusterHosts", "nope"))).code == "Client.NoSuchCluster"
    assert (yield h.call("GetClusterHosts", "k1"))["hosts"] == got["hosts"]


# -- the CLI -----------------------------------------------------------------------------------------
@pytest_twisted.inlineCallbacks
def test_cli_user_key_commands_and_cluster_hosts(start_node, tmp_path):
    """`vmweb user key add/list/remove` and `vmweb cluster hosts [--mpi]` work; a bad key file
    names its line and sends nothing."""
    h = yield start_node()
    addr = h.node.api_address
    yield h.as_user("bob").call("CreateCluster", "c1", "lab", "bob", 2)
    env = {"VMWEB_USER": "bob", "VMWEB_PASSWORD": password_of("bob")}
    k1, k2 = ed_key("bob@one"), GOOD["ssh-rsa"]()
    pub = tmp_path / "id.pub"
    pub.write_text(f"{k1}\n\n{k2}\n")

    def story():
        r = vmweb(addr, "user", "key", "add", str(pub), env=env)
        assert r.returncode == 0, r.stderr
        fp1, fp2 = parse_ssh_key(k1).fingerprint, parse_ssh_key(k2).fingerprint
        assert f"added {fp1} (ssh-ed25519, bob@one)" in r.stdout and fp2 in r.stdout
        again = vmweb(addr, "user", "key", "add", "-", env=env, stdin=k1 + "\n")
        assert again.returncode == 1 and "Client.SshKeyExists" in again.stdout
        listed = vmweb(addr, "user", "key", "list", env=env)
        assert listed.returncode == 0 and fp1 in listed.stdout and fp2 in listed.stdout
        assert listed.stdout.splitlines()[0].split() == ["TYPE", "FINGERPRINT", "COMMENT"]
        bad = tmp_path / "bad.pub"
        bad.write_text(f"{ed_key()}\nssh-ed25519 AAAA!!\n")
        r = vmweb(addr, "user", "key", "add", str(bad), env=env)
        assert r.returncode == 1 and r.stderr.startswith("vmweb: Client.InvalidArgument: key 2:"), r.stderr
        other = vmweb(addr, "user", "key", "list", "--user", "alice", env=env)
        assert other.returncode == 1 and "Client.NotAuthorized" in other.stderr
        admin = vmweb(
            addr, "--user", ADMIN[0], "--password", ADMIN[1], "--json", "user", "key", "list", "--user", "bob"
        )
        assert admin.returncode == 0 and fp1 in admin.stdout
        r = vmweb(addr, "user", "key", "remove", fp1, env=env)
        assert r.returncode == 0 and f"removed {fp1}" in r.stdout
        assert fp1 not in vmweb(addr, "user", "key", "list", env=env).stdout
        hosts = vmweb(addr, "cluster", "hosts", "c1", env=env)
        assert hosts.returncode == 0 and len(hosts.stdout.splitlines()) == 2
        assert all(re.fullmatch(r"[\d.]+ [a-z0-9-]+\.c1 [a-z0-9-]+", ln) for ln in hosts.stdout.splitlines())
        mpi = vmweb(addr, "cluster", "hosts", "c1", "--mpi", env=env)
        assert mpi.returncode == 0
        assert all(re.fullmatch(r"[a-z0-9-]+\.c1 slots=\d+", ln) for ln in mpi.stdout.splitlines())

    yield threads.deferToThread(story)


# -- the web page --------------------------------------------------------------------------------
@pytest_twisted.inlineCallbacks
def test_web_form_adds_lists_and_removes_keys_escaped(start_node):
    """Alice adds a key whose comment holds markup on her page (shown as text), removes it
    with its button; bob's forged removal of her key is refused."""
    h = yield start_node()
    key = ed_key("<script>alert(1)</script>")
    fp = parse_ssh_key(key).fingerprint

    def story():
        b = Browserless(h.node.api_address)
        assert b.login("alice", password_of("alice")).status_code == 303
        page = b.s.get(b.base + "/owner", timeout=10)
        assert "My SSH keys" in page.text and "No SSH keys yet." in page.text
        page = b.s.post(
            b.base + "/action/user/key/add",
            timeout=10,
            data={"csrf": b.csrf(), "name": "alice", "key": key + "\r\n", "back": "/owner"},
        )
        assert f"SSH key {fp} added to alice." in page.text
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and f'data-key="{fp}"' in page.text
        bad = b.s.post(
            b.base + "/action/user/key/add",
            timeout=10,
            data={"csrf": b.csrf(), "name": "alice", "key": "ssh-ed25519 ???", "back": "/owner"},
        )
        assert "key 1: ssh-ed25519 key: its blob is not base64" in bad.text
        nocsrf = b.s.post(
            b.base + "/action/user/key/remove",
            timeout=10,
            data={"name": "alice", "fingerprint": fp, "back": "/owner"},
        )
        assert nocsrf.status_code == 403
        b2 = Browserless(h.node.api_address)
        b2.login("bob", password_of("bob"))
        forged = b2.s.post(
            b2.base + "/action/user/key/remove",
            timeout=10,
            data={"csrf": b2.csrf(), "name": "alice", "fingerprint": fp, "back": "/owner"},
        )
        assert "may only see or change their own SSH keys" in forged.text
        page = b.s.post(
            b.base + "/action/user/key/remove",
            timeout=10,
            data={"csrf": b.csrf(), "name": "alice", "fingerprint": fp, "back": "/owner"},
        )
        assert f"SSH key {fp} removed from alice." in page.text and "No SSH keys yet." in page.text

    yield threads.deferToThread(story)
    assert h.node.domsvc.dom.get(UserRec, "alice").ssh_keys == ""
