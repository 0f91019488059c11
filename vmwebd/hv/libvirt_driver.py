"""The libvirt driver: any libvirt URI behind the ``Driver`` interface.

Threading: libvirt calls block (a remote URI waits on a socket, a real pool walks a directory),
so every call runs on a ThreadPool of exactly one thread owned by this driver. One thread also
means the connection is only ever used from that thread and calls run in the order they were
made. The reactor thread only schedules work and receives results.

Errors: ``libvirtError`` never leaves this module. ``VIR_ERR_NO_DOMAIN`` becomes ``NoSuchDomain``,
everything else ``HypervisorError``; both messages name the operation, the object and the URI.
"""

from __future__ import annotations

import time
from typing import Callable

import libvirt
import psutil
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from vmwebd.errors import HypervisorError, NoSuchDomain
from vmwebd.hv import perms, xmlgen
from vmwebd.hv.driver import ConsoleStream, DomainInfo, DomainSpec, Driver, HostFacts, MigrationStats


def _ignore_libvirt_error(_ctx, _err):
    """Errors reach us as exceptions; libvirt's default handler would also print them."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "other",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",  # waiting on a resource, still running
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # being shut down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "other",
}

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


def probe_local_host() -> tuple[float, int]:
    """The 1-minute load average and available memory in MiB of the machine we run on."""
    return psutil.getloadavg()[0], psutil.virtual_memory().available // (1024 * 1024)


def _code(err: libvirt.libvirtError) -> int:
    return err.get_error_code()


def _domain_info(dom) -> DomainInfo:
    state, max_kib, _mem_kib, vcpus, cpu_time = dom.info()
    return DomainInfo(
        name=dom.name(),
        state=_STATES.get(state, "other"),
        vcpus=vcpus,
        memory_mib=max_kib // 1024,
        cpu_time_ns=cpu_time,
    )


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


class LibvirtDriver(Driver):
    """A host reached through libvirt ``uri`` (``test:///ABS/host.xml``, ``qemu:///system``, ...).

    ``threadpool``: inject one (size 1) to share its lifetime with a service; otherwise the
    driver makes and starts its own and stops it in ``close()`` or at reactor shutdown.
    ``open_connection``: the connection factory, called on the pool thread (tests wrap it).
    ``host_probe``: returns (load1, available MiB) of the local machine for ``host_facts``.
    """

    log = Logger()

    def __init__(
        self,
        uri: str,
        reactor=None,
        threadpool: ThreadPool | None = None,
        open_connection: Callable[[str], object] = libvirt.open,
        host_probe: Callable[[], tuple[float, int]] = probe_local_host,
    ):
        if reactor is None:
            from twisted.internet import reactor  # only when the caller gave none
        self.uri = uri
        self._reactor = reactor
        self._open_connection = open_connection
        self._host_probe = host_probe
        self._conn = None
        self._closed = False
        # Capabilities depend on the URI, so they are set per instance (shadowing the defaults
        # of Driver): the test driver has no migration API, no disk files and no real guests.
        scheme = _scheme(uri)
        self.supports_live_migration = scheme == "qemu"
        self.volumes_on_disk = scheme != "test"
        self.runs_guests = scheme != "test"
        self._own_pool = threadpool is None
        self._shutdown_trigger = None
        if threadpool is None:
            threadpool = ThreadPool(minthreads=1, maxthreads=1, name=f"hv {uri}")
            threadpool.start()
            self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", threadpool.stop)
        self._pool = threadpool

    def __repr__(self) -> str:
        return f"<LibvirtDriver {self.uri}>"

    # -- plumbing --------------------------------------------------------------------------
    def _run(self, op: str, obj: str, fn, *args) -> Deferred:
        """Run ``fn(conn, *args)`` on the pool thread; map libvirt errors for ``op obj``."""
        if self._closed:
            return fail(HypervisorError(f"{op} {obj} on {self.uri}: driver is closed"))
        return deferToThreadPool(self._reactor, self._pool, self._call, op, obj, fn, *args)

    def _call(self, op, obj, fn, *args):  # pool thread
        conn = self._connection()
        try:
            return fn(conn, *args)
        except libvirt.libvirtError as e:
            raise self._error(op, obj, e) from e

    def _error(self, op: str, obj: str, e: libvirt.libvirtError) -> HypervisorError:
        message = f"{op} {obj} on {self.uri}: {e.get_error_message() or e}"
        if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
            return NoSuchDomain(message)
        return HypervisorError(message)

    def _connection(self):  # pool thread
        if self._conn is not None:
            try:
                alive = self._conn.isAlive()
            except libvirt.libvirtError:
                alive = False
            if alive:
                return self._conn
            # A remote daemon went away: drop the dead handle and reconnect once per call.
            self.log.warn("libvirt connection to {uri} lost, reconnecting", uri=self.uri)
            self._close_connection()
        try:
            self._conn = self._open_connection(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"open connection to {self.uri}: {e.get_error_message() or e}") from e
        if self._conn is None:  # very old bindings return None instead of raising
            raise HypervisorError(f"open connection to {self.uri}: libvirt returned no connection")
        return self._conn

    def _close_connection(self):  # pool thread
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass  # closing a dead connection: nothing left to release

    def close(self) -> Deferred:
        if self._closed:
            return succeed(None)
        self._closed = True
        # Queued behind every call already scheduled: they finish before the connection goes.
        d = deferToThreadPool(self._reactor, self._pool, self._close_connection)

        def stop_pool(result):
            if self._own_pool:
                if self._shutdown_trigger is not None:
                    self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._pool.stop()
            return result

        return d.addBoth(stop_pool)

    # -- domains ---------------------------------------------------------------------------
    @staticmethod
    def _find_domain(conn, name):
        """The domain named ``name``, or None when it is not defined."""
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def define(self, spec: DomainSpec) -> Deferred:
        xml = xmlgen.domain_xml(spec)

        def define(conn):
            conn.defineXML(xml)
            self.log.debug("domain {name} defined on {uri}", name=spec.name, uri=self.uri)

        return self._run("define", f"domain {spec.name!r}", define)

    def start(self, name: str) -> Deferred:
        def start(conn):
            dom = conn.lookupByName(name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
                return
            if dom.isActive():
                return
            try:
                dom.create()
            except libvirt.libvirtError:
                if dom.isActive():  # started by someone else meanwhile: what we wanted
                    return
                raise

        return self._run("start", f"domain {name!r}", start)

    def _stop(self, op: str, name: str, how: str) -> Deferred:
        def stop(conn):
            dom = self._find_domain(conn, name)
            if dom is None or not dom.isActive():
                return
            try:
                getattr(dom, how)()
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN or not dom.isActive():
                    return  # it stopped (or went) between our check and our call
                if how == "shutdown" and dom.state()[0] == libvirt.VIR_DOMAIN_SHUTDOWN:
                    return  # asked again while its guest is shutting down already
                raise

        return self._run(op, f"domain {name!r}", stop)

    def shutdown(self, name: str) -> Deferred:
        # virDomainShutdown without flags: the hypervisor's default way (QEMU: the ACPI power
        # button, or the guest agent if the domain has one). It returns once the request is
        # made; the guest decides when (and whether) it powers off. The test driver powers off
        # at once, or starts the domain again when its <on_poweroff> says restart.
        return self._stop("shut down", name, "shutdown")

    def destroy(self, name: str) -> Deferred:
        return self._stop("destroy", name, "destroy")

    def undefine(self, name: str) -> Deferred:
        def undefine(conn):
            dom = self._find_domain(conn, name)
            if dom is None:
                return
            try:
                if dom.isActive():
                    # Undefining a running domain would leave it running as a transient one.
                    dom.destroy()
                if not dom.isPersistent():
                    return  # a transient domain vanished with destroy
                try:
                    dom.undefineFlags(_UNDEFINE_FLAGS)
                except libvirt.libvirtError as e:
                    # The test driver (and old daemons) refuse the NVRAM flag.
                    if _code(e) not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                        raise
                    dom.undefineFlags(_UNDEFINE_FLAGS & ~libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                raise

        return self._run("undefine", f"domain {name!r}", undefine)

    def list_domains(self) -> Deferred:
        def list_domains(conn):
            infos = []
            for dom in conn.listAllDomains(0):
                try:
                    infos.append(_domain_info(dom))
                except libvirt.libvirtError as e:
                    if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # else: undefined between listing and asking; not there
            return sorted(infos, key=lambda i: i.name)

        return self._run("list", "domains", list_domains)

    def state(self, name: str) -> Deferred:
        def state(conn):
            dom = self._find_domain(conn, name)
            if dom is None:
                return DomainInfo.missing(name)
            try:
                return _domain_info(dom)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                    return DomainInfo.missing(name)
                raise

        return self._run("get state of", f"domain {name!r}", state)

    def stats(self, name: str) -> Deferred:
        def stats(conn):
            dom = conn.lookupByName(name)
            state, max_kib, mem_kib, vcpus, cpu_time = dom.info()
            out = {
                "state": _STATES.get(state, "other"),
                "vcpus": vcpus,
                "cpu_time_ns": cpu_time,
                "memory_mib": mem_kib // 1024,
                "max_memory_mib": max_kib // 1024,
            }
            if dom.isActive():
                try:
                    mem = dom.memoryStats()
                except libvirt.libvirtError:
                    mem = {}  # not every driver/guest reports memory stats
                if "rss" in mem:
                    out["rss_mib"] = mem["rss"] // 1024
            return out

        return self._run("get stats of", f"domain {name!r}", stats)

    def get_metadata(self, name: str) -> Deferred:
        def get_metadata(conn):
            dom = conn.lookupByName(name)
            try:
                xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xmlgen.METADATA_NS, 0)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return {}
                raise
            return xmlgen.parse_metadata(xml)

        return self._run("get metadata of", f"domain {name!r}", get_metadata)

    # -- console ---------------------------------------------------------------------------
    def open_console(self, name: str) -> Deferred:
        """A :class:`LibvirtConsole` on running domain ``name``'s serial console, on a connection
        of its own: its reads block for as long as the console stays open, and this driver's one
        thread must stay free for everything else. Opened on the reactor's thread pool.
        ``VIR_DOMAIN_CONSOLE_FORCE``: a session left open (a console closed a moment ago whose
        stream the daemon has not freed yet, or a ``virsh console``) is taken over."""
        if self._closed:
            return fail(
                HypervisorError(f"open the console of domain {name!r} on {self.uri}: driver is closed")
            )
        if not self.runs_guests:
            return fail(
                HypervisorError(
                    f"open the console of domain {name!r} on {self.uri}: libvirt's "
                    f"test driver has no consoles (its guests do not run)"
                )
            )
        uri, opener = self.uri, self._open_connection

        def open_console():  # a pool thread
            try:
                conn = opener(uri)
            except libvirt.libvirtError as e:
                raise HypervisorError(f"open connection to {uri}: {e.get_error_message() or e}") from e
            try:
                dom = conn.lookupByName(name)
                if not dom.isActive():
                    raise HypervisorError(f"open the console of domain {name!r} on {uri}: it is not running")
                stream = conn.newStream(0)
                dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            except libvirt.libvirtError as e:
                conn.close()
                raise self._error("open the console of", f"domain {name!r}", e) from e
            except BaseException:
                conn.close()
                raise
            return LibvirtConsole(conn, stream, f"domain {name!r} on {uri}")

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), open_console)

    # -- storage ---------------------------------------------------------------------------
    def ensure_pool(self, name: str, path: str) -> Deferred:
        def ensure_pool(conn):
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise
                pool = conn.storagePoolDefineXML(xmlgen.dir_pool_xml(name, path), 0)
                pool.build(0)  # mkdir for a dir pool
            else:
                have = xmlgen.pool_path(pool.XMLDesc(0))
                if have != path:
                    raise HypervisorError(
                        f"ensure pool {name!r} on {self.uri}: it exists at {have!r}, not at {path!r}"
                    )
            if not pool.isActive():
                pool.create(0)
            else:
                pool.refresh(0)  # see images copied in by other means (migration)
            if not pool.autostart():
                pool.setAutostart(1)

        return self._run("ensure", f"pool {name!r}", ensure_pool)

    def qemu_account(self) -> Deferred:
        """Fires with the :class:`perms.QemuAccount` this libvirt runs QEMU domains as (from its
        capabilities: the DAC model's base label), or None when it needs no file permissions
        from us (QEMU as root, no DAC model, or a driver keeping volumes in memory)."""
        if not self.volumes_on_disk:
            return succeed(None)
        return self._run(
            "get QEMU account of",
            "host",
            lambda conn: perms.account_from_capabilities(conn.getCapabilities()),
        )

    @staticmethod
    def _find_volume(pool, name):
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    def _create_volume(self, op, pool_name, name, xml, backing_path):
        def create(conn):
            pool = conn.storagePoolLookupByName(pool_name)
            vol = self._find_volume(pool, name)
            if vol is None:
                try:
                    vol = pool.createXML(xml, 0)
                except libvirt.libvirtError as e:
                    if _code(e) != libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                        raise
                    vol = pool.storageVolLookupByName(name)  # made meanwhile; check it below
                else:
                    return vol.path()
            have = xmlgen.volume_backing_path(vol.XMLDesc(0))
            if have != backing_path:
                raise HypervisorError(
                    f"{op} volume {name!r} in pool {pool_name!r} on {self.uri}: it exists "
                    f"with backing {have!r}, wanted {backing_path!r}"
                )
            return vol.path()

        return self._run(op, f"volume {name!r} in pool {pool_name!r}", create)

    def create_base_volume(self, pool: str, name: str, capacity_mib: int, fmt: str = "qcow2") -> Deferred:
        return self._create_volume(
            "create base", pool, name, xmlgen.volume_xml(name, capacity_mib, fmt), None
        )

    def create_overlay(
        self, pool: str, name: str, backing_path: str, capacity_mib: int, backing_format: str = "qcow2"
    ) -> Deferred:
        xml = xmlgen.volume_xml(
            name, capacity_mib, "qcow2", backing_path=backing_path, backing_fmt=backing_format
        )
        return self._create_volume("create overlay", pool, name, xml, backing_path)

    def delete_volume(self, pool: str, name: str) -> Deferred:
        def delete(conn):
            try:
                p = conn.storagePoolLookupByName(pool)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_STORAGE_POOL:
                    return  # no pool, so no volume: already what we want
                raise
            vol = self._find_volume(p, name)
            if vol is not None:
                vol.delete(0)

        return self._run("delete", f"volume {name!r} in pool {pool!r}", delete)

    def list_volumes(self, pool: str) -> Deferred:
        def list_volumes(conn):
            p = conn.storagePoolLookupByName(pool)
            if p.isActive():
                p.refresh(0)
            return sorted(p.listVolumes())

        return self._run("list volumes of", f"pool {pool!r}", list_volumes)

    # -- networks --------------------------------------------------------------------------
    def define_network(self, name: str, bridge: str) -> Deferred:
        def define_network(conn):
            try:
                net = conn.networkLookupByName(name)
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_NO_NETWORK:
                    raise
                net = conn.networkDefineXML(xmlgen.isolated_network_xml(name, bridge))
            else:
                have = xmlgen.network_bridge(net.XMLDesc(0))
                if have != bridge:
                    raise HypervisorError(
                        f"define network {name!r} on {self.uri}: it exists on bridge {have!r}, not {bridge!r}"
                    )
            if not net.isActive():
                net.create()
            if not net.autostart():
                net.setAutostart(1)

        return self._run("define", f"network {name!r}", define_network)

    def destroy_network(self, name: str) -> Deferred:
        def destroy_network(conn):
            try:
                net = conn.networkLookupByName(name)
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_NETWORK:
                    return
                raise
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()

        return self._run("destroy", f"network {name!r}", destroy_network)

    def list_networks(self) -> Deferred:
        return self._run("list", "networks", lambda conn: sorted(n.name() for n in conn.listAllNetworks(0)))

    # -- moving domains between hosts --------------------------------------------------------
    def volume_allocation(self, pool: str, name: str) -> Deferred:
        def allocation(conn):
            p = conn.storagePoolLookupByName(pool)
            vol = self._find_volume(p, name)
            return 0 if vol is None else vol.info()[2]

        return self._run("get allocation of", f"volume {name!r}", allocation)

    def domain_xml(self, name: str) -> Deferred:
        return self._run(
            "get XML of",
            f"domain {name!r}",
            lambda conn: conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
        )

    def job_running(self, name: str) -> Deferred:
        def running(conn):
            try:
                kind = conn.lookupByName(name).jobInfo()[0]
            except libvirt.libvirtError as e:
                if _code(e) == libvirt.VIR_ERR_NO_SUPPORT:
                    return False  # a driver without jobs (the test driver) runs none
                raise
            return kind != libvirt.VIR_DOMAIN_JOB_NONE

        return self._run("get the job of", f"domain {name!r}", running)

    def migrate_live(
        self, name: str, dest_uri: str, dest_xml: str | None, full_disk: bool = False
    ) -> Deferred:
        if not self.supports_live_migration:
            return fail(
                HypervisorError(
                    f"migrate domain {name!r} from {self.uri}: this driver "
                    "cannot migrate live (use a cold migration)"
                )
            )
        if self._closed:
            return fail(HypervisorError(f"migrate domain {name!r} on {self.uri}: driver is closed"))
        # Its own connection and thread: a migration takes seconds to minutes, and the host's
        # other calls (the reconciler, status) must not wait behind it.
        return deferToThread(self._migrate_blocking, name, dest_uri, dest_xml, full_disk)

    def _migrate_blocking(self, name, dest_uri, dest_xml, full_disk):  # a reactor pool thread
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | (libvirt.VIR_MIGRATE_NON_SHARED_DISK if full_disk else libvirt.VIR_MIGRATE_NON_SHARED_INC)
        )
        params = {libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"]}
        if dest_xml:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
        op = f"migrate domain {name!r} from {self.uri} to {dest_uri}"
        try:
            conn = self._open_connection(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"{op}: {e.get_error_message() or e}") from e
        try:
            dom = conn.lookupByName(name)
            started = time.monotonic()
            dom.migrateToURI3(dest_uri, params, flags)
            total_ms = int((time.monotonic() - started) * 1000)
            stats = self._completed_stats(dom, dest_uri, name)
            return MigrationStats(
                total_ms=int(stats.get("time_elapsed", total_ms)) or total_ms,
                downtime_ms=int(stats.get("downtime", 0)),
                memory_bytes=int(stats.get("memory_processed", stats.get("memory_total", 0))),
                disk_bytes=int(stats.get("disk_processed", 0)),
            )
        except libvirt.libvirtError as e:
            err = NoSuchDomain if _code(e) == libvirt.VIR_ERR_NO_DOMAIN else HypervisorError
            raise err(f"{op}: {e.get_error_message() or e}") from e
        finally:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def _completed_stats(self, dom, dest_uri, name) -> dict:
        """QEMU's own figures for the finished job: from the source's handle, else from the
        destination (the source domain may already be gone with UNDEFINE_SOURCE)."""
        try:
            return dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError:
            pass
        try:
            dconn = self._open_connection(dest_uri)
        except libvirt.libvirtError:
            return {}
        try:
            return dconn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError:
            return {}
        finally:
            dconn.close()

    def save(self, name: str, path: str) -> Deferred:
        def save(conn):
            dom = conn.lookupByName(name)
            if not dom.isActive():
                dom.create()  # a defined but stopped VM: save needs a running domain
            dom.save(path)

        return self._run("save", f"domain {name!r} to {path!r}", save)

    def restore(self, path: str, xml: str | None = None) -> Deferred:
        def restore(conn):
            if xml:
                conn.restoreFlags(path, xml, 0)
            else:
                conn.restore(path)

        return self._run("restore", f"domain from {path!r}", restore)

    # -- host ------------------------------------------------------------------------------
    def host_facts(self) -> Deferred:
        def host_facts(conn):
            _model, memory_mib, cpus, *_ = conn.getInfo()
            # A simulated host's memory is what its node file says, not this machine's: free
            # memory is the smaller of what its running domains leave and what is really free.
            used_kib = sum(
                dom.info()[1] for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            )
            load1, available_mib = self._host_probe()
            free = max(0, min(available_mib, memory_mib - used_kib // 1024))
            return HostFacts(
                cpus=cpus,
                memory_mib=memory_mib,
                free_memory_mib=free,
                load1=float(load1),
                hostname=conn.getHostname(),
            )

        return self._run("get facts of", "host", host_facts)


__all__ = ["LibvirtDriver", "probe_local_host"]


class LibvirtConsole(ConsoleStream):
    """A domain's console through a blocking ``virStream`` on a connection of its own (see
    :meth:`LibvirtDriver.open_console`); used from threads only."""

    def __init__(self, conn, stream, what: str):
        self._conn, self._stream, self.what = conn, stream, what
        self._interrupted = False

    def read(self, n: int) -> bytes:
        if self._interrupted:
            return b""
        try:
            data = self._stream.recv(n)
        except libvirt.libvirtError as e:
            if self._interrupted:
                return b""
            raise HypervisorError(f"read the console of {self.what}: {e.get_error_message() or e}") from e
        return data if isinstance(data, bytes) else b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._interrupted:
            try:
                sent = self._stream.send(bytes(view))
            except libvirt.libvirtError as e:
                raise HypervisorError(
                    f"write to the console of {self.what}: {e.get_error_message() or e}"
                ) from e
            if sent < 0:
                raise HypervisorError(f"write to the console of {self.what}: the stream refused it")
            view = view[sent:]

    def interrupt(self) -> None:
        self._interrupted = True
        try:
            self._stream.abort()
        except libvirt.libvirtError:
            pass  # ended already (the domain stopped): nothing left to wake

    def release(self) -> None:
        if not self._interrupted:
            self.interrupt()
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass
