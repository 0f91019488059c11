"""Live migration between two real libvirt hosts: overlay-only vs full-disk copy.

One run, one 2-host lab (tests/lab: two libvirtd in network namespaces on this machine), one base
image of ``--base-mib`` MiB (default 256) filled with random bytes, and for every round a fresh
real TCG guest (128 MiB) booted at h1 from a qcow2 overlay over that base; the guest writes its
4 MiB pattern at 64 MiB, then is migrated live and peer-to-peer to h2 in one of two modes:

* **overlay** (``NON_SHARED_INC``): the base is pre-placed on both hosts and an empty overlay over
  it is pre-created at h2; only the overlay's clusters are copied;
* **full** (``NON_SHARED_DISK``): nothing is pre-created at h2 (libvirt creates the destination
  volume in h2's pool); the whole disk, base included, is copied and flattened.

The modes alternate (overlay, full, overlay, ...), ``--rounds`` of each (default 3). Per mode it
prints: the wall time of the ``migrateToURI3`` call, the bytes moved (QEMU's RAM bytes from
``jobStats(COMPLETED)`` ``memory_processed``, plus the disk bytes, measured as the growth of the
allocated size (``qemu-img info`` ``actual-size``) of the destination image, because ``jobStats``
reports ``disk_total = 0`` for the NBD copy), and the downtime QEMU reports. Then the ratios
full/overlay, as a markdown table. The destination disk of every round is checked for the pattern
(and, in full mode, for having no backing file), so the figures are of migrations that worked.

    .venv/bin/python bench/migrate.py [--rounds 3] [--base-mib 256]

Needs root, network namespaces, libvirtd and QEMU (``bash scripts/bootstrap.sh``); about 2 min.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import libvirt  # noqa: E402

from lab import wait_for  # noqa: E402
from lab.guest import (  # noqa: E402
    PATTERN_BYTES,
    PATTERN_OFFSET,
    build_guest,
    guest_domain_xml,
    make_base_image,
    pattern,
    read_serial,
    ticks,
)
from lab.hosts import Lab, lab_available  # noqa: E402

BASE = "base.qcow2"
COMMON = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)
MODES = {
    "overlay": COMMON | libvirt.VIR_MIGRATE_NON_SHARED_INC,
    "full": COMMON | libvirt.VIR_MIGRATE_NON_SHARED_DISK,
}


def overlay_xml(name: str, backing: str, capacity_mib: int) -> str:
    return (
        f"<volume><name>{name}</name><capacity unit='MiB'>{capacity_mib}</capacity>"
        "<target><format type='qcow2'/><compat>1.1</compat></target>"
        f"<backingStore><path>{backing}</path><format type='qcow2'/></backingStore></volume>"
    )


def qemu_info(host, path: str) -> dict:
    return json.loads(host.run(["qemu-img", "info", "--output=json", path]).stdout)


def pattern_at(host, path: str, token: str) -> bool:
    out = path + ".check.raw"
    host.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out])
    try:
        with open(host.host_path(out), "rb") as f:
            f.seek(PATTERN_OFFSET)
            return f.read(PATTERN_BYTES) == pattern(token)
    finally:
        host.host_path(out).unlink(missing_ok=True)


def one_round(lab: Lab, art, mode: str, base: str, base_mib: int, n: int) -> dict:
    h1, h2 = lab.hosts
    name = f"bench-{mode}-{n}"
    token = secrets.token_hex(8)
    disk = f"{h1.images_dir}/{name}.qcow2"
    serial = f"/var/log/libvirt/qemu/{name}.serial.log"
    pool1 = h1.conn.storagePoolLookupByName("default")
    pool2 = h2.conn.storagePoolLookupByName("default")
    pool1.createXML(overlay_xml(f"{name}.qcow2", base, base_mib), 0)
    before = 0
    if mode == "overlay":
        pool2.createXML(overlay_xml(f"{name}.qcow2", base, base_mib), 0)
        before = qemu_info(h2, disk)["actual-size"]
    xml = guest_domain_xml(
        name, art.kernel, art.initrd, disk, serial, bridge="br0", cmdline_extra=f"vmweb.token={token}"
    )
    t0 = time.monotonic()
    dom = h1.conn.defineXML(xml)
    dom.create()
    src_log = h1.host_path(serial)
    try:
        wait_for(
            lambda: (
                any(ln.startswith("VMWEB-DISK-WRITTEN") for ln in read_serial(src_log))
                and ticks(read_serial(src_log))
            ),
            120,
            f"{name}: disk pattern written at h1",
        )
        boot_s = time.monotonic() - t0
        t1 = time.monotonic()
        dom.migrateToURI3(h2.migrate_uri, {}, MODES[mode])
        call_s = time.monotonic() - t1
        d2 = h2.conn.lookupByName(name)
        stats = d2.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        last = max(ticks(read_serial(src_log)))
        wait_for(
            lambda: max(ticks(read_serial(h2.host_path(serial))), default=0) > last,
            30,
            f"{name}: ticks at h2",
        )
        d2.destroy()
        info = qemu_info(h2, disk)
        ok = pattern_at(h2, disk, token)
        if mode == "full":
            ok = ok and "backing-filename" not in info
        return {
            "mode": mode,
            "boot_s": boot_s,
            "call_s": call_s,
            "downtime_ms": stats["downtime"],
            "memory_bytes": stats.get("memory_processed", 0),
            "disk_bytes": info["actual-size"] - before,
            "disk_total_reported": stats.get("disk_total"),
            "ok": ok,
        }
    finally:
        for h in (h1, h2):
            try:
                d = h.conn.lookupByName(name)
                if d.isActive():
                    d.destroy()
                d.undefine()
            except libvirt.libvirtError:
                pass
            pool = h.conn.storagePoolLookupByName("default")
            pool.refresh(0)
            try:
                pool.storageVolLookupByName(f"{name}.qcow2").delete(0)
            except libvirt.libvirtError:
                pass
            h.host_path(serial).unlink(missing_ok=True)


def mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-mib", type=int, default=256)
    args = ap.parse_args(argv)
    ok, why = lab_available()
    if not ok:
        print(f"bench/migrate.py: skipped: {why}")
        return 0
    if args.base_mib < 72:
        ap.error("--base-mib must leave room for the pattern at 64 MiB (>= 72)")
    art = build_guest()
    with tempfile.TemporaryDirectory(prefix="vmwbench-") as tmp:
        tmp = Path(tmp)
        t = time.monotonic()
        make_base_image(tmp / BASE, args.base_mib, fill="random")
        base_s = time.monotonic() - t
        with Lab(2, tmp / "lab") as lab:
            base = f"{lab.hosts[0].images_dir}/{BASE}"
            for h in lab.hosts:
                shutil.copyfile(tmp / BASE, h.host_path(base))
                h.conn.storagePoolLookupByName("default").refresh(0)
            base_alloc = qemu_info(lab.hosts[0], base)["actual-size"]
            print(
                f"lab: 2 hosts up in {lab.timings['start']:.2f} s "
                f"(QEMU capabilities {'cached' if lab.timings['caps_cached'] else 'probed'}); "
                f"base image {args.base_mib} MiB random ({mib(base_alloc)} MiB allocated, "
                f"made in {base_s:.1f} s)"
            )
            results = []
            for n in range(args.rounds):
                for mode in ("overlay", "full"):
                    r = one_round(lab, art, mode, base, args.base_mib, n)
                    results.append(r)
                    print(
                        f"  {mode:7s} #{n + 1}: boot {r['boot_s']:.1f} s, migrate {r['call_s']:.2f} s, "
                        f"RAM {mib(r['memory_bytes'])} MiB, disk {mib(r['disk_bytes'])} MiB "
                        f"(jobStats disk_total {r['disk_total_reported']}), downtime "
                        f"{r['downtime_ms']} ms, pattern at h2: {'yes' if r['ok'] else 'NO'}"
                    )
    bad = [r for r in results if not r["ok"]]
    med = {}
    print()
    print(
        f"Live migration h1 -> h2, 128 MiB TCG guest, {args.base_mib} MiB random base, "
        f"{args.rounds} rounds each, alternating (median, min-max):"
    )
    print()
    print(
        "| mode | migrate call (s) | RAM moved (MiB) | disk moved (MiB) | total moved (MiB) | downtime (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for mode in ("overlay", "full"):
        rs = [r for r in results if r["mode"] == mode]
        cols = {
            "call_s": [r["call_s"] for r in rs],
            "mem": [r["memory_bytes"] for r in rs],
            "disk": [r["disk_bytes"] for r in rs],
            "total": [r["memory_bytes"] + r["disk_bytes"] for r in rs],
            "down": [r["downtime_ms"] for r in rs],
        }
        med[mode] = {k: statistics.median(v) for k, v in cols.items()}
        rng = lambda v, f: f"{f(statistics.median(v))} ({f(min(v))}-{f(max(v))})"  # noqa: E731
        label = "overlay only (NON_SHARED_INC)" if mode == "overlay" else "full disk (NON_SHARED_DISK)"
        print(
            f"| {label} | {rng(cols['call_s'], lambda x: f'{x:.2f}')} | "
            f"{rng(cols['mem'], mib)} | {rng(cols['disk'], mib)} | {rng(cols['total'], mib)} | "
            f"{rng(cols['down'], lambda x: f'{x:.0f}')} |"
        )
    o, f = med["overlay"], med["full"]
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
    print(
        f"| ratio full / overlay | {ratio(f['call_s'], o['call_s'])} | {ratio(f['mem'], o['mem'])} | "
        f"{ratio(f['disk'], o['disk'])} | {ratio(f['total'], o['total'])} | "
        f"{ratio(f['down'], o['down'])} |"
    )
    if bad:
        print(f"\n{len(bad)} round(s) did not find the guest's pattern at h2: the figures are suspect")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
