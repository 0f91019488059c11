"""Collecting tombstones: what one collection pass costs on the reactor, and what it gives back.

A grid that has run a while: 10,000 live VMs (with status parts), 20 hosts publishing their
vectors, and 5,000 entities deleted since (VMs of destroyed clusters, with their leases). Printed
side by side in one run: one `collectable` pass (every heartbeat) against one
`Dom.version_vector` pass (what anti-entropy already does), and the replica's size (serialised
DOM, and a full anti-entropy delta to an empty host) before and after collection (lease
tombstones are kept: vmwebd/dom/gc.py).

    .venv/bin/python bench/gc.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmwebd.dom.document import Dom, entity_bytes  # noqa: E402
from vmwebd.dom.gc import collectable, format_cvv  # noqa: E402
from vmwebd.dom.hlc import HybridClock  # noqa: E402
from vmwebd.dom.records import HostRec, LeaseRec, VmRec, VmStatus  # noqa: E402

LIVE, DELETED, HOSTS = 10_000, 5_000, 20


def median_time(fn, rounds: int = 7) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    now = [1_795_750_805_482]
    dom = Dom(HybridClock("h00", lambda: now[0]))
    for i in range(LIVE + DELETED):
        vid = f"c{i // 8}/pc{i % 8}"
        dom.put(
            VmRec(
                id=vid,
                cluster=f"c{i // 8}",
                name=f"pc{i % 8}",
                host=f"h{i % HOSTS:02d}",
                image="debian-12",
                ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                mac=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                token="ab12",
            )
        )
        dom.put(VmStatus(id=vid, host=f"h{i % HOSTS:02d}", state="running", observed_at=now[0], token="ab12"))
        dom.put(LeaseRec(id=f"ip/lab/{i}", holder=f"vm:{vid}#ab12", granted_at=now[0]))
    for i in range(LIVE, LIVE + DELETED):
        dom.delete("vm", f"c{i // 8}/pc{i % 8}")
        dom.delete("lease", f"ip/lab/{i}")
    now[0] += 3_600_000
    vv = dom.version_vector()
    full = {f"h{i:02d}": vv["h00"] for i in range(HOSTS)}
    for i in range(HOSTS):
        dom.put(HostRec(id=f"h{i:02d}", cpus=16, memory_mib=65536, cvv=format_cvv(full)))
    full = dom.version_vector() | {f"h{i:02d}": dom.version_vector()["h00"] for i in range(HOSTS)}

    t_gc = median_time(lambda: collectable(dom, full, now[0], 600_000))
    t_vv = median_time(dom.version_vector)
    behind = {**full, "h19": (0, 0)}  # one host down since long before: nothing collectable
    t_blocked = median_time(lambda: collectable(dom, behind, now[0], 600_000))
    keys = collectable(dom, full, now[0], 600_000, limit=10**9)
    size_before = len(dom.to_xml(pretty=False))
    delta_before = sum(len(entity_bytes(e)) for e in dom.delta({}, full, 1 << 40)[0])
    for kind, id_ in keys:
        dom.forget(kind, id_)
    size_after = len(dom.to_xml(pretty=False))
    delta_after = sum(len(entity_bytes(e)) for e in dom.delta({}, full, 1 << 40)[0])
    t_after = median_time(lambda: collectable(dom, full, now[0], 600_000))

    print(
        f"bench/gc.py: {LIVE:,} live VMs (+status, +lease), {DELETED:,} VMs and leases deleted, {HOSTS} hosts"
    )
    print(
        f"  one collection pass (on the reactor, after each heartbeat): {t_gc * 1000:.1f} ms collecting "
        f"500 of {len(keys):,} (its cap), {t_blocked * 1000:.1f} ms when a host that is down blocks all, "
        f"{t_after * 1000:.1f} ms with none left; one Dom.version_vector: {t_vv * 1000:.1f} ms"
    )
    print(
        f"  serialised DOM: {size_before / 1e6:.2f} MB before, {size_after / 1e6:.2f} MB after "
        f"({size_before / size_after:.2f}x smaller)"
    )
    print(
        f"  full anti-entropy delta to an empty host: {delta_before / 1e6:.2f} MB before, "
        f"{delta_after / 1e6:.2f} MB after"
    )


if __name__ == "__main__":
    main()
