"""A deterministic simulator of the decentralised balancer on a grid of hosts, in one process.

Each host runs the real :func:`~vmwebd.migrate.balancer.choose_move` at jittered intervals on its
own view of the grid; a proposed move takes the VM's ``migration/<vm>`` lease (a shared dict stands
for the consensus outcome: one holder per key), is checked by the destination with
:func:`~vmwebd.migrate.balancer.assess` on its own fresh load, and then runs for a time
proportional to its cost. Only the network, the hypervisors and the clock are simulated:

* views are stale: a finished move reaches each other host's view after a random gossip delay
  (per VM record, newest version wins), a crash after a random detection delay. A host always
  knows its own VMs, and a refusal carries the destination's records back to the asker;
* faults: a host can crash (it stops acting and its views stop; its VMs stay where they are, and
  migrations to or from it fail); a migration can fail (the VM stays at its source, the lease is
  given back);
* each host takes part in at most ``max_concurrent`` migrations at once, as source or destination.

Everything is driven by one seeded ``random.Random``: the same seed gives the same run. With
``strict`` the simulator checks after every event that each VM runs on exactly one host and that
each migration in flight holds its VM's lease (a test may hold a lease itself under a holder that
is no host, as a user's MigrateVm would). ``python -m vmwebd.migrate.balance_sim`` prints the
figures quoted in docs/balancer.md.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from vmwebd.migrate.balancer import (
    BalancerPolicy,
    HostLoad,
    Move,
    VmLoad,
    assess,
    choose_move,
    grid_load,
    imbalance,
)


@dataclass(frozen=True)
class SimHost:
    id: str
    cpus: int
    mem_mib: int


@dataclass(frozen=True)
class SimVm:
    id: str
    host: str  # where it runs at the start
    vcpus: int
    mem_mib: int
    overlay_bytes: int


@dataclass(frozen=True)
class SimParams:
    """The simulated world's timing and faults (seconds)."""

    jitter: float = 0.25  # a host acts every interval × (1 ± jitter)
    gossip_delay_s: tuple[float, float] = (0.5, 8.0)  # a finished move reaches another host's view
    detect_delay_s: tuple[float, float] = (3.0, 15.0)  # a crash reaches another host's view
    bandwidth_bps: float = 100e6  # bytes per second a migration copies
    setup_s: float = 2.0  # fixed part of a migration's time
    fail_rate: float = 0.0  # chance a migration fails (VM stays at source)
    crashes: tuple[tuple[float, str], ...] = ()  # (time, host)
    max_time_s: float = 7 * 86400.0


@dataclass(frozen=True)
class MigrationTrace:
    """One migration that started; ``ok`` says whether the VM ended at ``dst``.

    ``phi_before``/``phi_after``: the true imbalance just before and after it finished;
    ``src_load``/``dst_load``: the two hosts' true loads just after (only when ``ok``)."""

    vm_id: str
    src: str
    dst: str
    start_s: float
    end_s: float
    ok: bool
    detail: str
    phi_before: float | None = None
    phi_after: float | None = None
    src_load: float | None = None
    dst_load: float | None = None


@dataclass
class Report:
    quiet: bool  # reached a state where no host will ever move anything again
    time_s: float  # simulated time at the end
    migrations: list[MigrationTrace]
    refused: int  # proposals a destination turned down
    lease_busy: int  # proposals whose VM's lease was held
    grid_load: float
    loads_start: dict[str, float]
    loads_end: dict[str, float]
    live_end: set[str]
    phi_start: float
    phi_end: float

    @property
    def completed(self) -> list[MigrationTrace]:
        return [m for m in self.migrations if m.ok]

    @property
    def failed(self) -> list[MigrationTrace]:
        return [m for m in self.migrations if not m.ok]

    def spread_start(self) -> float:
        return max(self.loads_start.values()) - min(self.loads_start.values())

    def settled_s(self) -> float:
        """When the last migration that moved a VM finished (0 if none did)."""
        return max((m.end_s for m in self.completed), default=0.0)

    def spread_end(self) -> float:
        """Highest minus lowest load among the hosts alive at the end."""
        live = [v for h, v in self.loads_end.items() if h in self.live_end]
        return max(live) - min(live) if live else 0.0


@dataclass
class _Flight:
    move: Move
    start_s: float


@dataclass
class _View:
    """What one host believes: where each VM is (with its record's version) and who is alive."""

    place: dict[str, tuple[str, int, int | None]]  # vm -> (host, version, last_moved_ms)
    alive: dict[str, bool] = field(default_factory=dict)


class SimInvariantError(AssertionError):
    """The simulator found a state the design rules out (a VM on two hosts or none, a lease mismatch)."""


class BalanceSim:
    def __init__(
        self,
        hosts: list[SimHost],
        vms: list[SimVm],
        policy: BalancerPolicy,
        params: SimParams = SimParams(),
        seed: int = 0,
        strict: bool = True,
    ):
        self.rng = random.Random(seed)
        self.policy, self.params, self.strict = policy, params, strict
        self.hosts = {h.id: h for h in hosts}
        self.vms = {v.id: v for v in vms}
        self.now = 0.0
        self.runs: dict[str, set[str]] = {h: set() for h in self.hosts}  # what each hypervisor runs
        self.loc = {v.id: v.host for v in vms}  # the DOM's vm -> host
        for v in vms:
            self.runs[v.host].add(v.id)
        self.version = {v: 0 for v in self.vms}
        self.last_moved: dict[str, int | None] = {v: None for v in self.vms}
        self.crashed: set[str] = set()
        self.views = {
            h: _View({v.id: (v.host, 0, None) for v in vms}, {o: True for o in self.hosts})
            for h in self.hosts
        }
        self.leases: dict[str, str] = {}
        self.flights: dict[str, _Flight] = {}  # vm -> migration in flight
        self.trace: list[MigrationTrace] = []
        self.refused = self.lease_busy = 0
        self._queue: list = []
        self._seq = itertools.count()
        self._pending_news = 0
        self._quiet = False
        for h in sorted(self.hosts):
            self._at(self.rng.uniform(0, self._interval()), "act", h)
        for t, h in params.crashes:
            self._at(t, "crash", h)
        self._check()

    # -- time ---------------------------------------------------------------------------------
    def _interval(self) -> float:
        return self.policy.interval_ms / 1000.0

    def _now_ms(self) -> int:
        return int(self.now * 1000)

    def _at(self, t: float, kind: str, *args):
        if kind in ("learn", "dead"):
            self._pending_news += 1
        heapq.heappush(self._queue, (t, next(self._seq), kind, args))

    def run(self) -> Report:
        """Runs until the grid is quiet or ``max_time_s``; returns what happened."""
        hl = self.true_hosts()
        start = {h.host_id: h.load(self.policy.cpu_overcommit) for h in hl}
        phi0 = imbalance(hl, self.policy.cpu_overcommit)
        while self._queue and not self._quiet:
            t, _, kind, args = heapq.heappop(self._queue)
            if t > self.params.max_time_s:
                break
            self.now = t
            getattr(self, "_on_" + kind)(*args)
            self._check()
        hl = self.true_hosts()
        oc = self.policy.cpu_overcommit
        return Report(
            quiet=self._quiet,
            time_s=self.now,
            migrations=list(self.trace),
            refused=self.refused,
            lease_busy=self.lease_busy,
            grid_load=grid_load(hl, oc),
            loads_start=start,
            loads_end={h.host_id: h.load(oc) for h in hl},
            live_end=set(self.hosts) - self.crashed,
            phi_start=phi0,
            phi_end=imbalance(hl, oc),
        )

    # -- the true state -----------------------------------------------------------------------
    def where(self, vm_id: str) -> str:
        return self.loc[vm_id]

    def true_hosts(self) -> list[HostLoad]:
        out = []
        for hid in sorted(self.hosts):
            h = self.hosts[hid]
            mine = [self.vms[v] for v in self.runs[hid]]
            out.append(
                HostLoad(
                    hid,
                    h.cpus,
                    h.mem_mib,
                    sum(v.vcpus for v in mine),
                    sum(v.mem_mib for v in mine),
                    live=hid not in self.crashed,
                )
            )
        return out

    def true_vms(self) -> list[VmLoad]:
        return [self._vm_load(v, self.where(v)) for v in sorted(self.vms)]

    def _vm_load(self, vm_id: str, host: str, last_moved: int | None = None) -> VmLoad:
        v = self.vms[vm_id]
        lm = self.last_moved[vm_id] if last_moved is None else last_moved
        return VmLoad(vm_id, host, v.vcpus, v.mem_mib, v.overlay_bytes, lm)

    def _check(self):
        if not self.strict:
            return
        seen: dict[str, int] = {}
        for vs in self.runs.values():
            for v in vs:
                seen[v] = seen.get(v, 0) + 1
        bad = {v: n for v, n in seen.items() if n != 1}
        missing = set(self.vms) - set(seen)
        if bad or missing:
            raise SimInvariantError(
                f"at {self.now:.1f} s: VMs on several hosts {bad}, on none {sorted(missing)}"
            )
        wrong = sorted(v for v, h in self.loc.items() if v not in self.runs[h])
        if wrong:
            raise SimInvariantError(
                f"at {self.now:.1f} s: the record of {wrong} names a host that does not run it"
            )
        for vm, f in self.flights.items():
            if self.leases.get(f"migration/{vm}") != f.move.src:
                raise SimInvariantError(f"at {self.now:.1f} s: {vm} moves without its lease")
        for key, holder in self.leases.items():
            vm = key.split("/", 1)[1]
            if holder in self.hosts and (vm not in self.flights or self.flights[vm].move.src != holder):
                raise SimInvariantError(
                    f"at {self.now:.1f} s: lease {key} held by {holder} with no migration"
                )

    # -- a host's view ------------------------------------------------------------------------
    def view_of(self, hid: str) -> tuple[list[HostLoad], list[VmLoad]]:
        view = self.views[hid]
        used = {h: [0, 0] for h in self.hosts}
        vms = []
        for vm_id in sorted(view.place):
            host, _, lm = view.place[vm_id]
            v = self.vms[vm_id]
            used[host][0] += v.vcpus
            used[host][1] += v.mem_mib
            vms.append(self._vm_load(vm_id, host, lm))
        hosts = [
            HostLoad(
                h,
                self.hosts[h].cpus,
                self.hosts[h].mem_mib,
                used[h][0],
                used[h][1],
                live=h == hid or view.alive[h],
            )
            for h in sorted(self.hosts)
        ]
        return hosts, vms

    def _involving(self, hid: str) -> list[Move]:
        return [f.move for f in self.flights.values() if hid in (f.move.src, f.move.dst)]

    def _learn(self, observer: str, vm_id: str, host: str, version: int, last_moved: int | None):
        place = self.views[observer].place
        if place[vm_id][1] < version:
            place[vm_id] = (host, version, last_moved)

    # -- events -------------------------------------------------------------------------------
    def _on_act(self, hid: str):
        if hid in self.crashed:
            return
        iv = self._interval()
        self._at(self.now + iv * self.rng.uniform(1 - self.params.jitter, 1 + self.params.jitter), "act", hid)
        hosts, vms = self.view_of(hid)
        skip: set[str] = set()
        # Each lost lease race takes one VM out of the running: at most as many tries as VMs.
        for _ in range(len(vms) + 1):
            move = choose_move(hid, hosts, vms, self.policy, self._now_ms(), self._involving(hid), skip)
            if move is None:
                if not self.flights and not self._pending_news:
                    self._quiet = self.no_move_possible()
                return
            key = f"migration/{move.vm_id}"
            if key not in self.leases:
                break
            self.lease_busy += 1
            skip.add(move.vm_id)
        else:
            raise SimInvariantError(f"{hid} found every lease busy more often than it has VMs")
        self.leases[key] = hid
        verdict = self._admit(move)
        if isinstance(verdict, str):
            self.refused += 1
            del self.leases[key]
            if move.dst not in self.crashed:  # the refusal carries the destination's records
                for v in self.runs[move.dst]:
                    self._learn(hid, v, move.dst, self.version[v], self.last_moved[v])
            return
        self.flights[move.vm_id] = _Flight(verdict, self.now)
        duration = self.params.setup_s + verdict.cost / self.params.bandwidth_bps
        self._at(self.now + duration, "done", move.vm_id)

    def _admit(self, move: Move) -> Move | str:
        """The destination's check, on its own fresh load plus what already comes to it."""
        if move.dst in self.crashed:
            return f"{move.dst} does not answer"
        mc = self.policy.max_concurrent
        if len(self._involving(move.dst)) >= mc or len(self._involving(move.src)) >= mc:
            return f"{move.dst} is busy"
        loads = {h.host_id: h for h in self.true_hosts()}
        src, dst = loads[move.src], loads[move.dst]
        for f in self.flights.values():
            v = self.vms[f.move.vm_id]
            vl = VmLoad(v.id, f.move.src, v.vcpus, v.mem_mib, v.overlay_bytes)
            if f.move.src == move.src:
                src = src.minus(vl)
            if f.move.dst == move.dst:
                dst = dst.plus(vl)
        m = grid_load(list(loads.values()), self.policy.cpu_overcommit)
        return assess(
            self._vm_load(move.vm_id, self.where(move.vm_id)), src, dst, m, self.policy, self._now_ms()
        )

    def _on_done(self, vm_id: str):
        f = self.flights.pop(vm_id)
        mv = f.move
        del self.leases[f"migration/{vm_id}"]
        if mv.src in self.crashed or mv.dst in self.crashed:
            self.trace.append(
                MigrationTrace(vm_id, mv.src, mv.dst, f.start_s, self.now, False, "a host crashed")
            )
            return
        if self.rng.random() < self.params.fail_rate:
            self.trace.append(
                MigrationTrace(vm_id, mv.src, mv.dst, f.start_s, self.now, False, "migration failed")
            )
            return
        oc = self.policy.cpu_overcommit
        before = imbalance(self.true_hosts(), oc)
        # The switch is atomic (the destination resumes the VM, then the source undefines it).
        self.runs[mv.dst].add(vm_id)
        self.runs[mv.src].discard(vm_id)
        self.loc[vm_id] = mv.dst
        self.version[vm_id] += 1
        self.last_moved[vm_id] = self._now_ms()
        rec = (vm_id, mv.dst, self.version[vm_id], self.last_moved[vm_id])
        self._learn(mv.src, *rec)
        self._learn(mv.dst, *rec)
        lo, hi = self.params.gossip_delay_s
        for o in sorted(self.hosts):
            if o not in (mv.src, mv.dst):
                self._at(self.now + self.rng.uniform(lo, hi), "learn", o, *rec)
        after = self.true_hosts()
        loads = {h.host_id: h.load(oc) for h in after}
        self.trace.append(
            MigrationTrace(
                vm_id,
                mv.src,
                mv.dst,
                f.start_s,
                self.now,
                True,
                mv.reason,
                before,
                imbalance(after, oc),
                loads[mv.src],
                loads[mv.dst],
            )
        )

    def _on_learn(self, observer: str, *rec):
        self._pending_news -= 1
        if observer not in self.crashed:
            self._learn(observer, *rec)

    def _on_crash(self, hid: str):
        if hid in self.crashed:
            return
        self.crashed.add(hid)
        lo, hi = self.params.detect_delay_s
        for o in sorted(self.hosts):
            if o != hid:
                self._at(self.now + self.rng.uniform(lo, hi), "dead", o, hid)

    def _on_dead(self, observer: str, hid: str):
        self._pending_news -= 1
        self.views[observer].alive[hid] = False

    # -- quiet --------------------------------------------------------------------------------
    def no_move_possible(self) -> bool:
        """Whether no live host has a move on the true state, even once every residence ran out."""
        hosts, vms = self.true_hosts(), self.true_vms()
        later = self._now_ms() + self.policy.min_residence_ms
        return all(choose_move(h.host_id, hosts, vms, self.policy, later) is None for h in hosts if h.live)


# -- scenarios ------------------------------------------------------------------------------------
SHAPES = ((1, 1024), (1, 2048), (2, 2048), (2, 4096), (4, 8192))  # (vCPUs, MiB)


def packed_grid(
    n_hosts: int,
    load: float,
    seed: int,
    cpus=(16, 8, 4),
    mib_per_cpu: int = 4096,
    shapes=SHAPES,
    overcommit: float = 4.0,
) -> tuple[list[SimHost], list[SimVm]]:
    """An unbalanced start: hosts of cycling sizes (16/8/4 CPUs, 4 GiB per CPU) and VMs of random
    shapes, as many as make the grid's memory ``load`` full, packed first-fit onto the first hosts
    in order (at most ``overcommit`` vCPUs per CPU)."""
    rng = random.Random(seed)
    hosts = [
        SimHost(f"h{i:02d}", cpus[i % len(cpus)], cpus[i % len(cpus)] * mib_per_cpu) for i in range(n_hosts)
    ]
    used = {h.id: [0, 0] for h in hosts}
    goal = load * sum(h.mem_mib for h in hosts)
    vms: list[SimVm] = []
    while sum(v.mem_mib for v in vms) < goal:
        c, m = rng.choice(shapes)
        for h in hosts:
            u = used[h.id]
            if u[0] + c <= h.cpus * overcommit and u[1] + m <= h.mem_mib:
                u[0] += c
                u[1] += m
                vms.append(SimVm(f"vm{len(vms):03d}", h.id, c, m, rng.randrange(50, 2000) * 1_000_000))
                break
        else:
            break
    return hosts, vms


def main():
    """Prints the table of docs/balancer.md: packed starts at half load, ten seeds per row."""

    def med(xs) -> str:
        xs = sorted(xs)
        f = "{:.0f}" if xs[-1] >= 100 else "{:.3g}"
        return f"{f.format(xs[len(xs) // 2])} ({f.format(xs[0])}–{f.format(xs[-1])})"

    print(
        "| hosts | VMs | θ | failures | spread before | spread after | migrations | bound Φ₀/h | failed | settled (min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_hosts in (3, 20):
        for threshold in (0.2, 0.1):
            for fail in (0.0, 0.1):
                policy = BalancerPolicy(enabled=True, threshold=threshold)
                rs, n_vms = [], []
                for seed in range(10):
                    hosts, vms = packed_grid(n_hosts, 0.5, seed)
                    sim = BalanceSim(hosts, vms, policy, SimParams(fail_rate=fail), seed=seed, strict=False)
                    r = sim.run()
                    assert r.quiet
                    rs.append(r)
                    n_vms.append(len(vms))
                print(
                    f"| {n_hosts} | {med(n_vms)} | {threshold} | {fail:.0%} | {med([r.spread_start() for r in rs])} "
                    f"| {med([r.spread_end() for r in rs])} | {med([len(r.completed) for r in rs])} "
                    f"| {med([r.phi_start / policy.hysteresis for r in rs])} | {med([len(r.failed) for r in rs])} "
                    f"| {med([r.settled_s() / 60 for r in rs])} |"
                )


if __name__ == "__main__":
    main()
