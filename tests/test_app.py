"""The application layer (vmwebd/app/) on its real collaborators, built without a Node: a DOM
service on disk, a cluster manager with a real allocator (over an in-memory lease table whose
rounds the test lets through), the audit log; doubles for the migration manager, the consensus
members and the image store (the parts' Protocols). Who may see and change what, and quotas."""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import defer

from vmwebd.accounts import Principal
from vmwebd.app import Application, build_application
from vmwebd.audit import AuditLog
from vmwebd.cluster import ClusterManager
from vmwebd.config import load_config
from vmwebd.demo import write_host_config
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.persist import DomService, load_dom
from vmwebd.dom.records import HostRec, TemplateRec, UserRec, VClusterRec
from vmwebd.errors import InvalidArgument, NoSuchCluster, NotAuthorized, QuotaExceeded
from vmwebd.lease.allocator import Allocator
from vmwebd.templates import load_templates, to_dom_body

HOST = "h1"
ADMIN = Principal("root", "admin")
ALICE = Principal("alice", "user")
BOB = Principal("bob", "user")


class GatedTable:
    """Leases in a dict; every round waits in ``pending`` until the test fires it."""

    def __init__(self):
        self.held: dict[str, str] = {}
        self.pending: list[defer.Deferred] = []

    def holder(self, key):
        return self.held.get(key)

    def _round(self, values: dict[str, str | None]) -> defer.Deferred:
        d = defer.Deferred()
        d.addCallback(lambda _: self.held.update({k: v for k, v in values.items() if v is not None}))
        self.pending.append(d)
        return d

    def acquire(self, claims):
        return self._round(dict(claims))

    def cas(self, ops):
        return self._round({k: new for k, (_, new) in ops.items()})

    def release(self, holders):
        for k, h in holders.items():
            if self.held.get(k) == h:
                del self.held[k]
        return defer.succeed(None)

    def let_through(self) -> None:
        while self.pending:
            self.pending.pop(0).callback(None)


class Members:
    """The consensus members (Membership): records what it was asked."""

    def __init__(self):
        self.members = [HOST]
        self.asked: list[tuple[str | None, str | None]] = []

    def change_members(self, add=None, remove=None):
        self.asked.append((add, remove))
        self.members = sorted(set(self.members) | {add} if add else set(self.members) - {remove})
        return defer.succeed(tuple(self.members))


class Migrations:
    """The migration manager (Migrations): records what it was asked."""

    def __init__(self):
        self.asked: list[tuple] = []

    def _ask(self, *what):
        self.asked.append(what)
        return defer.succeed([])

    def request(self, cluster, vm, dest=None, requested_by=""):
        return self._ask("request", cluster, vm, dest, requested_by)

    def evacuate(self, host, requested_by=""):
        return self._ask("evacuate", host, requested_by)

    def drain(self, host, requested_by=""):
        return self._ask("drain", host, requested_by)

    def undrain(self, host):
        return self._ask("undrain", host)

    def get(self, mid):
        raise AssertionError("not used here")

    def waiting(self, m):
        raise AssertionError("not used here")


class Images:
    """The image store (ImageCatalog)."""

    def add(self, name, path, fmt="qcow2", kernel="", initrd="", cmdline=""):
        raise AssertionError("only admins get here, and these tests add no image")


class World:
    def __init__(
        self,
        app: Application,
        domsvc: DomService,
        table: GatedTable,
        members: Members,
        migrations: Migrations,
        audit: AuditLog,
    ):
        self.app, self.domsvc, self.table = app, domsvc, table
        self.members, self.migrations, self.audit = members, migrations, audit

    def audited(self, user: str) -> list[tuple[str, str, str]]:
        return [(r.op, r.object, r.outcome) for r in self.audit.query(user, 0, 100)]


@pytest.fixture
def world(tmp_path):
    from twisted.internet import reactor

    cfg = load_config(write_host_config(tmp_path / HOST, HOST, 0, 0, 8, 16384))

    def now_ms() -> int:
        return int(reactor.seconds() * 1000)

    dom, store, n = load_dom(tmp_path / "dom", HybridClock(HOST, now_ms), fsync=False)
    domsvc = DomService(dom, store, reactor, journal_records=n)
    table = GatedTable()
    allocator = Allocator(table, {p.name: p for p in cfg.ip_pools}, cfg.mac, cfg.vni, random.Random(3))
    manager = ClusterManager(HOST, domsvc, allocator, cfg.limits, now_ms)
    members, migrations = Members(), Migrations()
    audit = AuditLog(HOST, domsvc, now_ms)
    app = build_application(
        manager=manager,
        domsvc=domsvc,
        migrations=migrations,
        members=members,
        images=Images(),
        audit=audit,
        now_ms=now_ms,
        run=lambda f, *args: defer.maybeDeferred(f, *args),
    )
    templates = load_templates(cfg.templates_dir, cfg.image_names, cfg.ip_pool_names)
    pytest_twisted.blockon(
        domsvc.put(
            HostRec(id=HOST, cpus=64, memory_mib=262144, liveness="alive"),
            *[
                TemplateRec(id=name, description=t.description, body=(to_dom_body(t),))
                for name, t in templates.items()
            ],
            UserRec(id="root", role="admin", password_hash="scrypt$root-hash", quota_vms=64),
            UserRec(id="alice", password_hash="scrypt$alice-hash", quota_vms=3),
            UserRec(id="bob", password_hash="scrypt$bob-hash", quota_vms=16),
            VClusterRec(id="bobs", owner="bob", template="lab", count=0, state="active"),
        )
    )
    yield World(app, domsvc, table, members, migrations, audit)
    domsvc.close()


@defer.inlineCallbacks
def refused(call, *args, kind=NotAuthorized):
    """Fires with the error ``call(*args)`` fails with, at once or through its Deferred (which
    fires once the audit record is durable)."""
    try:
        result = yield defer.maybeDeferred(call, *args)
    except kind as e:
        return e
    pytest.fail(f"{call.__name__}{args} gave {result!r}, not {kind.__name__}")


@pytest_twisted.inlineCallbacks
def test_a_user_can_neither_see_nor_change_another_users_cluster(world):
    app = world.app
    for call, args in [
        (app.cluster, ("bobs",)),
        (app.cluster_hosts, ("bobs",)),
        (app.scale_cluster, ("bobs", 2)),
        (app.destroy_cluster, ("bobs",)),
        (app.set_vm_power, ("bobs", "pc1", "stopped")),
        (app.migrate_vm, ("bobs", "pc1")),
    ]:
        err = yield refused(call, ALICE, *args)
        assert err.faultcode == "Client.NotAuthorized"
        assert "user 'alice' may not see or change cluster 'bobs'" in err.message, call.__name__
    assert "list their own clusters" in (yield refused(app.clusters, ALICE, "bob")).message
    assert [c.name for c in app.clusters(ALICE)] == []
    assert world.migrations.asked == []
    # Its owner and an admin see it; nobody sees a cluster that is not there.
    assert app.cluster(BOB, "bobs").name == app.cluster(ADMIN, "bobs").name == "bobs"
    assert [c.name for c in app.clusters(BOB)] == ["bobs"]
    missing = yield refused(app.cluster, ALICE, "nope", kind=NoSuchCluster)
    assert missing.faultcode == "Client.NoSuchCluster"
    # Her view of the DOM has neither his cluster nor anyone's password hash.
    mine = app.dom_xml(ALICE).decode()
    assert 'id="bobs"' not in mine and "scrypt$" not in mine and 'id="bob"' not in mine
    assert 'id="bobs"' in app.dom_xml(ADMIN).decode() and "scrypt$" not in app.dom_xml(ADMIN).decode()
    # Every refused change is in the audit trail, under her name; the reads are not.
    assert ("DestroyCluster", "cluster/bobs", "Client.NotAuthorized") in world.audited("alice")
    assert ("ScaleCluster", "cluster/bobs", "Client.NotAuthorized") in world.audited("alice")
    assert {op for op, _, _ in world.audited("alice")} == {
        "ScaleCluster",
        "DestroyCluster",
        "StopVm",
        "MigrateVm",
    }


@pytest_twisted.inlineCallbacks
def test_only_an_admin_changes_the_members_and_drains_hosts(world):
    app = world.app
    err = yield refused(app.add_member, ALICE, "h2")
    assert err.message == "adding hosts is for admins; user 'alice' is not one"
    assert "removing hosts is for admins" in (yield refused(app.remove_member, ALICE, HOST)).message
    assert "draining hosts is for admins" in (yield refused(app.drain_host, ALICE, HOST)).message
    assert "evacuating hosts is for admins" in (yield refused(app.evacuate_host, ALICE, HOST)).message
    assert world.members.asked == [] and world.migrations.asked == []
    bad = yield refused(app.add_member, ADMIN, "Not A Host", kind=InvalidArgument)
    assert bad.message.startswith("host:")
    assert world.members.asked == []
    assert (yield app.add_member(ADMIN, "h2")) == ["h1", "h2"]  # fires once its record is durable
    assert world.members.asked == [("h2", None)]
    assert ("AddHost", "host/h2", "Client.NotAuthorized") in world.audited("alice")
    assert ("AddHost", "host/h2", "ok") in world.audited("root")


@pytest_twisted.inlineCallbacks
def test_a_user_changes_only_their_own_account(world):
    app = world.app
    err = yield refused(app.set_password, ALICE, "bob", "long-enough-pw")
    assert "only change their own password" in err.message
    err = yield refused(app.create_user, ALICE, "eve", "long-enough-pw")
    assert "creating users is for admins" in err.message
    assert "changing quotas is for admins" in (yield refused(app.set_quota, ALICE, "alice", 99)).message
    assert "own SSH keys, not those of 'bob'" in (yield refused(app.ssh_keys, ALICE, "bob")).message
    assert [u.name for u in app.users(ALICE)] == ["alice"]
    assert app.user(ALICE, "alice").quota_vms == 3


@pytest_twisted.inlineCallbacks
def test_a_quota_exceeded_names_the_owner_whoever_asks(world):
    app = world.app
    for who in (ALICE, ADMIN):
        err = yield refused(app.create_cluster, who, "big", "lab", "alice", 4, kind=QuotaExceeded)
        assert err.faultcode == "Client.QuotaExceeded"
        assert err.message == (
            "user 'alice' has a quota of 3 VMs, uses 0 in other clusters, and asked for 4 VMs"
        )
    assert world.table.pending == [] and world.domsvc.dom.get(VClusterRec, "big") is None
    err = yield refused(app.create_cluster, ALICE, "hers", "lab", "bob", 1)
    assert "only create clusters of their own" in err.message


@pytest_twisted.inlineCallbacks
def test_vms_promised_to_a_create_under_way_count_against_the_quota(world):
    """Two creates at this host cannot both slip under a quota while the first one's leases are
    still being decided."""
    app = world.app
    first = app.create_cluster(ALICE, "one", "lab", "alice", 2)
    assert len(world.table.pending) == 1 and not first.called  # its leases are on their way
    err = yield refused(app.create_cluster, ALICE, "two", "lab", "alice", 2, kind=QuotaExceeded)
    assert "user 'alice' has a quota of 3 VMs, uses 2 in other clusters" in err.message
    world.table.let_through()
    view = yield first
    assert view.name == "one" and app.used("alice") == 2
    # Once it is recorded, its VMs count as the cluster's own, not twice.
    err = yield refused(app.scale_cluster, ALICE, "one", 4, kind=QuotaExceeded)
    assert err.message == (
        "user 'alice' has a quota of 3 VMs, uses 0 in other clusters, and asked "
        "to scale cluster 'one' from 2 to 4 VMs"
    )
    third = app.create_cluster(ALICE, "three", "lab", "alice", 1)
    world.table.let_through()
    assert (yield third).name == "three" and app.used("alice") == 3
    assert sorted(world.audited("alice")) == [
        ("CreateCluster", "cluster/one", "ok"),
        ("CreateCluster", "cluster/three", "ok"),
        ("CreateCluster", "cluster/two", "Client.QuotaExceeded"),
        ("ScaleCluster", "cluster/one", "Client.QuotaExceeded"),
    ]
