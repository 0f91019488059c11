"""Names of vmweb's libvirt objects and the domain XML rewritten for a migration's destination
(vmwebd/hv/naming.py, vmwebd/hv/xmlrewrite.py: text in, text out)."""

from lxml import etree

from vmwebd.hv.naming import PREFIX, domain_name, network_name, seed_name, volume_name
from vmwebd.hv.xmlrewrite import retarget_xml

DOMAIN = """<domain type='qemu'><name>vmweb-lab-n1</name><devices>
  <disk type='file' device='disk'><source file='/src/vmweb-lab-n1.qcow2'/></disk>
  <disk type='file' device='disk'><source file='/src/scratch.qcow2'/></disk>
  <disk type='file' device='cdrom'><source file='/src/vmweb-lab-n1.seed.iso'/></disk>
  <serial type='file'><source path='/src/console.log'/></serial>
  <console type='file'><source path='/src/console.log'/></console>
  <console type='pty'/>
</devices></domain>"""
PTY_DOMAIN = """<domain type='qemu'><name>vmweb-lab-n1</name><devices>
  <serial type='pty'><log file='/src/console.log' append='on'/><target port='0'/></serial>
  <console type='pty'><target type='serial' port='0'/></console>
</devices></domain>"""


def _sources(xml):
    root = etree.fromstring(xml.encode())
    return (
        [d.find("source").get("file") for d in root.iterfind("devices/disk")],
        [
            s.find("source").get("path")
            for s in root.iterfind("devices/*")
            if s.tag in ("serial", "console") and s.find("source") is not None
        ],
    )


def test_names_of_a_vms_libvirt_objects():
    """A VM's domain, overlay and seed, and a cluster's old network, carry the vmweb prefix."""
    assert domain_name("lab/n1") == "vmweb-lab-n1" and domain_name("lab/n1").startswith(PREFIX)
    assert volume_name("lab/n1") == "vmweb-lab-n1.qcow2"
    assert seed_name("lab/n1") == "vmweb-lab-n1.seed.iso"
    assert network_name("lab") == "vmweb-lab"


def test_the_destinations_paths_replace_the_first_disk_the_seed_and_the_file_consoles():
    """The first file disk gets the destination's overlay (other disks stay), the CD-ROM its
    seed, file serial and console devices its log."""
    disks, logs = _sources(retarget_xml(DOMAIN, "/dst/o.qcow2", "/dst/c.log", "/dst/s.iso"))
    assert disks == ["/dst/o.qcow2", "/src/scratch.qcow2", "/dst/s.iso"]
    assert logs == ["/dst/c.log", "/dst/c.log"]


def test_paths_the_destination_did_not_choose_stay():
    """Empty disk, console and seed paths leave the domain's own."""
    assert _sources(retarget_xml(DOMAIN, "", "", "")) == _sources(DOMAIN)


def test_a_pty_serial_ports_log_follows_to_the_destination():
    """A serial port on a pty keeps its type and target; its log file is the destination's."""
    root = etree.fromstring(retarget_xml(PTY_DOMAIN, "", "/dst/c.log").encode())
    serial = root.find("devices/serial")
    assert serial.get("type") == "pty" and serial.find("log").get("file") == "/dst/c.log"
    assert serial.find("log").get("append") == "on" and serial.find("target").get("port") == "0"
    assert root.find("devices/console").get("type") == "pty"
