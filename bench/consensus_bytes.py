"""Bytes on the wire per cluster creation as the grid fills, with and without large values named
instead of carried (docs/leases.md, "Large values cross the wire once per change").

Deterministic: the Paxos simulator (vmwebd/lease/paxos_sim.py, no loss, no faults) runs the
consensus operations a CreateCluster makes — a 50-VM cluster's addresses and MACs, its name, and
the capacity sets of the 16 hosts it is spread over plus its owner's quota set, as
:class:`~vmwebd.lease.capacity.SetUpdate`s — one after another at one proposer, on a grid
already holding ``N`` VMs, each create's Commit delivered before the next one is asked (a busy
proposer sends a round's Commit and the next round's Prepare in one bundle, which the acceptor
reads in order: the same effect). Every message a host sends to another is encoded with the real peer
codec (vmwebd/gossip/codec.py) and its bytes counted by kind; the forwarded operation's Outcome
too. Both settings are measured in the same run, side by side, so the ratio does not depend on
the machine.

    .venv/bin/python bench/consensus_bytes.py [--members 5] [--sizes 1000 5000 10000]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lxml import etree  # noqa: E402

from vmwebd.gossip.codec import encode  # noqa: E402
from vmwebd.gossip.messages import Envelope  # noqa: E402
from vmwebd.lease import paxos  # noqa: E402
from vmwebd.lease.capacity import Entry, SetUpdate, cap_key, quota_key  # noqa: E402
from vmwebd.lease.capacity import encode as encode_set  # noqa: E402
from vmwebd.lease.paxos_sim import PaxosSim  # noqa: E402

HOSTS = [f"host{i + 1}" for i in range(16)]
OWNERS = ["alice", "bob", "carol", "dave"]
CLUSTER = 50


def _wire_bytes(msg) -> int:
    env = Envelope(src="host1", src_addr="127.0.0.1:1", dst="host2", msg=msg)
    return len(etree.tostring(encode(env)))


def _create_ops(c: int) -> dict:
    """The compare-and-set of cluster number ``c``: every key it leases and every set it updates."""
    cas: dict = {f"name/c{c:05d}": (None, f"c{c:05d}#t")}
    by_host: dict[str, set] = {}
    for i in range(CLUSTER):
        vm = f"c{c:05d}/pc{i}"
        cas[f"ip/lab/10.{c // 250}.{c % 250}.{i + 2}"] = (None, vm)
        cas[f"mac/52:54:00:{c // 256:02x}:{c % 256:02x}:{i:02x}"] = (None, vm)
        by_host.setdefault(HOSTS[i % len(HOSTS)], set()).add(Entry(vm, "t", 1, 64))
    for host, entries in by_host.items():
        cas[cap_key(host)] = (SetUpdate(add=frozenset(entries), limit=(10**6, 10**9), name=host), None)
    owner = OWNERS[c % len(OWNERS)]
    cas[quota_key(owner)] = (
        SetUpdate(
            add=frozenset(Entry(f"c{c:05d}/pc{i}", "t") for i in range(CLUSTER)),
            sizes=False,
            limit=10**6,
            name=owner,
        ),
        None,
    )
    return cas


def _prefill(sim: PaxosSim, vms: int) -> None:
    """Commits, at every acceptor, the capacity and quota sets of a grid holding ``vms`` VMs
    (as the decisions before this run left them)."""
    clusters = vms // CLUSTER
    caps: dict[str, set] = {h: set() for h in HOSTS}
    quotas: dict[str, set] = {o: set() for o in OWNERS}
    for c in range(clusters):
        for i in range(CLUSTER):
            vm = f"old{c:05d}/pc{i}"
            caps[HOSTS[i % len(HOSTS)]].add(Entry(vm, "t", 1, 64))
            quotas[OWNERS[c % len(OWNERS)]].add(Entry(vm, "t"))
    values = {cap_key(h): encode_set(e, True) for h, e in caps.items()}
    values.update({quota_key(o): encode_set(e, False) for o, e in quotas.items()})
    sim.propose(sim.hosts[0], "prefill", {k: (None, v) for k, v in values.items()})
    assert sim.run_until_done(["prefill"], limit=10.0)
    assert isinstance(sim.result("prefill"), paxos.Decided), sim.result("prefill")
    sim.run_until(sim.now + 1.0)


def measure(members: int, vms: int, elide_at, creates: int) -> dict:
    sim = PaxosSim(members, seed=1, elide_at=elide_at, parallel_rounds=1)
    _prefill(sim, vms)
    by_kind: Counter = Counter()
    sim.hold(lambda src, dst, m: src != dst and (by_kind.update({type(m).__name__: _wire_bytes(m)}) or False))
    for c in range(creates):
        op = f"create{c}"
        sim.propose(sim.hosts[0], op, _create_ops(c))
        assert sim.run_until_done([op], limit=10.0)
        r = sim.result(op)
        assert isinstance(r, paxos.Decided), r
        # The forwarded operation's Outcome, back to the host that asked.
        by_kind["Outcome"] += _wire_bytes(paxos.Outcome(op, r))
        sim.run_until(sim.now + 0.05)  # its Commit reaches every member before the next
    sim.stop_holding()
    sim.run_until(sim.now + 1.0)
    return {k: v / creates for k, v in by_kind.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--creates", type=int, default=5)
    args = ap.parse_args()
    kinds = ["Prepare", "Promise", "Accept", "Accepted", "Commit", "Outcome"]
    print(
        f"{args.members} consensus members, clusters of {CLUSTER} VMs over {len(HOSTS)} hosts, "
        f"{len(OWNERS)} owners; bytes on the wire per create (mean of {args.creates})\n"
    )
    print(f"{'VMs':>7} {'setting':>10} " + " ".join(f"{k:>9}" for k in kinds) + f" {'total':>10}")
    for vms in args.sizes:
        totals = {}
        for name, elide_at in (("whole", None), ("named", paxos.BIG_VALUE)):
            r = measure(args.members, vms, elide_at, args.creates)
            totals[name] = sum(r.values())
            print(
                f"{vms:>7} {name:>10} "
                + " ".join(f"{r.get(k, 0):>9.0f}" for k in kinds)
                + f" {totals[name]:>10.0f}"
            )
        print(f"{'':>7} {'whole/named':>10} {totals['whole'] / totals['named']:>69.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
