"""The audit trail: every change asked through the application recorded once in the DOM, read
back with ListAudit (zeep, on an in-process node) and ``vmweb audit``, bounded per host, private
per user."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import threads

from procs import ADMIN, REPO, child_env, password_of
from vmwebd import audit as audit_mod
from vmwebd.app import Application
from vmwebd.client import ApiFault
from vmwebd.dom.document import Dom, relaxng_valid
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import CONTAINERS, AuditRec
from vmwebd.dom.validate import document_error
from vmwebd.timespec import parse_since

DOM_NS = "{urn:vmweb:dom:1}"


def fault_of(d):
    """Fires with the ApiFault a call's Deferred failed with (fails the test if it succeeded)."""

    def ok(result):
        raise AssertionError(f"expected a fault, got {result!r}")

    return d.addCallbacks(ok, lambda f: f.trap(ApiFault) and f.value)


# -- pure ------------------------------------------------------------------------------------------


def test_every_public_access_method_is_audited_or_a_read():
    """Each public method of the Application is in the audit table (and wrapped) or listed as a read, so a
    new writing method cannot be left out of the trail by accident."""
    public = {n for n, _ in inspect.getmembers(Application, inspect.isfunction) if not n.startswith("_")}
    assert public - set(audit_mod.AUDITED) - audit_mod.READS == set()
    assert set(audit_mod.AUDITED) & audit_mod.READS == set()
    for name in audit_mod.AUDITED:
        assert getattr(getattr(Application, name), "audited", None) is audit_mod.AUDITED[name], name


def test_audit_entities_match_the_schema_and_old_documents_still_load():
    """An audit entity is valid for RelaxNG; a document saved before audits existed (no <audits>)
    still loads, and one with an unknown extra container does not."""
    dom = Dom(HybridClock("h1", lambda: 1_700_000_000_000))
    el = dom.put(
        AuditRec(
            id="h1/1700000000000.0",
            at=1_700_000_000_000,
            host="h1",
            user="alice",
            op="CreateCluster",
            object="cluster/c1",
            outcome="Client.QuotaExceeded",
            detail="quota",
            ms=12,
        )
    )
    assert relaxng_valid(el)
    assert dom.get(AuditRec, "h1/1700000000000.0").outcome == "Client.QuotaExceeded"
    old = etree.fromstring(dom.to_xml())
    old.remove(old.find(DOM_NS + "audits"))
    assert document_error(old, CONTAINERS) is None
    Dom(HybridClock("h2", lambda: 1)).load_xml(etree.tostring(old))
    etree.SubElement(old, DOM_NS + "extras")
    assert "children" in document_error(old, CONTAINERS)


def test_since_accepts_iso_times_and_spans_and_names_what_it_accepts():
    """Spans count back from now, ISO times without a zone are read in the zone given (UTC by
    default), and anything else is a ValueError saying both forms."""
    now = 1_800_000_000.0
    assert parse_since("90s", now) == now - 90
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("1W", now) == now - 7 * 86400
    assert parse_since("2026-12-01T10:00:00Z", now) == parse_since("2026-12-01T11:00:00+01:00", now)
    assert parse_since("2026-12-01T10:00", now) == parse_since("2026-12-01T10:00:00+00:00", now)
    for bad in ("yesterday", "-1h", "1y", "", "2026-13-01"):
        with pytest.raises(ValueError) as e:
            parse_since(bad, now)
        assert "ISO 8601" in str(e.value) or "required" in str(e.value)


# -- on a node -------------------------------------------------------------------------------------


def audit_of(h, **kw):
    """ListAudit through ``h`` (zeep answers an empty list as None: made [] here)."""
    return h.call("ListAudit", kw.get("user"), kw.get("since"), kw.get("limit")).addCallback(
        lambda recs: recs or []
    )


@pytest_twisted.inlineCallbacks
def test_changes_and_refusals_are_recorded_once_with_user_object_and_outcome(start_node):
    """Accepted and refused changes each leave one record (user, operation, object, ok or the
    faultcode, the host that took them), newest first; reads leave none; no password is kept."""
    h = yield start_node()
    alice = h.as_user("alice")
    yield h.call("CreateCluster", "c1", "lab", "alice", 1)
    yield alice.call("ScaleCluster", "c1", 2)
    yield h.call("ListClusters", None)  # a read: not recorded
    f = yield fault_of(alice.call("SetSetting", "placement", "pack"))
    assert f.code == "Client.NotAuthorized"
    f = yield fault_of(h.call("CreateCluster", "c2", "lab", "alice", 10_000))
    yield h.call("SetPassword", "bob", "a-new-secret-password")
    recs = yield audit_of(h)
    got = [(r["user"], r["op"], r["object"], r["outcome"], r["host"]) for r in recs]
    assert got == [
        ("admin", "SetPassword", "user/bob", "ok", "host1"),
        ("admin", "CreateCluster", "cluster/c2", f.code, "host1"),
        ("alice", "SetSetting", "setting/placement", "Client.NotAuthorized", "host1"),
        ("alice", "ScaleCluster", "cluster/c1", "ok", "host1"),
        ("admin", "CreateCluster", "cluster/c1", "ok", "host1"),
    ]
    assert recs[1]["detail"] == f.message
    assert recs[3]["detail"] == "to 2 VMs"
    assert [r["at"] for r in recs] == sorted((r["at"] for r in recs), reverse=True)
    assert len({r["id"] for r in recs}) == len(recs) and all(r["id"].startswith("host1/") for r in recs)
    dom = yield h.call("GetDom")
    assert "a-new-secret-password" not in dom
    # Another user's attempt on alice's cluster is recorded under that user's name.
    f = yield fault_of(h.as_user("carol").call("DestroyCluster", "c1"))
    assert f.code == "Client.NotAuthorized"
    last = (yield audit_of(h, limit=1))[0]
    assert (last["user"], last["op"], last["object"], last["outcome"]) == (
        "carol",
        "DestroyCluster",
        "cluster/c1",
        "Client.NotAuthorized",
    )


@pytest_twisted.inlineCallbacks
def test_a_user_reads_only_their_own_records(start_node):
    """A user's ListAudit holds only their own records and their GetDom none; asking for
    another's is Client.NotAuthorized; an admin reads anyone's, or one user's, and sees all in
    GetDom."""
    h = yield start_node()
    alice, bob = h.as_user("alice"), h.as_user("bob")
    yield alice.call("CreateCluster", "ca", "lab", "alice", 1)
    yield bob.call("CreateCluster", "cb", "lab", "bob", 1)
    yield h.call("SetQuota", "carol", 3)
    mine = yield alice.call("ListAudit", None, None, None)
    assert [(r["user"], r["object"]) for r in mine] == [("alice", "cluster/ca")]
    f = yield fault_of(alice.call("ListAudit", "bob", None, None))
    assert f.code == "Client.NotAuthorized" and "bob" in f.message
    # Records name what their user typed (another's cluster, refused): none in a user's DOM view.
    f = yield fault_of(alice.call("DestroyCluster", "cb"))
    assert f.code == "Client.NotAuthorized"
    assert [r["object"] for r in (yield alice.call("ListAudit", None, None, None))] == [
        "cluster/cb",
        "cluster/ca",
    ]
    dom = yield alice.call("GetDom")
    assert "<audit " not in dom and "cluster/cb" not in dom and "'cb'" not in dom
    assert {r["user"] for r in (yield audit_of(h))} == {"alice", "bob", "admin"}
    assert [r["object"] for r in (yield audit_of(h, user="bob"))] == ["cluster/cb"]
    admin_dom = etree.fromstring((yield h.call("GetDom")).encode())
    assert len(list(admin_dom.iter(DOM_NS + "audit"))) == 4


@pytest_twisted.inlineCallbacks
def test_a_host_keeps_at_most_its_bound_and_deletes_old_records(start_node):
    """Past ``keep`` records the host deletes its oldest (tombstones, collected later), so it never
    holds more; records past ``max_age_ms`` go at the next expiry."""
    h = yield start_node()
    log = h.node.access.audit
    log.keep = 5
    for quota in range(1, 9):
        yield h.call("SetQuota", "carol", quota)
    recs = yield audit_of(h)
    assert len(recs) <= 5
    assert recs[0]["detail"] == "quota 8"  # the newest stays
    kept = {r["detail"] for r in recs}
    assert "quota 1" not in kept and "quota 2" not in kept  # the oldest went
    dom = h.node.domsvc.dom
    assert dom.count("audit", "host", "host1") == len(recs)
    assert any(el.tag == DOM_NS + "audit" for el in dom.tombstones())
    # Age: a month later every record here is past max_age_ms.
    real = log.now_ms
    log.now_ms = lambda: real() + audit_mod.MAX_AGE_MS + 1
    try:
        n = yield log.expire()
    finally:
        log.now_ms = real
    assert n == len(recs)
    assert (yield audit_of(h)) == []


@pytest_twisted.inlineCallbacks
def test_bad_since_or_limit_is_an_invalid_argument_naming_it(start_node):
    """A since that is no time and a limit out of 1..LIST_MAX are Client.InvalidArgument naming the
    field; a span and an ISO time filter records by when they were taken."""
    h = yield start_node()
    yield h.call("SetQuota", "carol", 4)
    f = yield fault_of(audit_of(h, since="yesterday"))
    assert f.code == "Client.InvalidArgument" and f.message.startswith("since:")
    for limit in (-1, audit_mod.LIST_MAX + 1):
        f = yield fault_of(audit_of(h, limit=limit))
        assert f.code == "Client.InvalidArgument" and f.message.startswith("limit:"), f.message
    assert len((yield audit_of(h, since="1h"))) == 1
    assert (yield audit_of(h, since="2999-01-01T00:00:00Z")) == []


def run_cli(address: str, *args: str, user=ADMIN) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmwebd.cli", "--host", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env=child_env(VMWEB_USER=user[0], VMWEB_PASSWORD=user[1]),
    )


@pytest_twisted.inlineCallbacks
def test_vmweb_audit_prints_a_table_or_json_and_refuses_bad_arguments(start_node):
    """`vmweb audit` lists records newest first (--user, --since, --json); a bad --since or
    --limit exits 2 naming the argument, before anything is sent."""
    h = yield start_node()
    yield h.call("SetQuota", "carol", 5)
    f = yield fault_of(h.as_user("alice").call("SetQuota", "alice", 50))
    assert f.code == "Client.NotAuthorized"
    addr = h.node.api_address
    out = yield threads.deferToThread(run_cli, addr, "audit")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["TIME", "USER", "OPERATION", "OBJECT", "OUTCOME"]
    assert "alice" in lines[1] and "Client.NotAuthorized" in lines[1] and "user/alice" in lines[1]
    assert "admin" in lines[2] and "SetQuota" in lines[2] and " ok " in lines[2]
    out = yield threads.deferToThread(run_cli, addr, "audit", "--user", "alice", "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    recs = json.loads(out.stdout)
    assert [(r["user"], r["op"], r["outcome"]) for r in recs] == [
        ("alice", "SetQuota", "Client.NotAuthorized")
    ]
    today = time.strftime("%Y-%m-%dT00:00")
    out = yield threads.deferToThread(
        run_cli, addr, "audit", "--since", today, "--json", user=("alice", password_of("alice"))
    )
    assert out.returncode == 0, out.stderr
    assert {r["user"] for r in json.loads(out.stdout)} == {"alice"}
    for args, name in (
        (("--since", "yesterday"), "--since"),
        (("--limit", "0"), "--limit"),
        (("--limit", "10001"), "--limit"),
    ):
        out = yield threads.deferToThread(run_cli, addr, "audit", *args)
        assert out.returncode == 2 and f"argument {name}" in out.stderr, (args, out.stderr)


def test_cli_limit_is_the_grids():
    """The CLI's --limit bound is ListAudit's."""
    from vmwebd import cli

    assert cli.AUDIT_LIMIT_MAX == audit_mod.LIST_MAX


# -- two real daemons ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_record_made_at_one_host_is_read_at_another_and_both_stop_cleanly(tmp_path):
    """Two daemons in one grid: a change and a refusal taken at host1 are listed at host2 (the
    DOM carries them), with host1 as their host; SIGTERM then stops both with no traceback and
    nothing logged at error or worse."""
    from procs import create_users, user_client
    from test_peers_process import Grid, wait_until

    g = Grid(tmp_path, 2)
    try:
        wait_until(
            lambda: all(
                set(g.liveness(i).values()) == {"alive"} and len(g.liveness(i)) == 2 for i in range(2)
            ),
            30,
            "two hosts to see each other alive",
        )
        create_users(g.client(0), ("alice",))
        g.client(0).call("CreateCluster", "spread", "lab", "alice", 3)
        with pytest.raises(ApiFault):
            user_client(g.daemons[0].url, "alice").call("SetSetting", "placement", "pack")
        want = [
            ("alice", "SetSetting", "Client.NotAuthorized", "host1"),
            ("admin", "CreateCluster", "ok", "host1"),
        ]

        def at_host2():
            recs = g.client(1).call("ListAudit", None, None, 2) or []
            return [(r["user"], r["op"], r["outcome"], r["host"]) for r in recs] == want

        wait_until(at_host2, 30, "host1's records at host2")
        mine = user_client(g.daemons[1].url, "alice").call("ListAudit", None, None, None)
        assert [r["op"] for r in mine] == ["SetSetting"]
        for d in g.daemons:
            assert d.terminate() == 0, d.log()
        for d in g.daemons:
            bad = [
                line
                for line in d.log().splitlines()
                if "Traceback" in line
                or "#critical]" in line
                or "#error]" in line
                or "driver is closed" in line
            ]
            assert bad == [], d.log()
    finally:
        g.close()


@pytest_twisted.inlineCallbacks
def test_consensus_member_changes_are_audited(start_node):
    """Adding a consensus member, and a refused removal, leave their records like any other
    change (they go through the application layer too)."""
    h = yield start_node()
    bad = yield fault_of(h.call("AddHost", "Not A Host"))
    assert bad.code == "Client.InvalidArgument"
    members = yield h.call("AddHost", "host2")
    assert sorted(members) == ["host1", "host2"]
    recs = yield audit_of(h)
    ops = [(r["op"], r["object"], r["outcome"]) for r in recs]
    assert ("AddHost", "host/host2", "ok") in ops
    assert ("AddHost", "host/Not A Host", "Client.InvalidArgument") in ops
