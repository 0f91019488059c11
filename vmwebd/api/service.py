"""The user SOAP API (``urn:vmweb:api:1``): the contract other programs and the CLI rely on.

Operation names and arguments are fixed by the design (append only; never rename). Each
operation delegates to the :class:`~vmwebd.cluster.ClusterManager`; errors are VmwebErrors,
which the SOAP stack turns into faults with specific faultcodes.
"""
from __future__ import annotations

from spyne import Array, Boolean, ComplexModel, Float, Integer, Service, Unicode, rpc
from twisted.internet import defer

from vmwebd.api import compat

compat.apply()

from vmwebd.api.soap import build_soap_resource  # noqa: E402
from vmwebd.errors import InvalidArgument  # noqa: E402
from vmwebd.settings import SETTINGS, all_settings, checked_setting  # noqa: E402
from vmwebd.templates import min_count  # noqa: E402

TNS = "urn:vmweb:api:1"
SERVICE_NAME = "VmwebApi"


class RoleInfo(ComplexModel):
    __namespace__ = TNS
    name = Unicode
    count = Unicode          # a number, or "rest"
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


class SettingInfo(ComplexModel):
    __namespace__ = TNS
    key = Unicode
    value = Unicode
    description = Unicode


def template_info(t) -> TemplateInfo:
    return TemplateInfo(
        name=t.name, description=t.description, min_count=min_count(t), pool=t.network.pool,
        network_mode=t.network.mode,
        roles=[RoleInfo(name=r.name, count="rest" if r.is_rest else str(r.count), vcpus=r.vcpus,
                        memory_mib=r.memory_mib, image=r.image) for r in t.roles])


def cluster_info(c) -> ClusterInfo:
    return ClusterInfo(name=c.name, owner=c.owner, template=c.template, count=c.count,
                       state=c.state, vni=c.vni, network=c.network, bridge=c.bridge,
                       vms=[VmInfo(**vars(v)) for v in c.vms])


def _required(value, field):
    if value is None or value == "":
        raise InvalidArgument(field, "is required")
    return value


def make_user_service(node) -> type[Service]:
    """The user API bound to one daemon's ``node`` (manager, DOM)."""
    mgr = node.manager

    class VmwebApi(Service):
        @rpc(_returns=Array(TemplateInfo))
        def ListTemplates(ctx):
            return [template_info(t) for _, t in sorted(mgr.templates().items())]

        @rpc(Unicode, Unicode, Unicode, Integer, _returns=ClusterInfo)
        def CreateCluster(ctx, name, template, owner, count):
            _required(name, "name"), _required(template, "template"), _required(owner, "owner")
            _required(count, "count")
            return mgr.create(name, template, owner, count).addCallback(cluster_info)

        @rpc(Unicode, Integer, _returns=ClusterInfo)
        def ScaleCluster(ctx, name, count):
            _required(name, "name"), _required(count, "count")
            return mgr.scale(name, count).addCallback(cluster_info)

        @rpc(Unicode, _returns=Unicode)
        def DestroyCluster(ctx, name):
            _required(name, "name")
            return mgr.destroy(name).addCallback(lambda done: "destroyed" if done else "destroying")

        @rpc(Unicode, _returns=ClusterInfo)
        def GetCluster(ctx, name):
            _required(name, "name")
            return cluster_info(mgr.cluster(name))

        @rpc(Unicode, _returns=Array(ClusterInfo))
        def ListClusters(ctx, owner):
            return [cluster_info(c) for c in mgr.clusters(owner or None)]

        @rpc(Unicode, Unicode, _returns=VmInfo)
        def StartVm(ctx, cluster, vm):
            _required(cluster, "cluster"), _required(vm, "vm")
            return mgr.set_vm_power(cluster, vm, "running").addCallback(lambda v: VmInfo(**vars(v)))

        @rpc(Unicode, Unicode, _returns=VmInfo)
        def StopVm(ctx, cluster, vm):
            _required(cluster, "cluster"), _required(vm, "vm")
            return mgr.set_vm_power(cluster, vm, "stopped").addCallback(lambda v: VmInfo(**vars(v)))

        @rpc(_returns=Array(HostInfo))
        def ListHosts(ctx):
            return [HostInfo(**vars(h)) for h in mgr.hosts()]

        @rpc(_returns=Unicode)
        def GetDom(ctx):
            return node.domsvc.dom.to_xml().decode("utf-8")

        @rpc(_returns=Array(SettingInfo))
        def GetSettings(ctx):
            return [SettingInfo(key=k, value=v, description=SETTINGS[k].description)
                    for k, v in all_settings(node.domsvc.dom).items()]

        @rpc(Unicode, Unicode, _returns=SettingInfo)
        def SetSetting(ctx, key, value):
            _required(key, "key")
            rec = checked_setting(key, value if value is not None else "")

            @defer.inlineCallbacks
            def write():
                yield node.domsvc.put(rec)
                return SettingInfo(key=rec.id, value=rec.value, description=SETTINGS[rec.id].description)
            return write()

        @rpc(Unicode, _returns=Array(Unicode))
        def AddHost(ctx, host):
            """Makes a host a consensus member (one host at a time, decided by the members)."""
            _required(host, "host")
            from vmwebd.gossip.pki import check_host_id
            try:
                check_host_id(host)
            except Exception:
                raise InvalidArgument("host", f"{host!r} is not a host id") from None
            return node.leases.change_members(add=host).addCallback(list)

        @rpc(Unicode, _returns=Array(Unicode))
        def RemoveHost(ctx, host):
            """Removes a host from the consensus members (one host at a time)."""
            _required(host, "host")
            return node.leases.change_members(remove=host).addCallback(list)

    return VmwebApi


def build_user_api(node, max_body_bytes: int):
    return build_soap_resource([make_user_service(node)], tns=TNS, name=SERVICE_NAME,
                               max_body_bytes=max_body_bytes)
