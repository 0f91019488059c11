"""Checking one DOM entity against the schema: libxml2's RelaxNG vs our linear validator.

Every peer delivery checks the entities it carries, on the reactor thread. RelaxNG in libxml2
grows exponentially with the number of optional attributes an element has; this prints, per
entity kind as vmweb writes it, the time of one check each way, measured side by side in one run.

    .venv/bin/python bench/validate.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmwebd.dom.document import Dom, relaxng_valid  # noqa: E402
from vmwebd.dom.hlc import HybridClock  # noqa: E402
from vmwebd.dom.records import HostRec, LeaseRec, MigrationRec, VClusterRec, VmRec  # noqa: E402
from vmwebd.dom.validate import entity_error  # noqa: E402


def timed(fn, el, budget: float = 1.0) -> float:
    n, started = 0, time.perf_counter()
    while True:
        fn(el)
        n += 1
        spent = time.perf_counter() - started
        if spent > budget or n >= 2000:
            return spent / n


def main() -> None:
    dom = Dom(HybridClock("h1", lambda: 1_795_750_805_482))
    recs = [
        LeaseRec(id="ip/lab/10.77.0.5", holder="vm:lab1/pc0#1a2b", granted_at=1),
        VClusterRec(
            id="lab1",
            owner="alice",
            template="lab",
            count=4,
            vni=100,
            network="vmweb-lab1",
            bridge="vmbr100",
            created_at=1,
            token="1a2b",
        ),
        VmRec(
            id="lab1/pc0",
            cluster="lab1",
            name="pc0",
            role="pc",
            host="h1",
            image="debian-12",
            ip="10.77.0.5",
            mac="52:54:00:00:00:05",
        ),
        HostRec(
            id="h1",
            api="https://10.0.0.1:8471",
            peer="10.0.0.1:8571",
            cpus=16,
            memory_mib=32768,
            free_memory_mib=30000,
            load1=0.5,
            vms=4,
            started_at=1,
            images="debian-12",
            migrate_uri="qemu+tls://h1/system",
        ),
        MigrationRec(
            id="0a1b2c3d4e5f",
            vm="lab1/pc0",
            source="h1",
            dest="h2",
            phase="done",
            mode="live",
            requested_by="alice",
            started_at=1,
            finished_at=2,
            bytes=3,
            disk_bytes=4,
            total_ms=5,
            downtime_ms=6,
            dest_disk="/x",
            dest_console="/y",
        ),
    ]
    print("| entity | attributes | RelaxNG (libxml2) | linear validator | ratio |")
    print("|---|---|---|---|---|")
    for rec in recs:
        el = dom.put(rec)
        assert relaxng_valid(el) and entity_error(el) is None
        slow, fast = timed(relaxng_valid, el), timed(entity_error, el)
        print(
            f"| {rec.KIND} | {len(el.attrib)} | {slow * 1000:.3f} ms | {fast * 1e6:.1f} µs | "
            f"{slow / fast:,.0f}× |"
        )


if __name__ == "__main__":
    main()
