"""Users, passwords, HTTP Basic on SOAP, permissions and quotas, on an in-process node (real SOAP, zeep)."""

from __future__ import annotations

import base64
import http.client

import pytest
import pytest_twisted
import requests
from lxml import etree
from twisted.internet import task, threads

from procs import ADMIN, password_of
from vmwebd.accounts import (
    BOOTSTRAP_FILE,
    hash_password,
    verify_password,
    write_bootstrap_admin,
)
from vmwebd.auth import (
    Authenticator,
    FailureLimiter,
    apply_bootstrap_admin,
    parse_basic,
    read_bootstrap_admin,
)
from vmwebd.client import ApiClient, ApiFault
from vmwebd.dom.records import UserRec, VClusterRec
from vmwebd.errors import ConfigError, NotAuthorized
from vmwebd.web.session import SessionStore

DOM_NS = "{urn:vmweb:dom:1}"


def fault_of(d):
    """Fires with the ApiFault a call's Deferred failed with (fails the test if it succeeded)."""

    def ok(result):
        raise AssertionError(f"expected a fault, got {result!r}")

    return d.addCallbacks(ok, lambda f: f.trap(ApiFault) and f.value)


# -- hashes, limiter, sessions (pure) --------------------------------------------------------------


def test_hash_is_scrypt_with_a_fresh_salt_and_verifies():
    """Two hashes of one password differ (per-hash salt), both verify, and a wrong password does not."""
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a.startswith("scrypt$32768$8$1$") and a != b
    assert verify_password("correct horse", a) and verify_password("correct horse", b)
    assert not verify_password("correct horsE", a)
    assert "correct horse" not in a


def test_malformed_or_costly_hashes_never_verify():
    """A hash that is garbage, of another scheme, or asks for absurd scrypt cost is refused, not computed."""
    good = hash_password("pw-12345678")
    assert not verify_password("pw-12345678", "")
    assert not verify_password("pw-12345678", "md5$abc")
    assert not verify_password("pw-12345678", good.replace("scrypt$32768", "scrypt$1073741824"))
    assert not verify_password("pw-12345678", good[:-4] + "!!!!")


def test_basic_header_parsing():
    """HTTP Basic: user and password split at the first colon; other schemes and bad base64 give None."""
    assert parse_basic(b"Basic " + base64.b64encode(b"alice:pa:ss")) == ("alice", "pa:ss")
    assert parse_basic(b"Bearer xyz") is None
    assert parse_basic(b"Basic ***") is None
    assert parse_basic(b"Basic " + base64.b64encode(b"nocolon")) is None
    assert parse_basic(None) is None


def test_failure_limiter_blocks_after_the_limit_until_the_window_passes():
    """After `limit` failures within the window one address is refused; others are not; it clears with time."""
    clock = task.Clock()
    lim = FailureLimiter(clock, limit=3, window=60)
    for _ in range(3):
        assert lim.blocked_for("10.0.0.1") == 0
        lim.failed("10.0.0.1")
    assert lim.blocked_for("10.0.0.1") == pytest.approx(60)
    assert lim.blocked_for("10.0.0.2") == 0
    clock.advance(61)
    assert lim.blocked_for("10.0.0.1") == 0


def test_sessions_expire_when_idle_and_after_their_lifetime():
    """A session ends after `idle` seconds without use, and after `absolute` seconds whatever happens."""
    clock = task.Clock()
    store = SessionStore(clock, idle=10, absolute=25)
    s = store.create("alice", "h")
    assert s.token != s.csrf and len(s.token) >= 40
    clock.advance(9)
    assert store.get(s.token) is s
    clock.advance(11)
    assert store.get(s.token) is None
    s2 = store.create("alice", "h")
    for _ in range(5):
        clock.advance(6)
        store.get(s2.token)
    assert store.get(s2.token) is None


def test_bootstrap_file_holds_a_hash_and_is_refused_when_malformed(tmp_path):
    """`write_bootstrap_admin` writes name:hash (mode 0600, no clear password); a malformed file names itself."""
    path = write_bootstrap_admin(tmp_path, "root", "s3cret-password")
    assert path.name == BOOTSTRAP_FILE and path.stat().st_mode & 0o777 == 0o600
    assert "s3cret-password" not in path.read_text()
    name, stored = read_bootstrap_admin(path)
    assert name == "root" and verify_password("s3cret-password", stored)
    path.write_text("root:plaintext\n")
    with pytest.raises(ConfigError) as e:
        read_bootstrap_admin(path)
    assert str(path) in str(e.value)


# -- the first admin, on a node ------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_bootstrap_file_makes_an_admin_and_is_deleted(start_node):
    """The node turns <state>/bootstrap-admin into an admin account, deletes the file, and that admin can call."""
    h = yield start_node()
    state = h.node.config.state_dir
    rec = h.node.domsvc.dom.get(UserRec, ADMIN[0])
    assert rec.role == "admin" and verify_password(ADMIN[1], rec.password_hash)
    assert not (state / BOOTSTRAP_FILE).exists()
    # A second file resets the password (how `make demo` gives a fresh one at every start).
    write_bootstrap_admin(state, ADMIN[0], "a-brand-new-password")
    yield apply_bootstrap_admin(h.node.domsvc, state)
    assert not (state / BOOTSTRAP_FILE).exists()
    fresh = h.as_user(ADMIN[0], "a-brand-new-password")
    assert (yield fresh.call("ListUsers"))[0]["name"] == "admin"


# -- authentication on SOAP ----------------------------------------------------------------------


def _post_raw(address: str, auth: str | None) -> tuple[int, dict, bytes]:
    host, port = address.split(":")
    body = (
        b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        b'xmlns:t="urn:vmweb:api:1"><s:Body><t:ListHosts/></s:Body></s:Envelope>'
    )
    headers = {"Content-Type": "text/xml; charset=utf-8"}
    if auth:
        headers["Authorization"] = auth
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/soap", body, headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@pytest_twisted.inlineCallbacks
def test_anonymous_and_wrong_passwords_get_not_authorized(start_node):
    """No credentials, a wrong password or an unknown user: HTTP 401 and fault Client.NotAuthorized, the same message for the last two."""
    h = yield start_node()
    addr = h.node.api_address
    status, headers, body = yield threads.deferToThread(_post_raw, addr, None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert b"Client.NotAuthorized" in body
    wrong = yield fault_of(h.as_user("alice", "not-her-password").call("ListClusters", None))
    unknown = yield fault_of(h.as_user("mallory", "whatever-password").call("ListClusters", None))
    assert wrong.code == unknown.code == "Client.NotAuthorized"
    assert wrong.message == unknown.message == "wrong user name or password"
    with pytest.raises(ApiFault) as e:
        yield threads.deferToThread(lambda: ApiClient(addr).call("CreateCluster", "x1", "lab", "alice", 1))
    assert e.value.code == "Client.NotAuthorized"
    assert h.node.domsvc.dom.all(VClusterRec) == []
    # the WSDL stays public: clients need it before they can send credentials
    wsdl = yield threads.deferToThread(lambda: requests.get(f"http://{addr}/soap?wsdl", timeout=10).content)
    assert b"CreateUser" in wsdl


@pytest_twisted.inlineCallbacks
def test_a_good_password_is_checked_with_scrypt_once_then_remembered(start_node):
    """Repeated calls with the same password run scrypt once; a changed stored hash is checked again."""
    h = yield start_node()
    calls = []

    def counting(password, stored):
        calls.append(1)
        return verify_password(password, stored)

    authn = Authenticator(h.node.domsvc.dom, h.node.reactor, verify=counting)
    for _ in range(3):
        p = yield authn.authenticate("alice", password_of("alice"), "127.0.0.1")
        assert (p.name, p.role) == ("alice", "user")
    assert len(calls) == 1
    yield h.as_user("alice").call("SetPassword", "alice", "another-password-1")
    with pytest.raises(NotAuthorized):
        yield authn.authenticate("alice", password_of("alice"), "127.0.0.1")
    p = yield authn.authenticate("alice", "another-password-1", "127.0.0.1")
    assert p.name == "alice" and len(calls) == 3


# -- user management -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_admin_manages_users_and_nobody_sees_a_hash(start_node):
    """CreateUser/ListUsers/SetQuota/SetPassword/DeleteUser work for an admin; no answer carries a hash."""
    h = yield start_node()
    u = yield h.call("CreateUser", "erin", "erin-password-1", "user", 5)
    assert u == {
        "name": "erin",
        "role": "user",
        "quota_vms": 5,
        "used_vms": 0,
        "used_vcpus": 0,
        "used_memory_mib": 0,
        "clusters": 0,
    }
    names = [x["name"] for x in (yield h.call("ListUsers"))]
    assert names == ["admin", "alice", "bob", "carol", "dave", "erin"]
    assert (yield h.call("SetQuota", "erin", 7))["quota_vms"] == 7
    assert (yield h.as_user("erin", "erin-password-1").call("ListUsers")) == [
        {
            "name": "erin",
            "role": "user",
            "quota_vms": 7,
            "used_vms": 0,
            "used_vcpus": 0,
            "used_memory_mib": 0,
            "clusters": 0,
        }
    ]
    yield h.call("SetPassword", "erin", "erin-password-2")
    assert (
        yield fault_of(h.as_user("erin", "erin-password-1").call("ListUsers"))
    ).code == "Client.NotAuthorized"
    taken = yield fault_of(h.call("CreateUser", "erin", "whatever-password", "user", 1))
    assert taken.code == "Client.NameTaken" and "'erin'" in taken.message
    short = yield fault_of(h.call("CreateUser", "frank", "short", "user", 1))
    assert short.code == "Client.InvalidArgument" and short.message.startswith("password:")
    bad = yield fault_of(h.call("CreateUser", "<b>x</b>", "long-enough-pw", "user", 1))
    assert bad.code == "Client.InvalidArgument" and bad.message.startswith("name:")
    assert (yield h.call("DeleteUser", "erin")) is True
    assert (
        yield fault_of(h.as_user("erin", "erin-password-2").call("ListUsers"))
    ).code == "Client.NotAuthorized"
    self_delete = yield fault_of(h.call("DeleteUser", "admin"))
    assert self_delete.code == "Client.InvalidArgument"
    dom_text = yield h.call("GetDom")
    assert "password-hash" not in dom_text and "scrypt$" not in dom_text
    # ...while the replica itself does hold the hashes (that is where logins are checked)
    assert "scrypt$" in h.node.domsvc.dom.to_xml().decode()


@pytest_twisted.inlineCallbacks
def test_users_cannot_manage_other_accounts(start_node):
    """A user may change their own password only: CreateUser, DeleteUser, SetQuota and others' passwords are refused."""
    h = yield start_node()
    bob = h.as_user("bob")
    for op, args in [
        ("CreateUser", ("eve", "eve-password-1", "admin", 99)),
        ("DeleteUser", ("alice",)),
        ("SetQuota", ("bob", 999)),
        ("SetPassword", ("alice", "hijacked-pass")),
        ("SetSetting", ("placement", "pack")),
        ("AddHost", ("host9",)),
        ("RemoveHost", ("host1",)),
    ]:
        f = yield fault_of(bob.call(op, *args))
        assert f.code == "Client.NotAuthorized", (op, f)
        assert "bob" in f.message
    assert (yield bob.call("SetPassword", "bob", "bobs-new-password")) is True
    assert h.node.domsvc.dom.get(UserRec, "eve") is None
    assert [u["name"] for u in (yield h.call("ListUsers"))] == ["admin", "alice", "bob", "carol", "dave"]


# -- permissions on clusters -------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_users_see_and_act_only_on_their_own_clusters(start_node):
    """Bob cannot see, scale, destroy or power alice's cluster; his lists and DOM leave it out; an admin sees all."""
    h = yield start_node()
    alice, bob = h.as_user("alice"), h.as_user("bob")
    yield alice.call("CreateCluster", "a1", "lab", "alice", 2)
    yield bob.call("CreateCluster", "b1", "lab", "bob", 1)
    for op, args in [
        ("GetCluster", ("a1",)),
        ("ScaleCluster", ("a1", 3)),
        ("DestroyCluster", ("a1",)),
        ("StopVm", ("a1", "pc0")),
        ("StartVm", ("a1", "pc0")),
    ]:
        f = yield fault_of(bob.call(op, *args))
        assert f.code == "Client.NotAuthorized" and "'a1'" in f.message, (op, f)
    f = yield fault_of(bob.call("CreateCluster", "b2", "lab", "alice", 1))
    assert f.code == "Client.NotAuthorized"
    assert [c["name"] for c in (yield bob.call("ListClusters", None))] == ["b1"]
    assert (yield fault_of(bob.call("ListClusters", "alice"))).code == "Client.NotAuthorized"
    dom = etree.fromstring((yield bob.call("GetDom")).encode())
    assert [e.get("id") for e in dom.iter(f"{DOM_NS}vcluster")] == ["b1"]
    assert {e.get("id").split("/")[0] for e in dom.iter(f"{DOM_NS}vm")} == {"b1"}
    assert [e.get("id") for e in dom.iter(f"{DOM_NS}user")] == ["bob"]
    assert list(dom.iter(f"{DOM_NS}lease")) == []
    assert [c["name"] for c in (yield h.call("ListClusters", None))] == ["a1", "b1"]
    assert (yield h.call("GetCluster", "a1"))["count"] == 2
    missing = yield fault_of(h.call("CreateCluster", "z1", "lab", "zed", 1))
    assert missing.code == "Client.NoSuchUser" and "'zed'" in missing.message


# -- quotas ----------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_quota_is_enforced_at_create_and_scale(start_node):
    """Over the owner's quota, create and scale fail with Client.QuotaExceeded naming user, quota and request; nothing changes."""
    h = yield start_node()
    yield h.call("SetQuota", "carol", 4)
    carol = h.as_user("carol")
    yield carol.call("CreateCluster", "c1", "lab", "carol", 3)
    f = yield fault_of(carol.call("CreateCluster", "c2", "lab", "carol", 2))
    assert f.code == "Client.QuotaExceeded"
    assert (
        "'carol'" in f.message
        and "quota of 4 VMs" in f.message
        and "uses 3" in f.message
        and "asked for 2" in f.message
    ), f.message
    f = yield fault_of(carol.call("ScaleCluster", "c1", 5))
    assert f.code == "Client.QuotaExceeded" and "from 3 to 5" in f.message, f.message
    # an admin acting for carol meets the same quota
    assert (yield fault_of(h.call("ScaleCluster", "c1", 5))).code == "Client.QuotaExceeded"
    assert (yield carol.call("ScaleCluster", "c1", 4))["count"] == 4
    assert (yield carol.call("ScaleCluster", "c1", 2))["count"] == 2  # shrinking is always fine
    assert [c["name"] for c in (yield carol.call("ListClusters", None))] == ["c1"]


@pytest_twisted.inlineCallbacks
def test_concurrent_creates_at_one_host_cannot_both_slip_under_the_quota(start_node):
    """Two creates sent together, each within the quota alone but not together: exactly one succeeds."""
    h = yield start_node()
    yield h.call("SetQuota", "dave", 3)
    d1 = h.as_user("dave").call("CreateCluster", "d1", "lab", "dave", 2)
    d2 = h.as_user("dave").call("CreateCluster", "d2", "lab", "dave", 2)
    results = []
    for d in (d1, d2):
        try:
            results.append((yield d)["name"])
        except ApiFault as e:
            results.append(e.code)
    assert sorted(results, key=str) in (["Client.QuotaExceeded", "d1"], ["Client.QuotaExceeded", "d2"]), (
        results
    )


def test_generated_passwords_never_start_with_a_dash():
    """A generated password can be given as ``--password X`` on the command line: no leading '-'
    (url-safe base64 starts one in 64 with it)."""
    from vmwebd.accounts import generate_password

    passwords = [generate_password() for _ in range(2000)]
    assert not any(p.startswith("-") for p in passwords)
    assert all(len(p) >= 16 for p in passwords) and len(set(passwords)) == len(passwords)
