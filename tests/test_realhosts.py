"""Real hosts, real guest, real live migration (the real-host tier; see tests/lab).

Two libvirtd hosts in network namespaces on this machine; a real TCG guest booted from a qcow2
overlay over a base image placed on both hosts; a live peer-to-peer migration that copies only the
overlay (NON_SHARED_INC) to an empty overlay pre-created at the destination. Checked: the domain
moved, the guest kept running (its serial tick counter goes on at the destination, no reboot), it
answers on its address at the destination, and what it wrote to its disk is at the destination.

Skipped only where the machine cannot run real hosts (not root, no network namespaces, no libvirtd
or QEMU, or VMWEB_REALHOSTS=0): see lab.hosts.lab_available.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time

import pytest

from lab import wait_for
from lab.fixtures import guest_artifacts, lab2  # noqa: F401  (fixtures)
from lab.guest import (
    PATTERN_BYTES,
    PATTERN_OFFSET,
    guest_domain_xml,
    make_base_image,
    pattern,
    read_serial,
    ticks,
)

libvirt = pytest.importorskip("libvirt")

BASE = "base.qcow2"
BASE_MIB = 128


def overlay_xml(name: str, backing: str, capacity_mib: int = BASE_MIB) -> str:
    """A qcow2 volume over ``backing`` (a path as the host sees it), for the storage-pool API."""
    return (
        f"<volume><name>{name}</name><capacity unit='MiB'>{capacity_mib}</capacity>"
        "<target><format type='qcow2'/><compat>1.1</compat></target>"
        f"<backingStore><path>{backing}</path><format type='qcow2'/></backingStore></volume>"
    )


def place_base(lab, hosts) -> str:
    """Puts one base image in the images pool of each of ``hosts``; returns its inner path."""
    src = lab.workdir / BASE
    if not src.exists():
        make_base_image(src, BASE_MIB)
    for h in hosts:
        shutil.copyfile(src, h.host_path(f"{h.images_dir}/{BASE}"))
        h.conn.storagePoolLookupByName("default").refresh(0)
    return f"{hosts[0].images_dir}/{BASE}"


def has_line(path, prefix):
    return any(line.startswith(prefix) for line in read_serial(path))


def test_live_migration_moves_overlay_and_guest_keeps_running(lab2, guest_artifacts, record_property):
    h1, h2 = lab2.hosts
    name = "mig-" + secrets.token_hex(3)
    token = secrets.token_hex(8)
    guest_ip = f"10.77.{lab2.k}.50"
    disk = f"{h1.images_dir}/{name}.qcow2"
    serial = f"/var/log/libvirt/qemu/{name}.serial.log"  # the same path is a different file per host
    src_log, dst_log = h1.host_path(serial), h2.host_path(serial)

    base = place_base(lab2, [h1, h2])
    for h in (h1, h2):  # h2's overlay is empty: the migration fills it
        vol = h.conn.storagePoolLookupByName("default").createXML(overlay_xml(f"{name}.qcow2", base), 0)
        assert vol.path() == disk

    xml = guest_domain_xml(
        name,
        guest_artifacts.kernel,
        guest_artifacts.initrd,
        disk,
        serial,
        bridge="br0",
        cmdline_extra=f"vmweb.token={token} guestip={guest_ip}/24",
    )
    t0 = time.monotonic()
    dom = h1.conn.defineXML(xml)
    dom.create()
    try:
        wait_for(lambda: has_line(src_log, f"VMWEB-GUEST-UP name={name}"), 90, "VMWEB-GUEST-UP at h1")
        boot_s = time.monotonic() - t0
        written = wait_for(
            lambda: [ln for ln in read_serial(src_log) if ln.startswith("VMWEB-DISK-")],
            60,
            "VMWEB-DISK-WRITTEN at h1",
        )
        assert written[0] == f"VMWEB-DISK-WRITTEN token={token} bytes={PATTERN_BYTES}"
        wait_for(lambda: max(ticks(read_serial(src_log)), default=0) >= 2, 30, "ticks at h1")

        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_NON_SHARED_INC
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        )
        t1 = time.monotonic()
        dom.migrateToURI3(h2.migrate_uri, {}, flags)
        migrate_s = time.monotonic() - t1

        # The domain lives at h2 only.
        d2 = h2.conn.lookupByName(name)
        assert d2.isActive()
        assert d2.isPersistent()
        with pytest.raises(libvirt.libvirtError):
            h1.conn.lookupByName(name)
        stats = d2.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        downtime_ms = stats.get("downtime")
        assert downtime_ms is not None and downtime_ms < 5000

        # The guest goes on: the ticks continue at h2 from where h1's stopped, no boot there.
        src_ticks = ticks(read_serial(src_log))
        last_src = max(src_ticks)
        wait_for(
            lambda: max(ticks(read_serial(dst_log)), default=0) >= last_src + 3,
            30,
            f"ticks past {last_src + 2} at h2",
        )
        dst_lines = read_serial(dst_log)
        dst_ticks = ticks(dst_lines)
        assert not any("VMWEB-GUEST-UP" in ln for ln in dst_lines), dst_lines[:5]
        assert dst_ticks[0] > last_src, (src_ticks[-3:], dst_ticks[:3])
        assert dst_ticks == list(range(dst_ticks[0], dst_ticks[0] + len(dst_ticks))), dst_ticks
        # ... and answers on its address from h2's network.
        wait_for(
            lambda: h2.run(["busybox", "ping", "-c", "1", "-W", "1", guest_ip], check=False).returncode == 0,
            20,
            f"ping reply from {guest_ip} at h2",
        )

        d2.destroy()
        # Incremental: the overlay at h2 still has the base under it and holds only the writes.
        info = json.loads(h2.run(["qemu-img", "info", "--output=json", disk]).stdout)
        assert info.get("backing-filename") == base
        assert info["actual-size"] < 32 * 1024 * 1024, info["actual-size"]
        # What the guest wrote at h1 is on h2's disk.
        out = f"{h2.images_dir}/{name}.check.raw"
        h2.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk, out])
        with open(h2.host_path(out), "rb") as f:
            f.seek(PATTERN_OFFSET)
            data = f.read(PATTERN_BYTES)
        assert len(data) == PATTERN_BYTES
        assert data == pattern(token), "the guest's 4 MiB pattern is not at 64 MiB on h2's disk"
        h2.host_path(out).unlink()
    finally:
        for h in (h1, h2):
            try:
                d = h.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if d.isActive():
                d.destroy()
            d.undefine()

    timings = {
        "lab_start_s": round(lab2.timings["start"], 2),
        "boot_to_marker_s": round(boot_s, 2),
        "migrate_call_s": round(migrate_s, 2),
        "downtime_ms": downtime_ms,
        "memory_bytes": stats.get("memory_processed"),
        "overlay_at_h2_bytes": info["actual-size"],
    }
    for k, v in timings.items():
        record_property(k, v)
    print("real-host migration:", timings)
