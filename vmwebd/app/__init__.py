"""The application: every operation users ask for, with its permission and quota checks. The
SOAP API (:mod:`vmwebd.api.service`) and the web pages (:mod:`vmwebd.web`) both call one
:class:`Application`; the console (:mod:`vmwebd.console`) asks it who may see a VM.

* **Permissions**: an admin sees and acts on everything; a user sees and acts only on the
  clusters they own, and on their own account (:mod:`vmwebd.app.checks`). Every cluster belongs
  to a user account; quotas (VMs per owner) are checked at create and scale.
* **Parts**, each built from its collaborators (never the daemon's node):
  :mod:`~vmwebd.app.clusters` (clusters, VMs, power, quotas, a cluster's hosts file),
  :mod:`~vmwebd.app.hosts` (consensus members, drain, evacuate, migrations),
  :mod:`~vmwebd.app.users` (accounts, passwords, quotas, SSH keys),
  :mod:`~vmwebd.app.settings` (settings, base images, the DOM a caller may see, the audit trail).
* **Views of the DOM** never hold a password hash (:meth:`Application.dom_xml`).
* **Audit** (:mod:`vmwebd.audit`): every writing method of :class:`Application` is recorded when
  it ends (user, operation, object, ``ok`` or the faultcode) by a wrapper put on the class once,
  from the table ``vmwebd.audit.AUDITED``; a user reads only their own records.

Reads answer from the local replica; writes go through the cluster manager, the migration
manager, the lease service, the image store, or straight into the DOM (users, settings).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from vmwebd.accounts import Principal, SshKey
from vmwebd.app.checks import require_admin as _require_admin
from vmwebd.app.clusters import ClusterService
from vmwebd.app.hosts import HostService, Membership, Migrations
from vmwebd.app.settings import ImageCatalog, SettingsService
from vmwebd.app.users import Runner, UserService, UserView
from vmwebd.audit import AuditLog, instrument
from vmwebd.cluster import ClusterManager, ClusterView, VmView
from vmwebd.dom.persist import DomService
from vmwebd.dom.records import AuditRec, MigrationRec
from vmwebd.errors import ConsoleUnavailable, NoSuchVm


class Application:
    """One object with every user-facing operation, each delegated to the part that owns it;
    ``audit`` records the writing ones (:func:`vmwebd.audit.instrument`, applied below)."""

    def __init__(
        self,
        clusters: ClusterService,
        hosts: HostService,
        users: UserService,
        settings: SettingsService,
        audit: AuditLog,
    ):
        self._clusters = clusters
        self._hosts = hosts
        self._users = users
        self._settings = settings
        self.audit = audit

    # -- checks ----------------------------------------------------------------------------
    @staticmethod
    def require_admin(p: Principal, what: str) -> None:
        _require_admin(p, what)

    def used(self, owner: str, skip_cluster: str | None = None) -> int:
        return self._clusters.used(owner, skip_cluster)

    # -- clusters --------------------------------------------------------------------------
    def cluster(self, p: Principal, name: str) -> ClusterView:
        return self._clusters.cluster(p, name)

    def clusters(self, p: Principal, owner: str | None = None) -> list[ClusterView]:
        return self._clusters.clusters(p, owner)

    def open_console(self, p: Principal, cluster: str, vm: str) -> VmView:
        """The view of VM ``cluster/vm`` when ``p`` may open its serial console now: its owner or
        an admin, and the VM running. Raises NotAuthorized, NoSuchCluster, NoSuchVm or
        ConsoleUnavailable, each naming the VM. Recorded in the audit trail either way: a console
        lets its user do anything inside the guest, so who opened which one is kept like a
        change."""
        c = self._clusters.cluster(p, cluster)
        v = next((v for v in c.vms if v.name == vm), None)
        if v is None:
            raise NoSuchVm(c.name, vm)
        if v.state != "running":
            raise ConsoleUnavailable(f"{c.name}/{vm}", f"it is not running (its state is {v.state})")
        return v

    def create_cluster(
        self, p: Principal, name: str, template: str, owner: str, count: int
    ) -> defer.Deferred[Any]:
        return self._clusters.create_cluster(p, name, template, owner, count)

    def scale_cluster(self, p: Principal, name: str, count: int, force: bool = False) -> defer.Deferred[Any]:
        return self._clusters.scale_cluster(p, name, count, force)

    def destroy_cluster(self, p: Principal, name: str, force: bool = False) -> defer.Deferred[Any]:
        return self._clusters.destroy_cluster(p, name, force)

    def set_vm_power(
        self, p: Principal, cluster: str, vm: str, desired: str, force: bool = False
    ) -> defer.Deferred[Any]:
        return self._clusters.set_vm_power(p, cluster, vm, desired, force)

    def cluster_hosts(self, p: Principal, name: str) -> tuple[str, str]:
        return self._clusters.cluster_hosts(p, name)

    # -- hosts and migrations --------------------------------------------------------------
    def migrate_vm(self, p: Principal, cluster: str, vm: str, dest: str | None = None) -> defer.Deferred[Any]:
        return self._hosts.migrate_vm(p, cluster, vm, dest)

    def evacuate_host(self, p: Principal, host: str) -> defer.Deferred[Any]:
        return self._hosts.evacuate_host(p, host)

    def add_member(self, p: Principal, host: str) -> defer.Deferred[list[str]]:
        return self._hosts.add_member(p, host)

    def remove_member(self, p: Principal, host: str) -> defer.Deferred[list[str]]:
        return self._hosts.remove_member(p, host)

    def drain_host(self, p: Principal, host: str) -> defer.Deferred[Any]:
        return self._hosts.drain_host(p, host)

    def undrain_host(self, p: Principal, host: str) -> defer.Deferred[Any]:
        return self._hosts.undrain_host(p, host)

    def migration(self, p: Principal, mid: str) -> MigrationRec:
        return self._hosts.migration(p, mid)

    def migrations(self, p: Principal) -> list[MigrationRec]:
        return self._hosts.migrations(p)

    def migration_waiting(self, m: MigrationRec) -> str:
        return self._hosts.migration_waiting(m)

    # -- the grid --------------------------------------------------------------------------
    def add_image(
        self,
        p: Principal,
        name: str,
        path: str,
        fmt: str | None,
        kernel: str | None,
        initrd: str | None,
        cmdline: str | None,
    ) -> defer.Deferred[Any]:
        return self._settings.add_image(p, name, path, fmt, kernel, initrd, cmdline)

    def set_setting(self, p: Principal, key: str, value: str | None) -> defer.Deferred[Any]:
        return self._settings.set_setting(p, key, value)

    def dom_xml(self, p: Principal, pretty: bool = True) -> bytes:
        return self._settings.dom_xml(p, pretty)

    def list_audit(
        self, p: Principal, user: str | None = None, since: str | None = None, limit: int | None = None
    ) -> list[AuditRec]:
        return self._settings.list_audit(p, user, since, limit)

    # -- users -----------------------------------------------------------------------------
    def users(self, p: Principal) -> list[UserView]:
        return self._users.users(p)

    def user(self, p: Principal, name: str) -> UserView:
        return self._users.user(p, name)

    def create_user(
        self, p: Principal, name: str, password: str, role: str | None = None, quota: int | None = None
    ) -> defer.Deferred[UserView]:
        return self._users.create_user(p, name, password, role, quota)

    def delete_user(self, p: Principal, name: str) -> defer.Deferred[bool]:
        return self._users.delete_user(p, name)

    def set_password(self, p: Principal, name: str, password: str) -> defer.Deferred[bool]:
        return self._users.set_password(p, name, password)

    def set_quota(self, p: Principal, name: str, quota: int) -> defer.Deferred[UserView]:
        return self._users.set_quota(p, name, quota)

    def ssh_keys(self, p: Principal, name: str | None = None) -> list[SshKey]:
        return self._users.ssh_keys(p, name)

    def add_ssh_key(self, p: Principal, name: str | None, key: str) -> defer.Deferred[SshKey]:
        return self._users.add_ssh_key(p, name, key)

    def add_ssh_key_file(self, p: Principal, name: str | None, text: str) -> defer.Deferred[list[SshKey]]:
        return self._users.add_ssh_key_file(p, name, text)

    def remove_ssh_key(
        self, p: Principal, name: str | None, key_or_fingerprint: str
    ) -> defer.Deferred[SshKey]:
        return self._users.remove_ssh_key(p, name, key_or_fingerprint)


instrument(Application)


def build_application(
    *,
    manager: ClusterManager,
    domsvc: DomService,
    migrations: Migrations,
    members: Membership,
    images: ImageCatalog,
    audit: AuditLog,
    now_ms: Callable[[], int],
    run: Runner,
) -> Application:
    """The application on its collaborators: the cluster ``manager``, the DOM service, the
    migration manager, the consensus ``members`` (the lease service), the image store, the
    ``audit`` log (started and stopped by its owner), the clock, and ``run`` for blocking work
    (password hashes; the daemon gives a :class:`vmwebd.blocking.ThreadPoolRunner`)."""
    dom = domsvc.dom
    return Application(
        ClusterService(manager, dom),
        HostService(dom, migrations, members),
        UserService(domsvc, run),
        SettingsService(domsvc, images, audit, now_ms),
        audit,
    )


__all__ = ["Application", "UserView", "build_application"]
