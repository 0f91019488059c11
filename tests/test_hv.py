"""The hypervisor layer against libvirt's real test driver, one node file per test."""

import threading

import libvirt
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from vmwebd.errors import HypervisorError, InvalidArgument, NoSuchDomain
from vmwebd.hv import DomainInfo, DomainSpec, HostFacts, open_driver, xmlgen
from vmwebd.hv.libvirt_driver import LibvirtDriver
from vmwebd.hv.testhost import write_test_host


class RecordingConnection:
    """Wraps a libvirt connection and records the thread of every method call on it."""

    def __init__(self, conn, threads):
        self._conn, self._threads = conn, threads

    def __getattr__(self, name):
        attr = getattr(self._conn, name)
        if not callable(attr):
            return attr

        def call(*args, **kw):
            self._threads.append(threading.current_thread())
            return attr(*args, **kw)

        return call


@pytest.fixture
def host_uri(tmp_path):
    return write_test_host(tmp_path / "host.xml", cpus=3, memory_mib=4096)


@pytest.fixture
def opened():
    """Connections the driver opened, so a test can look behind the interface."""
    return []


@pytest.fixture
def driver(host_uri, opened):
    def open_connection(uri):
        conn = libvirt.open(uri)
        opened.append(conn)
        return conn

    d = LibvirtDriver(
        host_uri, reactor=reactor, open_connection=open_connection, host_probe=lambda: (0.25, 1_000_000)
    )
    yield d
    pytest_twisted.blockon(d.close())


def spec(name="vmweb-c1-node0", **kw):
    fields = dict(
        vcpus=1,
        memory_mib=128,
        disk_path=f"/var/lib/vmweb/{name}.qcow2",
        network="vmweb-c1",
        mac="52:54:00:00:00:01",
    )
    fields.update(kw)
    return DomainSpec(name=name, **fields)


@pytest_twisted.inlineCallbacks
def test_domain_round_trip(driver):
    """A domain goes defined → running → shut off → running → destroyed → missing."""
    yield driver.define(spec(vcpus=2, memory_mib=256))
    info = yield driver.state("vmweb-c1-node0")
    assert info == DomainInfo("vmweb-c1-node0", "shutoff", 2, 256, info.cpu_time_ns)
    yield driver.start("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "running"
    listed = yield driver.list_domains()
    assert [(i.name, i.state) for i in listed] == [("vmweb-c1-node0", "running")]
    yield driver.shutdown("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "shutoff"
    yield driver.start("vmweb-c1-node0")
    yield driver.destroy("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "shutoff"
    yield driver.undefine("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")) == DomainInfo.missing("vmweb-c1-node0")
    assert (yield driver.list_domains()) == []


@pytest_twisted.inlineCallbacks
def test_lifecycle_operations_are_idempotent(driver):
    """Repeating define, start, shutdown, destroy and undefine succeeds and changes nothing more."""
    yield driver.define(spec())
    yield driver.define(spec(memory_mib=512))  # redefinition updates in place
    assert (yield driver.state("vmweb-c1-node0")).memory_mib == 512
    yield driver.start("vmweb-c1-node0")
    yield driver.start("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "running"
    yield driver.destroy("vmweb-c1-node0")
    yield driver.destroy("vmweb-c1-node0")
    yield driver.shutdown("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "shutoff"
    yield driver.undefine("vmweb-c1-node0")
    yield driver.undefine("vmweb-c1-node0")
    yield driver.destroy("vmweb-c1-node0")
    yield driver.shutdown("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "missing"


@pytest_twisted.inlineCallbacks
def test_undefine_of_running_domain_removes_it(driver):
    """Undefining a running domain leaves nothing behind (not a transient running domain)."""
    yield driver.define(spec())
    yield driver.start("vmweb-c1-node0")
    yield driver.undefine("vmweb-c1-node0")
    assert (yield driver.list_domains()) == []


@pytest_twisted.inlineCallbacks
def test_start_resumes_a_paused_domain(driver, opened):
    """Starting a paused domain resumes it, so 'start' means 'make it run'."""
    yield driver.define(spec())
    yield driver.start("vmweb-c1-node0")
    opened[0].lookupByName("vmweb-c1-node0").suspend()
    assert (yield driver.state("vmweb-c1-node0")).state == "paused"
    yield driver.start("vmweb-c1-node0")
    assert (yield driver.state("vmweb-c1-node0")).state == "running"


@pytest_twisted.inlineCallbacks
def test_domain_xml_and_metadata_round_trip(driver, opened):
    """The defined domain is type qemu with our disk, NIC and metadata, escaped intact."""
    meta = {"cluster": "c1", "odd": "<a href='x'>&amp;</a>"}
    yield driver.define(
        spec(
            ip="10.1.0.5",
            kernel="/boot/vmlinuz",
            initrd="/boot/initrd",
            cmdline="console=ttyS0 guestip=10.1.0.5 x=<&>",
            serial_log="/tmp/vmweb-serial.log",
            metadata=meta,
        )
    )
    assert (yield driver.get_metadata("vmweb-c1-node0")) == {**meta, "ip": "10.1.0.5"}
    xml = opened[0].lookupByName("vmweb-c1-node0").XMLDesc(0)
    assert "type='qemu'" in xml
    assert "<mac address='52:54:00:00:00:01'/>" in xml
    assert "<source network='vmweb-c1'/>" in xml
    assert "<source file='/var/lib/vmweb/vmweb-c1-node0.qcow2'/>" in xml
    assert "<cmdline>console=ttyS0 guestip=10.1.0.5 x=&lt;&amp;&gt;</cmdline>" in xml
    # The serial port is a pty (a console can be opened on it) logged to the file asked.
    assert "<serial type='pty'>" in xml and "<log file='/tmp/vmweb-serial.log' append='on'/>" in xml


@pytest_twisted.inlineCallbacks
def test_metadata_of_domain_defined_elsewhere_is_empty(driver, opened):
    """A domain defined without our metadata reports an empty dict, not an error."""
    opened_conn = yield driver.list_domains()  # opens the connection
    assert opened_conn == []
    opened[0].defineXML(
        "<domain type='test'><name>foreign</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    )
    assert (yield driver.get_metadata("foreign")) == {}


@pytest_twisted.inlineCallbacks
def test_stats_report_counters(driver):
    """stats() reports state, vCPUs, memory and a CPU time counter of a running domain."""
    yield driver.define(spec(vcpus=2, memory_mib=256))
    yield driver.start("vmweb-c1-node0")
    stats = yield driver.stats("vmweb-c1-node0")
    assert stats["state"] == "running"
    assert stats["vcpus"] == 2
    assert stats["memory_mib"] == 256
    assert isinstance(stats["cpu_time_ns"], int)


@pytest_twisted.inlineCallbacks
def test_pool_base_and_overlay(driver, opened):
    """A dir pool holds a base volume and a qcow2 overlay whose XML names the base as backing."""
    yield driver.ensure_pool("vmweb", "/var/lib/vmweb/images")
    yield driver.ensure_pool("vmweb", "/var/lib/vmweb/images")
    base = yield driver.create_base_volume("vmweb", "base-abc.qcow2", 1024)
    assert base == "/var/lib/vmweb/images/base-abc.qcow2"
    assert (yield driver.create_base_volume("vmweb", "base-abc.qcow2", 1024)) == base
    overlay = yield driver.create_overlay("vmweb", "node0.qcow2", base, 1024)
    assert overlay == "/var/lib/vmweb/images/node0.qcow2"
    assert (yield driver.create_overlay("vmweb", "node0.qcow2", base, 1024)) == overlay
    pool = opened[0].storagePoolLookupByName("vmweb")
    assert pool.isActive() and pool.autostart()
    vol_xml = pool.storageVolLookupByName("node0.qcow2").XMLDesc(0)
    assert xmlgen.volume_backing_path(vol_xml) == base
    assert "<format type='qcow2'/>" in vol_xml
    assert (yield driver.list_volumes("vmweb")) == ["base-abc.qcow2", "node0.qcow2"]
    yield driver.delete_volume("vmweb", "node0.qcow2")
    yield driver.delete_volume("vmweb", "node0.qcow2")
    yield driver.delete_volume("no-such-pool", "node0.qcow2")
    assert (yield driver.list_volumes("vmweb")) == ["base-abc.qcow2"]


@pytest_twisted.inlineCallbacks
def test_overlay_with_other_backing_is_refused(driver):
    """An existing overlay on a different base is an error naming the volume, not a silent reuse."""
    yield driver.ensure_pool("vmweb", "/images")
    a = yield driver.create_base_volume("vmweb", "a.qcow2", 64)
    b = yield driver.create_base_volume("vmweb", "b.qcow2", 64)
    yield driver.create_overlay("vmweb", "o.qcow2", a, 64)
    with pytest.raises(HypervisorError, match=r"volume 'o.qcow2' in pool 'vmweb'.*b.qcow2"):
        yield driver.create_overlay("vmweb", "o.qcow2", b, 64)


@pytest_twisted.inlineCallbacks
def test_pool_at_other_path_is_refused(driver):
    """ensure_pool of an existing pool at a different path fails naming both paths."""
    yield driver.ensure_pool("vmweb", "/images")
    with pytest.raises(HypervisorError, match=r"pool 'vmweb'.*'/images'.*'/elsewhere'"):
        yield driver.ensure_pool("vmweb", "/elsewhere")


@pytest_twisted.inlineCallbacks
def test_missing_pool_error_names_it(driver):
    """Listing the volumes of an unknown pool fails with a HypervisorError naming the pool."""
    with pytest.raises(HypervisorError, match=r"list volumes of pool 'nope' on test:///"):
        yield driver.list_volumes("nope")


@pytest_twisted.inlineCallbacks
def test_network_define_and_destroy(driver, opened):
    """An isolated network is defined and started once, and destroyed idempotently."""
    yield driver.define_network("vmweb-c1", "vmbr-c1")
    yield driver.define_network("vmweb-c1", "vmbr-c1")
    assert (yield driver.list_networks()) == ["vmweb-c1"]
    net = opened[0].networkLookupByName("vmweb-c1")
    assert net.isActive()
    assert "<forward" not in net.XMLDesc(0)
    assert xmlgen.network_bridge(net.XMLDesc(0)) == "vmbr-c1"
    with pytest.raises(HypervisorError, match=r"network 'vmweb-c1'.*'vmbr-c1'.*'other'"):
        yield driver.define_network("vmweb-c1", "other")
    yield driver.destroy_network("vmweb-c1")
    yield driver.destroy_network("vmweb-c1")
    assert (yield driver.list_networks()) == []


@pytest_twisted.inlineCallbacks
def test_host_facts_match_node_file(driver):
    """host_facts reports the node file's CPUs and memory, and free memory shrinks as VMs run."""
    facts = yield driver.host_facts()
    assert facts == HostFacts(
        cpus=3, memory_mib=4096, free_memory_mib=4096, load1=0.25, hostname=facts.hostname
    )
    yield driver.define(spec(memory_mib=1024))
    yield driver.start("vmweb-c1-node0")
    assert (yield driver.host_facts()).free_memory_mib == 3072


@pytest_twisted.inlineCallbacks
def test_hosts_are_independent(tmp_path):
    """Two node files are two hypervisors: a domain defined on one is missing on the other."""
    a = LibvirtDriver(write_test_host(tmp_path / "a.xml", 1, 1024), reactor=reactor)
    b = LibvirtDriver(write_test_host(tmp_path / "b.xml", 2, 2048), reactor=reactor)
    try:
        yield a.define(spec())
        assert (yield a.state("vmweb-c1-node0")).state == "shutoff"
        assert (yield b.state("vmweb-c1-node0")).state == "missing"
        assert (yield b.host_facts()).cpus == 2
    finally:
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_start_of_undefined_domain_is_no_such_domain(driver, host_uri):
    """Starting an undefined domain fails with NoSuchDomain naming the operation, domain and URI."""
    with pytest.raises(NoSuchDomain) as err:
        yield driver.start("vmweb-c9-node7")
    assert str(err.value).startswith(f"start domain 'vmweb-c9-node7' on {host_uri}: ")
    with pytest.raises(NoSuchDomain, match="vmweb-c9-node7"):
        yield driver.stats("vmweb-c9-node7")


@pytest_twisted.inlineCallbacks
def test_bad_uri_is_hypervisor_error_naming_it(tmp_path):
    """A URI that cannot be opened fails each call with a HypervisorError naming the URI."""
    uri = f"test://{tmp_path}/no-such-host.xml"
    d = LibvirtDriver(uri, reactor=reactor)
    try:
        with pytest.raises(HypervisorError, match=f"open connection to {uri}: "):
            yield d.host_facts()
    finally:
        yield d.close()


@pytest_twisted.inlineCallbacks
def test_blocking_calls_run_off_the_reactor_thread(host_uri):
    """Opening the connection and every call on it happen on the pool thread, not the reactor's."""
    reactor_thread = threading.current_thread()
    threads = []

    def open_connection(uri):
        threads.append(threading.current_thread())
        return RecordingConnection(libvirt.open(uri), threads)

    d = LibvirtDriver(host_uri, reactor=reactor, open_connection=open_connection)
    try:
        yield d.define(spec())
        yield d.start("vmweb-c1-node0")
        yield d.list_domains()
        yield d.host_facts()
    finally:
        yield d.close()
    assert len(threads) >= 5
    assert reactor_thread not in threads
    assert len(set(threads)) == 1  # one thread: calls are serialised on one connection


@pytest_twisted.inlineCallbacks
def test_closed_driver_refuses_calls_and_leaves_injected_pool_running(host_uri):
    """After close() calls fail with HypervisorError; an injected thread pool is not stopped."""
    pool = ThreadPool(minthreads=1, maxthreads=1, name="test-hv")
    pool.start()
    try:
        d = LibvirtDriver(host_uri, reactor=reactor, threadpool=pool)
        yield d.list_domains()
        yield d.close()
        yield d.close()
        with pytest.raises(HypervisorError, match="driver is closed"):
            yield d.list_domains()
        assert pool.started
    finally:
        pool.stop()


@pytest_twisted.inlineCallbacks
def test_open_driver_picks_libvirt_with_test_capabilities(host_uri):
    """open_driver gives a LibvirtDriver; a test:/// host claims no live migration."""
    d = open_driver(host_uri, reactor=reactor)
    try:
        assert isinstance(d, LibvirtDriver)
        assert d.supports_live_migration is False
        assert d.runs_guests is False
        qemu = LibvirtDriver("qemu:///system", reactor=reactor)  # connects lazily: never here
        assert qemu.supports_live_migration is True
        yield qemu.close()
    finally:
        yield d.close()


def test_domain_spec_validates_fields():
    """A DomainSpec with a bad MAC or no vCPUs is refused with the field named."""
    with pytest.raises(InvalidArgument, match="^mac: "):
        spec(mac="52:54:00:00:00")
    with pytest.raises(InvalidArgument, match="^vcpus: "):
        spec(vcpus=0)
