"""The user SOAP API (``urn:vmweb:api:1``): the contract other programs and the CLI rely on.

Operation names and arguments are fixed by the design (append only; never rename). Each
operation calls the application (:class:`vmwebd.app.Application`), which checks what the caller
(authenticated by HTTP Basic in front of this service, see :class:`vmwebd.auth.BasicAuthGuard`)
may see and do; errors are VmwebErrors, which the SOAP stack turns into faults with specific
faultcodes.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable

from spyne import Array, Boolean, ComplexModel, Float, Integer, Service, Unicode, rpc

from vmwebd.api import compat

compat.apply()

from vmwebd.api.soap import ResponseCache, build_soap_resource, soap_operation  # noqa: E402
from vmwebd.auth import principal_of  # noqa: E402
from vmwebd.dom.gc import format_cvv  # noqa: E402
from vmwebd.errors import InvalidArgument  # noqa: E402
from vmwebd.settings import SETTINGS, all_settings  # noqa: E402
from vmwebd.templates import min_count  # noqa: E402

if TYPE_CHECKING:
    from vmwebd.app import Application
    from vmwebd.cluster import ClusterManager
    from vmwebd.dom.document import Dom

TNS = "urn:vmweb:api:1"
SERVICE_NAME = "VmwebApi"


class RoleInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    count = Unicode  # a number, or "rest"
    vcpus = Integer
    memory_mib = Integer
    image = Unicode


class TemplateInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    description = Unicode
    min_count = Integer
    pool = Unicode
    network_mode = Unicode
    roles = Array(RoleInfo)


class VmInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    role = Unicode
    host = Unicode
    state = Unicode
    desired = Unicode
    ip = Unicode
    mac = Unicode
    vcpus = Integer
    memory_mib = Integer
    detail = Unicode
    restarts = Integer


class ClusterInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    owner = Unicode
    template = Unicode
    count = Integer
    state = Unicode
    vni = Integer
    network = Unicode
    bridge = Unicode
    vms = Array(VmInfo)


class HostInfo(ComplexModel):
    __namespace__ = TNS
    id = Unicode
    liveness = Unicode
    api = Unicode
    cpus = Integer
    memory_mib = Integer
    free_memory_mib = Integer
    load1 = Float
    vms = Integer
    used_vcpus = Integer
    used_memory_mib = Integer
    member = Boolean
    draining = Boolean


class DigestInfo(ComplexModel):
    """What a replica holds, as a hash: two hosts whose digests are equal hold the same DOM."""

    __namespace__ = TNS
    host = Unicode
    digest = Unicode  # sha256 hex of the replica's content, independent of arrival order
    entities = Integer  # entities held, tombstones included
    complete = Unicode  # up to where it holds everything, per origin: "origin:wall.counter ..."


class SettingInfo(ComplexModel):
    __namespace__ = TNS
    key = Unicode
    value = Unicode
    description = Unicode


class UserInfo(ComplexModel):
    """A user account as callers see it: never the password hash."""

    __namespace__ = TNS
    name = Unicode
    role = Unicode
    quota_vms = Integer
    used_vms = Integer
    used_vcpus = Integer
    used_memory_mib = Integer
    clusters = Integer


class SshKeyInfo(ComplexModel):
    """One of a user's SSH public keys: ``key`` the whole OpenSSH line, ``fingerprint`` as
    ``ssh-keygen -l`` prints it (``SHA256:…``)."""

    __namespace__ = TNS
    type = Unicode
    key = Unicode
    comment = Unicode
    fingerprint = Unicode


class ClusterHostsInfo(ComplexModel):
    """A cluster's names: ``hosts`` its members' ``/etc/hosts`` lines (``IP FQDN NAME``), ``mpi``
    an MPI hostfile (``FQDN slots=VCPUS`` per running member)."""

    __namespace__ = TNS
    name = Unicode
    hosts = Unicode
    mpi = Unicode


class MigrationInfo(ComplexModel):
    """One move of a VM: phase prepare → ready → migrating (live) or saved → restored (cold)
    → done | failed; sizes in bytes, times in ms (downtime as QEMU reports it)."""

    __namespace__ = TNS
    id = Unicode
    vm = Unicode
    source = Unicode
    dest = Unicode
    phase = Unicode
    mode = Unicode
    requested_by = Unicode
    started_at = Integer
    finished_at = Integer
    bytes = Integer
    disk_bytes = Integer
    total_ms = Integer
    downtime_ms = Integer
    error = Unicode
    #: For a move under way: the host it waits on and what for, and whether that host is alive
    #: as the answering host sees it ("" once it ended).
    waiting = Unicode


class ImageInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    file = Unicode
    format = Unicode
    size_mib = Integer
    sha256 = Unicode
    bytes = Integer
    kernel = Unicode
    initrd = Unicode
    cmdline = Unicode
    hosts = Array(Unicode)


class AuditInfo(ComplexModel):
    """One change asked of the grid: when (``at``, ms since the epoch), by whom, which operation
    on which object, ``ok`` or the faultcode, at which host; ``id`` is unique in the grid."""

    __namespace__ = TNS
    id = Unicode
    at = Integer
    host = Unicode
    user = Unicode
    op = Unicode
    object = Unicode
    outcome = Unicode
    detail = Unicode
    ms = Integer


def migration_info(m, waiting: str = "") -> MigrationInfo:
    return MigrationInfo(
        waiting=waiting,
        id=m.id,
        vm=m.vm,
        source=m.source,
        dest=m.dest,
        phase=m.phase,
        mode=m.mode,
        requested_by=m.requested_by,
        started_at=m.started_at,
        finished_at=m.finished_at,
        bytes=m.bytes,
        disk_bytes=m.disk_bytes,
        total_ms=m.total_ms,
        downtime_ms=m.downtime_ms,
        error=m.error,
    )


def image_info(rec, dom) -> ImageInfo:
    from vmwebd.dom.records import HostRec

    hosts = (
        sorted(h.id for h in dom.all(HostRec) if rec.id in h.images.split())
        if rec.sha256
        else ["(blank: every host)"]
    )
    return ImageInfo(
        name=rec.id,
        file=rec.file,
        format=rec.format,
        size_mib=rec.size_mib,
        sha256=rec.sha256,
        bytes=rec.bytes,
        kernel=rec.kernel,
        initrd=rec.initrd,
        cmdline=rec.cmdline,
        hosts=hosts,
    )


def template_info(t) -> TemplateInfo:
    return TemplateInfo(
        name=t.name,
        description=t.description,
        min_count=min_count(t),
        pool=t.network.pool,
        network_mode=t.network.mode,
        roles=[
            RoleInfo(
                name=r.name,
                count="rest" if r.is_rest else str(r.count),
                vcpus=r.vcpus,
                memory_mib=r.memory_mib,
                image=r.image,
            )
            for r in t.roles
        ],
    )


def cluster_info(c) -> ClusterInfo:
    return ClusterInfo(
        name=c.name,
        owner=c.owner,
        template=c.template,
        count=c.count,
        state=c.state,
        vni=c.vni,
        network=c.network,
        bridge=c.bridge,
        vms=[VmInfo(**vars(v)) for v in c.vms],
    )


def ssh_key_info(k) -> SshKeyInfo:
    return SshKeyInfo(type=k.kind, key=k.line, comment=k.comment, fingerprint=k.fingerprint)


def _required(value, field):
    if value is None or value == "":
        raise InvalidArgument(field, "is required")
    return value


def _caller(ctx):
    """The authenticated caller of this SOAP request."""
    return principal_of(ctx.transport.req)


def make_user_service(
    app: Application,
    mgr: ClusterManager,
    dom: Dom,
    host_id: str,
    complete_vector: Callable[[], dict[str, Any]],
) -> type[Service]:
    """The user API on one daemon's application ``app`` (every operation with its checks), with
    what its reads need: the cluster manager ``mgr`` (templates, hosts), the replica ``dom``,
    this host's id and ``complete_vector`` (up to where this replica holds everything)."""

    class VmwebApi(Service):
        @rpc(_returns=Array(TemplateInfo))
        def ListTemplates(ctx):
            _caller(ctx)
            return [template_info(t) for _, t in sorted(mgr.templates().items())]

        @rpc(Unicode, Unicode, Unicode, Integer, _returns=ClusterInfo)
        def CreateCluster(ctx, name, template, owner, count):
            _required(name, "name"), _required(template, "template"), _required(owner, "owner")
            _required(count, "count")
            return app.create_cluster(_caller(ctx), name, template, owner, count).addCallback(cluster_info)

        # ``force`` (appended, optional: older clients leave it out) powers removed VMs off at
        # once instead of asking their guests to shut down within stop_timeout_s.
        @rpc(Unicode, Integer, Boolean, _returns=ClusterInfo)
        def ScaleCluster(ctx, name, count, force):
            _required(name, "name"), _required(count, "count")
            return app.scale_cluster(_caller(ctx), name, count, bool(force)).addCallback(cluster_info)

        @rpc(Unicode, Boolean, _returns=Unicode)
        def DestroyCluster(ctx, name, force):
            _required(name, "name")
            return app.destroy_cluster(_caller(ctx), name, bool(force)).addCallback(
                lambda done: "destroyed" if done else "destroying"
            )

        @rpc(Unicode, _returns=ClusterInfo)
        def GetCluster(ctx, name):
            _required(name, "name")
            return cluster_info(app.cluster(_caller(ctx), name))

        @rpc(Unicode, _returns=ClusterHostsInfo)
        def GetClusterHosts(ctx, name):
            """The cluster's hosts file lines and an MPI hostfile (who may see the cluster)."""
            _required(name, "name")
            hosts, mpi = app.cluster_hosts(_caller(ctx), name)
            return ClusterHostsInfo(name=name, hosts=hosts, mpi=mpi)

        @rpc(Unicode, _returns=Array(ClusterInfo))
        def ListClusters(ctx, owner):
            return [cluster_info(c) for c in app.clusters(_caller(ctx), owner or None)]

        @rpc(Unicode, Unicode, _returns=VmInfo)
        def StartVm(ctx, cluster, vm):
            _required(cluster, "cluster"), _required(vm, "vm")
            return app.set_vm_power(_caller(ctx), cluster, vm, "running").addCallback(
                lambda v: VmInfo(**vars(v))
            )

        @rpc(Unicode, Unicode, Boolean, _returns=VmInfo)
        def StopVm(ctx, cluster, vm, force):
            """Asks the guest to shut down, powered off after stop_timeout_s; ``force``
            (optional) powers it off at once."""
            _required(cluster, "cluster"), _required(vm, "vm")
            return app.set_vm_power(_caller(ctx), cluster, vm, "stopped", bool(force)).addCallback(
                lambda v: VmInfo(**vars(v))
            )

        @rpc(_returns=Array(HostInfo))
        def ListHosts(ctx):
            _caller(ctx)
            return [HostInfo(**vars(h)) for h in mgr.hosts()]

        @rpc(_returns=Unicode)
        def GetDom(ctx):
            """The DOM as the caller may see it: password hashes always taken out."""
            return app.dom_xml(_caller(ctx)).decode("utf-8")

        @rpc(_returns=DigestInfo)
        def GetDigest(ctx):
            """A digest of this host's replica: anyone may compare hosts' digests to see that
            their replicas are equal (kept up to date on every change, never a scan)."""
            _caller(ctx)
            return DigestInfo(
                host=host_id, digest=dom.digest(), entities=dom.size(), complete=format_cvv(complete_vector())
            )

        @rpc(_returns=Array(SettingInfo))
        def GetSettings(ctx):
            _caller(ctx)
            return [
                SettingInfo(key=k, value=v, description=SETTINGS[k].description)
                for k, v in all_settings(dom).items()
            ]

        @rpc(Unicode, Unicode, _returns=SettingInfo)
        def SetSetting(ctx, key, value):
            _required(key, "key")
            return app.set_setting(_caller(ctx), key, value).addCallback(
                lambda rec: SettingInfo(key=rec.id, value=rec.value, description=SETTINGS[rec.id].description)
            )

        @rpc(Unicode, _returns=Array(Unicode))
        def AddHost(ctx, host):
            """Makes a host a consensus member (one host at a time, decided by the members)."""
            _required(host, "host")
            return app.add_member(_caller(ctx), host)

        @rpc(Unicode, _returns=Array(Unicode))
        def RemoveHost(ctx, host):
            """Removes a host from the consensus members (one host at a time)."""
            _required(host, "host")
            return app.remove_member(_caller(ctx), host)

        # -- users -----------------------------------------------------------------------
        @rpc(Unicode, Unicode, Unicode, Integer, _returns=UserInfo)
        def CreateUser(ctx, name, password, role, quota):
            """Creates a user account (admins only); role admin or user (default), quota in VMs."""
            _required(name, "name"), _required(password, "password")
            return app.create_user(_caller(ctx), name, password, role, quota).addCallback(
                lambda u: UserInfo(**vars(u))
            )

        @rpc(Unicode, _returns=Boolean)
        def DeleteUser(ctx, name):
            """Deletes a user account that owns no cluster (admins only)."""
            _required(name, "name")
            return app.delete_user(_caller(ctx), name)

        @rpc(Unicode, Unicode, _returns=Boolean)
        def SetPassword(ctx, name, password):
            """Changes a password: one's own, or anyone's for an admin."""
            _required(name, "name"), _required(password, "password")
            return app.set_password(_caller(ctx), name, password)

        @rpc(_returns=Array(UserInfo))
        def ListUsers(ctx):
            """Every account for an admin; a user gets their own."""
            return [UserInfo(**vars(u)) for u in app.users(_caller(ctx))]

        @rpc(Unicode, Integer, _returns=UserInfo)
        def SetQuota(ctx, name, quota):
            """Changes a user's quota of VMs (admins only)."""
            _required(name, "name"), _required(quota, "quota")
            return app.set_quota(_caller(ctx), name, quota).addCallback(lambda u: UserInfo(**vars(u)))

        @rpc(Unicode, Unicode, _returns=SshKeyInfo)
        def AddSshKey(ctx, user, key):
            """Adds an OpenSSH public key (one line) to a user's account (empty user: the
            caller's): one's own, or anyone's for an admin. Every VM of the user's clusters made
            from then on is given it."""
            _required(key, "key")
            return app.add_ssh_key(_caller(ctx), user or None, key).addCallback(ssh_key_info)

        @rpc(Unicode, _returns=Array(SshKeyInfo))
        def ListSshKeys(ctx, user):
            """A user's SSH public keys with their fingerprints (empty user: the caller's)."""
            return [ssh_key_info(k) for k in app.ssh_keys(_caller(ctx), user or None)]

        @rpc(Unicode, Unicode, _returns=SshKeyInfo)
        def RemoveSshKey(ctx, user, key_or_fingerprint):
            """Removes a key given by its fingerprint (``SHA256:…``) or its OpenSSH line; answers
            with the key removed."""
            _required(key_or_fingerprint, "key_or_fingerprint")
            return app.remove_ssh_key(_caller(ctx), user or None, key_or_fingerprint).addCallback(
                ssh_key_info
            )

        # -- migration and images --------------------------------------------------------
        @rpc(Unicode, Unicode, Unicode, _returns=MigrationInfo)
        def MigrateVm(ctx, cluster, vm, to):
            """Starts moving a VM to host ``to`` (empty: the least loaded host that fits).
            Answers once the move is reserved (its lease held); follow it with GetMigration."""
            _required(cluster, "cluster"), _required(vm, "vm")
            return app.migrate_vm(_caller(ctx), cluster, vm, to or None).addCallback(
                lambda m: migration_info(m, app.migration_waiting(m))
            )

        @rpc(Unicode, _returns=Array(MigrationInfo))
        def EvacuateHost(ctx, host):
            """Re-places every VM of a dead host on live hosts, booted afresh from its base image
            with the same addresses (admins only); answers with one ``evacuate`` move per VM,
            after the cold moves to the host that it ended (a saved VM the host held goes back to
            its source: that move ``failed``; one restored there is ``done``, then re-placed)."""
            _required(host, "host")
            return app.evacuate_host(_caller(ctx), host).addCallback(
                lambda ms: [migration_info(m) for m in ms]
            )

        @rpc(Unicode, _returns=Array(MigrationInfo))
        def DrainHost(ctx, host):
            """Stops placing VMs on a live host and starts moving each of its VMs away (admins
            only). Answers with the moves started; a VM that cannot move now comes back as a
            ``failed`` entry with no id and the reason (drain again to retry it)."""
            _required(host, "host")

            def answer(result):
                started, refused = result
                return [migration_info(m) for m in started] + [
                    MigrationInfo(id="", vm=vm, source=host, dest="", phase="failed", mode="", error=reason)
                    for vm, reason in refused
                ]

            return app.drain_host(_caller(ctx), host).addCallback(answer)

        @rpc(Unicode, _returns=Boolean)
        def UndrainHost(ctx, host):
            """Lets a drained host take new VMs again (admins only)."""
            _required(host, "host")
            return app.undrain_host(_caller(ctx), host).addCallback(lambda _: True)

        @rpc(Unicode, _returns=MigrationInfo)
        def GetMigration(ctx, id):
            _required(id, "id")
            m = app.migration(_caller(ctx), id)
            return migration_info(m, app.migration_waiting(m))

        @rpc(_returns=Array(MigrationInfo))
        def ListMigrations(ctx):
            return [migration_info(m, app.migration_waiting(m)) for m in app.migrations(_caller(ctx))]

        @rpc(Unicode, Unicode, Unicode, Unicode, Unicode, Unicode, _returns=ImageInfo)
        def AddImage(ctx, name, file, format, kernel, initrd, cmdline):
            """Registers a base image by content from ``file``, a path on the host that takes
            this call (admins only); other hosts fetch it from there when they need it."""
            _required(name, "name"), _required(file, "file")
            return app.add_image(_caller(ctx), name, file, format, kernel, initrd, cmdline).addCallback(
                lambda r: image_info(r, dom)
            )

        @rpc(_returns=Array(ImageInfo))
        def ListImages(ctx):
            _caller(ctx)
            from vmwebd.dom.records import ImageRec

            return [image_info(r, dom) for r in sorted(dom.all(ImageRec), key=lambda r: r.id)]

        @rpc(Unicode, Unicode, Integer, _returns=Array(AuditInfo))
        def ListAudit(ctx, user, since, limit):
            """Audit records, newest first: an admin reads anyone's (``user`` empty: everyone's),
            a user their own. ``since``: an ISO 8601 time (UTC unless it names a zone) or a span
            back from now (``90s``, ``30m``, ``1h``, ``2d``, ``1w``); ``limit`` from 1 to 10,000
            (empty: 100)."""
            return [
                AuditInfo(**{f: getattr(r, f) for f in AuditInfo._type_info})
                for r in app.list_audit(_caller(ctx), user or None, since or None, limit)
            ]

    return VmwebApi


#: Read-only operations answered from the response cache, with the kinds of DOM entity their
#: answer is computed from (plus the caller's account, for what it may see).
CACHED_READS: dict[str, tuple[str, ...]] = {
    "ListClusters": ("vcluster", "vm", "user"),
    "GetCluster": ("vcluster", "vm", "user"),
}


def read_cache_key(dom, view_generation=lambda: 0):
    """The response-cache key of a user API call: the operation and its arguments (the request
    body), who calls, the generations of the DOM kinds the answer reads, and
    ``view_generation()`` (hosts' liveness as seen here, which a pending VM's detail names);
    None if not cached."""

    def key_of(request, body: bytes):
        op = soap_operation(body)
        kinds = CACHED_READS.get(op)
        if kinds is None:
            return None
        p = principal_of(request)
        return (
            op,
            hashlib.sha256(body).digest(),
            p.name,
            p.role,
            tuple(dom.kind_generation(k) for k in kinds),
            view_generation(),
        )

    return key_of


def build_user_api(
    app: Application,
    mgr: ClusterManager,
    dom: Dom,
    host_id: str,
    complete_vector: Callable[[], dict[str, Any]],
    max_body_bytes: int,
):
    """The SOAP resource of the user API (see :func:`make_user_service` for the arguments)."""
    return build_soap_resource(
        [make_user_service(app, mgr, dom, host_id, complete_vector)],
        tns=TNS,
        name=SERVICE_NAME,
        max_body_bytes=max_body_bytes,
        cache=ResponseCache(read_cache_key(dom, lambda: mgr.view_generation())),
    )
