"""Guest to guest over a cluster's segment: within one host and across hosts (VXLAN), side by side.

One run, one 2-host lab (tests/lab: two libvirtd in network namespaces on this machine) with a
vmwebd beside each libvirtd, every request through the ``vmweb`` CLI. One isolated cluster of
three lab guests (128 MiB TCG each): ``client0`` and one server on one host, the other server on
the other host, all on the cluster's segment (bridge ``vmbr<VNI>`` on each host, joined by the
VXLAN device ``vmvx<VNI>``; guest MTU 1450). The guests' image carries
``vmweb.bench=client0:<seconds>:<pings>:<rounds>`` on its kernel command line, so (see
tests/lab/guest.py) every guest listens on TCP 5001 and discards what it gets, and ``client0``,
once it reaches both servers by name, measures each in turn, ``<rounds>`` times:

* round trip: ``<pings>`` busybox pings 0.2 s apart (min/avg/max as ping reports them);
* throughput: a stream of zeros through busybox ``nc``, sized from a 2 MiB trial to last about
  ``<seconds>``, timed inside the guest from the first byte to the receiver's close.

It prints, per path, the median over rounds, and the ratios across/within, as a markdown table.
Under TCG the guests' own emulation dominates both figures; the ratio is what the VXLAN hop (the
encapsulation, the veths and the lab's root bridge) adds to a path that stays on one bridge.

    .venv/bin/python bench/network.py [--seconds 3] [--pings 20] [--rounds 2]

Needs root, network namespaces, libvirtd and QEMU (``bash scripts/bootstrap.sh``); about 1.5 min.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from lab import wait_for  # noqa: E402
from lab.guest import bench_results, build_guest, clock_args, make_base_image, read_serial  # noqa: E402
from lab.hosts import Lab, lab_available  # noqa: E402
from lab.vmweb import Grid, console  # noqa: E402

CLUSTER = "bn"
CLIENT = "client0"
TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<template name="bench" description="Lab guests measuring their segment">
  <network mode="isolated" pool="lab"/>
  <role name="client" count="1" vcpus="1" memory-mib="128" image="bench"/>
  <role name="server" count="rest" vcpus="1" memory-mib="128" image="bench"/>
</template>
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each TCP stream (3)")
    ap.add_argument("--pings", type=int, default=20, help="pings per round trip figure (20)")
    ap.add_argument("--rounds", type=int, default=2, help="measurements of each path (2)")
    args = ap.parse_args()
    if not (0.5 <= args.seconds <= 30 and 1 <= args.pings <= 200 and 1 <= args.rounds <= 10):
        ap.error("--seconds 0.5..30, --pings 1..200, --rounds 1..10")
    ok, why = lab_available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    guest = build_guest()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmwnet-") as tmp:
        tmp = Path(tmp)
        with Lab(2, tmp / "lab") as lab:
            grid = Grid(
                lab,
                tmp / "grid",
                {"bench": TEMPLATE},
                pool_cidr="10.88.0.0/24",
                images='<image name="bench" file="bench-blank.qcow2" size-mib="128"/>',
            )
            try:
                return run(grid, guest, args, tmp, t_start)
            finally:
                grid.close()


def run(grid: Grid, guest, args, tmp: Path, t_start: float) -> int:
    h1 = grid.lab.hosts[0]
    blank = make_base_image(tmp / "bench-base.qcow2", 128)
    cmdline = (
        f"console=ttyS0 quiet {clock_args()} vmweb.bench={CLIENT}:{args.seconds:g}:{args.pings}:{args.rounds}"
    )
    grid.vmweb(
        h1,
        "image",
        "add",
        "bench",
        str(blank),
        "--kernel",
        str(guest.kernel),
        "--initrd",
        str(guest.initrd),
        "--cmdline",
        cmdline,
    )
    c, _ = grid.vmweb(
        h1, "cluster", "create", CLUSTER, "--template", "bench", "--owner", "admin", "--count", "3"
    )
    where = {v["name"]: v["host"] for v in c["vms"]}
    here = where[CLIENT]
    kind = {n: ("same host" if h == here else "across hosts") for n, h in where.items() if n != CLIENT}
    if sorted(kind.values()) != ["across hosts", "same host"]:
        print(f"placement gave no pair of both kinds: {where}", file=sys.stderr)
        return 1
    log = console(grid.host(here), f"{CLUSTER}/{CLIENT}")
    per_peer = 2 * (args.pings * 0.2 + 2 * args.seconds + 10)
    try:
        wait_for(
            lambda: any("VMWEB-BENCH-DONE" in line for line in read_serial(log)),
            120 + args.rounds * per_peer,
            "the bench guest to finish",
        )
    except TimeoutError as e:
        print(f"{e}; its console:\n" + "\n".join(read_serial(log)[-30:]), file=sys.stderr)
        return 1
    lines = read_serial(log)
    results = bench_results(lines)
    clocks = [line.split()[-1] for line in lines if line.startswith("VMWEB-BENCH-CLOCK ")]
    grid.vmweb(h1, "cluster", "destroy", CLUSTER)
    if any(c != "tsc" for c in clocks):
        print(
            "warning: the client's clock is not its TSC, times are in 4 ms steps:\n"
            + "\n".join(x for x in lines if x.startswith("VMWEB-BENCH-CLOCK-LOG")),
            file=sys.stderr,
        )

    def med(path, key):
        vals = [r[key] for r in results if kind.get(r["peer"]) == path and key in r]
        return statistics.median(vals) if vals else float("nan")

    def mib_s(path):
        vals = [
            r["bytes"] / r["seconds"] / 2**20
            for r in results
            if kind.get(r["peer"]) == path and r.get("seconds")
        ]
        return statistics.median(vals) if vals else float("nan")

    rows = []
    for path in ("same host", "across hosts"):
        rows.append(
            (
                path,
                med(path, "rtt_min"),
                med(path, "rtt_avg"),
                med(path, "rtt_max"),
                med(path, "loss"),
                mib_s(path),
            )
        )
    print(
        f"\nguest to guest on one cluster segment ({len(results)} measurements, "
        f"{args.rounds} per path; {args.pings} pings each, TCP streams of ~{args.seconds:g} s; "
        f"client on {here}, its clocksource {' then '.join(clocks) or '?'}; "
        f"run {time.monotonic() - t_start:.0f} s)\n"
    )
    for r in results:
        print(
            f"  {r['peer']} ({kind.get(r['peer'])}), round {r.get('round', 0):.0f}: rtt "
            f"{r.get('rtt_min', float('nan')):.3f}/{r.get('rtt_avg', float('nan')):.3f}/"
            f"{r.get('rtt_max', float('nan')):.3f} ms, {r['bytes'] / 2**20:.0f} MiB in "
            f"{r['seconds']:.2f} s"
        )
    print()
    print("| path | rtt min (ms) | rtt avg (ms) | rtt max (ms) | loss (%) | TCP (MiB/s) |")
    print("|---|---|---|---|---|---|")
    for path, lo, avg, hi, loss, tput in rows:
        print(f"| {path} | {lo:.3f} | {avg:.3f} | {hi:.3f} | {loss:.0f} | {tput:.1f} |")
    same, across = rows

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "-"

    print(
        f"| across / same | {ratio(across[1], same[1])} | {ratio(across[2], same[2])} | "
        f"{ratio(across[3], same[3])} | | {ratio(across[5], same[5])} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
