"""Hosts and VM moves as users ask for them: consensus members, drain and undrain, evacuating a
dead host (admins only), migrations (a VM's owner moves their own, an admin any)."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer

from vmwebd.accounts import Principal
from vmwebd.app.checks import owned_cluster, require_admin
from vmwebd.dom.document import Dom
from vmwebd.dom.records import MigrationRec, VClusterRec
from vmwebd.errors import InvalidArgument
from vmwebd.ids import is_host_id


class Migrations(Protocol):
    """What the application asks of the migration manager
    (:class:`vmwebd.migrate.manager.MigrationManager`)."""

    def request(
        self, cluster: str, vm: str, dest: str | None = None, requested_by: str = ""
    ) -> defer.Deferred[Any]: ...

    def evacuate(self, host: str, requested_by: str = "") -> defer.Deferred[Any]: ...

    def drain(self, host: str, requested_by: str = "") -> defer.Deferred[Any]: ...

    def undrain(self, host: str) -> defer.Deferred[Any]: ...

    def get(self, mid: str) -> MigrationRec: ...

    def waiting(self, m: MigrationRec) -> str: ...


class Membership(Protocol):
    """Who decides leases (:class:`vmwebd.lease.service.LeaseService`): one member added or
    removed at a time, decided by the current members; fires with the new members."""

    def change_members(self, add: str | None = None, remove: str | None = None) -> defer.Deferred[Any]: ...


class HostService:
    """Reads answer from the local replica ``dom``; moves go through ``migrations``, member
    changes through ``members``."""

    def __init__(self, dom: Dom, migrations: Migrations, members: Membership):
        self.dom = dom
        self._migrations = migrations
        self.members = members

    # -- migrations ------------------------------------------------------------------------
    def migrate_vm(self, p: Principal, cluster: str, vm: str, dest: str | None = None) -> defer.Deferred[Any]:
        """Owners move their own VMs (an admin any); ``dest`` None lets vmweb choose."""
        owned_cluster(self.dom, p, cluster)
        return self._migrations.request(cluster, vm, dest or None, requested_by=p.name)

    def migration(self, p: Principal, mid: str) -> MigrationRec:
        m = self._migrations.get(mid)
        if not p.is_admin:
            owned_cluster(self.dom, p, m.vm.partition("/")[0])
        return m

    def migration_waiting(self, m: MigrationRec) -> str:
        """What a move under way waits on, said for people ("" once it ended)."""
        return self._migrations.waiting(m)

    def migrations(self, p: Principal) -> list[MigrationRec]:
        out = []
        for m in self.dom.all(MigrationRec):
            c = self.dom.get(VClusterRec, m.vm.partition("/")[0])
            if p.is_admin or (c is not None and c.owner == p.name):
                out.append(m)
        return sorted(out, key=lambda m: (m.started_at, m.id))

    # -- hosts -----------------------------------------------------------------------------
    def evacuate_host(self, p: Principal, host: str) -> defer.Deferred[Any]:
        """Re-places a dead host's VMs on live hosts (admins only: it is a judgement that the
        host is really gone)."""
        require_admin(p, "evacuating hosts")
        return self._migrations.evacuate(host, requested_by=p.name)

    def drain_host(self, p: Principal, host: str) -> defer.Deferred[Any]:
        require_admin(p, "draining hosts")
        return self._migrations.drain(host, requested_by=p.name)

    def undrain_host(self, p: Principal, host: str) -> defer.Deferred[Any]:
        require_admin(p, "draining hosts")
        return self._migrations.undrain(host)

    def add_member(self, p: Principal, host: str) -> defer.Deferred[list[str]]:
        """Makes ``host`` a consensus member (one host at a time, decided by the members)."""
        require_admin(p, "adding hosts")
        if not is_host_id(host):
            raise InvalidArgument("host", f"{host!r} is not a host id")
        return self.members.change_members(add=host).addCallback(list)

    def remove_member(self, p: Principal, host: str) -> defer.Deferred[list[str]]:
        """Removes ``host`` from the consensus members (one host at a time)."""
        require_admin(p, "removing hosts")
        return self.members.change_members(remove=host).addCallback(list)
