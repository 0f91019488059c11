"""Clusters and their VMs as users ask for them: who may see and change which, quotas (VMs per
owner, counting those promised to creates and scales still under way at this host), power, and
a cluster's names for its guests (hosts file, MPI hostfile)."""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.internet import defer

from vmwebd.accounts import Principal, check_user_name
from vmwebd.app.checks import owned_cluster
from vmwebd.cluster import ClusterManager, ClusterView, _check_name
from vmwebd.dom.document import Dom
from vmwebd.dom.records import UserRec, VClusterRec, VmRec
from vmwebd.errors import NoSuchUser, NotAuthorized, QuotaExceeded
from vmwebd.net.seed import cluster_hosts_text, mpi_hostfile
from vmwebd.templates import expand, plan_scale


class ClusterService:
    """Reads answer from the local replica ``dom``; changes go through the cluster ``manager``."""

    def __init__(self, manager: ClusterManager, dom: Dom):
        self.mgr = manager
        self.dom = dom
        # VMs promised to creates/scales still on their way (leases), per owner: two requests
        # at this host can never both slip under a quota.
        self._inflight: collections.Counter[str] = collections.Counter()

    # -- quotas ----------------------------------------------------------------------------
    def used(self, owner: str, skip_cluster: str | None = None) -> int:
        """VMs ``owner``'s clusters hold (or are about to), one cluster left out if asked."""
        own = [c.id for c in self.dom.select(VClusterRec, "owner", owner) if c.id != skip_cluster]
        return sum(1 for c in own for vm in self.dom.select(VmRec, "cluster", c) if vm.desired != "absent")

    def _check_quota(self, owner: str, wanted: int, skip_cluster: str | None, have: int = 0) -> None:
        rec = self.dom.get(UserRec, owner)
        if rec is None:
            raise NoSuchUser(owner)
        used = self.used(owner, skip_cluster) + self._inflight[owner]
        if used + wanted > rec.quota_vms:
            what = (
                f"asked for {wanted} VMs"
                if skip_cluster is None
                else f"asked to scale cluster {skip_cluster!r} from {have} to {wanted} VMs"
            )
            raise QuotaExceeded(
                f"user {owner!r} has a quota of {rec.quota_vms} VMs, uses "
                f"{used} in other clusters, and {what}"
            )

    @defer.inlineCallbacks
    def _holding(self, owner: str, n: int, d_fn: Callable[[], defer.Deferred[Any]]):
        self._inflight[owner] += n
        try:
            return (yield d_fn())
        finally:
            self._inflight[owner] -= n
            if self._inflight[owner] <= 0:
                del self._inflight[owner]

    # -- clusters --------------------------------------------------------------------------
    def cluster(self, p: Principal, name: str) -> ClusterView:
        owned_cluster(self.dom, p, name)
        return self.mgr.cluster(name)

    def clusters(self, p: Principal, owner: str | None = None) -> list[ClusterView]:
        if not p.is_admin:
            if owner and owner != p.name:
                raise NotAuthorized(f"user {p.name!r} may only list their own clusters")
            owner = p.name
        return self.mgr.clusters(owner or None)

    def create_cluster(
        self, p: Principal, name: str, template: str, owner: str, count: int
    ) -> defer.Deferred[Any]:
        if not p.is_admin and owner != p.name:
            raise NotAuthorized(
                f"user {p.name!r} may only create clusters of their own (owner {owner!r} asked)"
            )
        _check_name(name)
        check_user_name(owner, "owner")
        if self.dom.get(UserRec, owner) is None:
            raise NoSuchUser(owner)
        planned = expand(self.mgr.template(template), count, self.mgr.limits.max_vms_per_cluster)
        self._check_quota(owner, len(planned), None)
        return self._holding(owner, len(planned), lambda: self.mgr.create(name, template, owner, count))

    def scale_cluster(self, p: Principal, name: str, count: int, force: bool = False) -> defer.Deferred[Any]:
        c = owned_cluster(self.dom, p, name)
        existing = [vm.name for vm in self.dom.select(VmRec, "cluster", c.id) if vm.desired != "absent"]
        to_add, to_remove = plan_scale(
            self.mgr.template(c.template), existing, count, self.mgr.limits.max_vms_per_cluster
        )
        after = len(existing) + len(to_add) - len(to_remove)
        if to_add:
            self._check_quota(c.owner, after, c.id, have=len(existing))
        return self._holding(c.owner, len(to_add), lambda: self.mgr.scale(name, count, force))

    def destroy_cluster(self, p: Principal, name: str, force: bool = False) -> defer.Deferred[Any]:
        owned_cluster(self.dom, p, name)
        return self.mgr.destroy(name, force)

    def set_vm_power(
        self, p: Principal, cluster: str, vm: str, desired: str, force: bool = False
    ) -> defer.Deferred[Any]:
        owned_cluster(self.dom, p, cluster)
        return self.mgr.set_vm_power(cluster, vm, desired, force)

    # -- a cluster's names -------------------------------------------------------------------
    def cluster_hosts(self, p: Principal, name: str) -> tuple[str, str]:
        """``(hosts, mpi)``: the cluster's ``/etc/hosts`` lines (``IP FQDN NAME`` per member,
        as its guests have them) and an MPI hostfile (``FQDN slots=VCPUS`` per running
        member). Same permission as seeing the cluster."""
        c = owned_cluster(self.dom, p, name)
        return cluster_hosts_text(self.dom, c), mpi_hostfile(self.dom, c)
