"""The load balancer: the move rule (choose_move / assess), its settings, and whole grids in the
deterministic simulator — balanced within a bound on migrations, no VM back to a host it left, one
mover per VM, no VM lost or doubled when migrations fail and hosts crash.

Loads and the imbalance are recomputed here from the VMs, independently of the module, so the
properties check the module against the definitions in docs/balancer.md, not against itself.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwebd.errors import InvalidArgument
from vmwebd.migrate.balance_sim import BalanceSim, SimHost, SimInvariantError, SimParams, SimVm, packed_grid
from vmwebd.migrate.balancer import (
    MIB,
    BalancerPolicy,
    HostLoad,
    Move,
    VmLoad,
    assess,
    choose_move,
    grid_load,
    policy_from_settings,
)
from vmwebd.settings import SETTINGS, checked_setting

ON = BalancerPolicy(
    enabled=True, threshold=0.2, hysteresis=0.002, min_residence_ms=600_000, cpu_overcommit=4.0
)
EPS = 1e-9


# -- independent definitions ---------------------------------------------------------------------
def loads_of(
    hosts: dict[str, tuple[int, int]], place: dict[str, str], sizes: dict[str, tuple[int, int]], oc: float
) -> dict[str, float]:
    """Each host's load: share of its busiest resource in use (vCPUs against cpus × oc)."""
    used = {h: [0, 0] for h in hosts}
    for v, h in place.items():
        used[h][0] += sizes[v][0]
        used[h][1] += sizes[v][1]
    return {h: max(used[h][0] / (c * oc), used[h][1] / m) for h, (c, m) in hosts.items()}


def ideal_of(hosts, sizes, oc) -> float:
    return max(
        sum(c for c, _ in sizes.values()) / sum(c * oc for c, _ in hosts.values()),
        sum(m for _, m in sizes.values()) / sum(m for _, m in hosts.values()),
    )


def phi_of(loads: dict[str, float], ideal: float) -> float:
    return sum((x - ideal) ** 2 for x in loads.values())


def host_loads(hosts, place, sizes, dead=(), closed=()) -> list[HostLoad]:
    out = []
    for h, (c, m) in hosts.items():
        mine = [sizes[v] for v, at in place.items() if at == h]
        out.append(
            HostLoad(
                h,
                c,
                m,
                sum(x[0] for x in mine),
                sum(x[1] for x in mine),
                live=h not in dead,
                accepting=h not in closed,
            )
        )
    return out


def vm_loads(place, sizes, overlay=None, moved=None) -> list[VmLoad]:
    return [
        VmLoad(v, h, sizes[v][0], sizes[v][1], (overlay or {}).get(v, 0), (moved or {}).get(v))
        for v, h in place.items()
    ]


def grid(spec: dict[str, tuple[int, int, list[tuple[int, int]]]]):
    """``{host: (cpus, mem_mib, [(vcpus, mem_mib) of its VMs])}`` -> hosts, place, sizes."""
    hosts, place, sizes = {}, {}, {}
    for h, (c, m, vms) in spec.items():
        hosts[h] = (c, m)
        for i, s in enumerate(vms):
            place[f"{h}-v{i}"] = h
            sizes[f"{h}-v{i}"] = s
    return hosts, place, sizes


# -- choose_move: units ---------------------------------------------------------------------------
def lopsided():
    """a: 8 CPUs / 32 GiB with 8 VMs of 2 GiB (load 0.5); b and c empty of the same size (grid 1/6)."""
    return grid({"a": (8, 32768, [(1, 2048)] * 8), "b": (8, 32768, []), "c": (8, 32768, [])})


def test_disabled_never_moves():
    """With the balancer off, even a lopsided grid gets no move."""
    hosts, place, sizes = lopsided()
    assert (
        choose_move(
            "a", host_loads(hosts, place, sizes), vm_loads(place, sizes), BalancerPolicy(enabled=False), 0
        )
        is None
    )


def test_balanced_grid_gets_no_move():
    """Hosts at the same load do not move anything, nor do hosts within the threshold of the grid load."""
    hosts, place, sizes = grid({h: (8, 32768, [(1, 2048)] * 4) for h in "abc"})
    hl, vl = host_loads(hosts, place, sizes), vm_loads(place, sizes)
    assert all(choose_move(h, hl, vl, ON, 0) is None for h in hosts)
    hosts, place, sizes = grid(
        {"a": (8, 32768, [(1, 2048)] * 6), "b": (8, 32768, [(1, 2048)] * 3), "c": (8, 32768, [(1, 2048)] * 3)}
    )  # a at 0.375, grid 0.25: within 0.2
    hl, vl = host_loads(hosts, place, sizes), vm_loads(place, sizes)
    assert all(choose_move(h, hl, vl, ON, 0) is None for h in hosts)


def test_overloaded_host_moves_to_the_least_loaded():
    """The overloaded host moves one VM to the emptier of the other hosts, and says why."""
    hosts, place, sizes = grid(
        {"a": (8, 32768, [(1, 2048)] * 8), "b": (8, 32768, [(1, 2048)] * 2), "c": (8, 32768, [])}
    )
    m = choose_move("a", host_loads(hosts, place, sizes), vm_loads(place, sizes), ON, 0)
    assert m is not None and m.src == "a" and m.dst == "c" and m.vm_id.startswith("a-")
    assert "above grid load" in m.reason
    assert choose_move("b", host_loads(hosts, place, sizes), vm_loads(place, sizes), ON, 0) is None


def test_picks_the_best_benefit_per_cost():
    """Of equal VMs the one with the smallest overlay goes (same benefit, least to copy); a VM twice
    the size goes instead when its benefit grows faster than its cost."""
    hosts, place, sizes = lopsided()
    overlay = {v: (5 if v == "a-v3" else 9) * 10**8 for v in place}
    m = choose_move("a", host_loads(hosts, place, sizes), vm_loads(place, sizes, overlay), ON, 0)
    assert m.vm_id == "a-v3"
    assert m.cost == 5 * 10**8 + 2048 * MIB
    # Now a-v0 is a 4 GiB VM with no overlay to copy: it drops the load twice as far for less than
    # twice the cost of the others.
    sizes["a-v0"] = (2, 4096)
    hl, vl = host_loads(hosts, place, sizes), vm_loads(place, sizes, {**overlay, "a-v0": 0})
    m = choose_move("a", hl, vl, ON, 0)
    assert m.vm_id == "a-v0"
    allowed = [
        x
        for v in vl
        if v.host_id == "a"
        for d in hl
        if d.host_id != "a"
        for x in [assess(v, hl[0], d, grid_load(hl, 4.0), ON, 0)]
        if isinstance(x, Move)
    ]
    assert m.score == max(x.score for x in allowed)


def test_respects_capacity():
    """A destination without room (memory, or vCPUs even with overcommit) is not chosen."""
    # c is the emptiest but has 3 GiB free of 4; b has room.
    hosts, place, sizes = grid(
        {"a": (8, 32768, [(2, 4096)] * 6), "b": (8, 32768, [(1, 2048)] * 3), "c": (1, 4096, [(1, 1024)])}
    )
    m = choose_move("a", host_loads(hosts, place, sizes), vm_loads(place, sizes), ON, 0)
    assert m is not None and m.dst == "b"
    # With only c to go to, nothing moves.
    del hosts["b"]
    place = {v: h for v, h in place.items() if h != "b"}
    sizes = {v: sizes[v] for v in place}
    assert choose_move("a", host_loads(hosts, place, sizes), vm_loads(place, sizes), ON, 0) is None
    # vCPUs: 16 vCPUs on a 2-CPU host with overcommit 4 is too many for one more.
    hl = [HostLoad("a", 8, 32768, 16, 16384, True), HostLoad("d", 2, 65536, 8, 0, True)]
    v = VmLoad("x", "a", 1, 512, 0)
    assert "no room" in assess(v, hl[0], hl[1], 0.1, ON, 0)


def test_respects_liveness_and_accepting():
    """A host the failure detector thinks down, or one that does not accept VMs, gets none."""
    hosts, place, sizes = lopsided()
    vl = vm_loads(place, sizes)
    m = choose_move("a", host_loads(hosts, place, sizes, dead={"b"}), vl, ON, 0)
    assert m.dst == "c"
    m = choose_move("a", host_loads(hosts, place, sizes, closed={"c"}), vl, ON, 0)
    assert m.dst == "b"
    assert choose_move("a", host_loads(hosts, place, sizes, dead={"b"}, closed={"c"}), vl, ON, 0) is None


def test_respects_residence():
    """A VM that moved less than min_residence ago stays; once it has stayed that long it may go."""
    hosts, place, sizes = lopsided()
    hl = host_loads(hosts, place, sizes)
    now = 10_000_000
    moved = {v: now - 1000 for v in place}
    assert choose_move("a", hl, vm_loads(place, sizes, moved=moved), ON, now) is None
    moved["a-v5"] = now - ON.min_residence_ms
    assert choose_move("a", hl, vm_loads(place, sizes, moved=moved), ON, now).vm_id == "a-v5"


def test_deterministic_tie_break():
    """Identical VMs to identical hosts: the smallest VM id goes to the smallest host id, whatever
    the order of the inputs."""
    hosts, place, sizes = lopsided()
    hl, vl = host_loads(hosts, place, sizes), vm_loads(place, sizes)
    m = choose_move("a", hl, vl, ON, 0)
    assert (m.vm_id, m.dst) == ("a-v0", "b")
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(hl)
        rng.shuffle(vl)
        assert choose_move("a", hl, vl, ON, 0) == m


def test_hysteresis_refuses_crumbs():
    """A move whose gain is below the hysteresis is not made, though it would help a little."""
    # a is just overloaded (0.703 > 0.495 + 0.2); b, the only open host, is just under the cap.
    hosts, place, sizes = grid(
        {
            "a": (16, 65536, [(1, 1024)] * 45),
            "b": (16, 65536, [(1, 1024)] * 41),
            "c": (16, 65536, [(1, 1024)] * 9),
        }
    )
    hl, vl = host_loads(hosts, place, sizes, closed={"c"}), vm_loads(place, sizes)
    small = choose_move("a", hl, vl, BalancerPolicy(enabled=True, threshold=0.2, hysteresis=0.0001), 0)
    assert small is not None and small.dst == "b" and small.benefit < 0.002
    assert choose_move("a", hl, vl, BalancerPolicy(enabled=True, threshold=0.2, hysteresis=0.002), 0) is None


def test_much_less_loaded_host_draws_from_a_host_above_the_grid_load():
    """A host only a little above the grid load still gives to a host far below it (second clause),
    and only up to the grid load."""
    hosts, place, sizes = grid(
        {"a": (8, 32768, [(1, 2048)] * 7), "b": (8, 32768, [(1, 2048)] * 7), "c": (8, 32768, [(1, 2048)] * 1)}
    )  # grid 0.3125; a, b 0.4375; c 0.0625
    m = choose_move("a", host_loads(hosts, place, sizes), vm_loads(place, sizes), ON, 0)
    assert m is not None and m.dst == "c" and "below grid load" in m.reason


def test_receivers_are_capped_and_senders_floored():
    """The bounds the no-return argument rests on, each refusing a move that every other check
    passes: an overloaded host's receiver stays at or under M + θ; a much less loaded receiver at or
    under M; a sender at or over M − θ."""
    v = VmLoad("x", "s", 1, 1000, 0)
    # Overloaded s (0.75 > 0.3 + 0.2): d at 0.5 would reach 0.5625 > 0.5; at 0.4375 it may take x.
    s = HostLoad("s", 4, 16000, 1, 12000, True)
    assert "above 0.500" in assess(v, s, HostLoad("d", 4, 16000, 0, 8000, True), 0.3, ON, 0)
    assert isinstance(assess(v, s, HostLoad("d", 4, 16000, 0, 7000, True), 0.3, ON, 0), Move)
    # s at 0.69 is above M = 0.5 but not overloaded; d at 0.29 is much less loaded, and would end at
    # 0.59: under M + θ and under s (0.65), but above M.
    v = VmLoad("x", "s", 1, 3000, 0)
    s = HostLoad("s", 16, 75000, 1, 51750, True)
    assert "above 0.500" in assess(v, s, HostLoad("d", 4, 10000, 0, 2900, True), 0.5, ON, 0)
    assert isinstance(assess(v, s, HostLoad("d", 4, 10000, 0, 1900, True), 0.5, ON, 0), Move)
    # Overloaded s (0.8 > 0.5 + 0.2) would drop to 0.2 < 0.3 by giving its 6000 MiB VM to an empty
    # big host (ending at 0.15): refused, though it lowers Φ a lot. A 4000 MiB VM may go.
    s = HostLoad("s", 4, 10000, 1, 8000, True)
    d = HostLoad("d", 16, 40000, 0, 0, True)
    assert "below 0.300" in assess(VmLoad("x", "s", 1, 6000, 0), s, d, 0.5, ON, 0)
    assert isinstance(assess(VmLoad("y", "s", 1, 4000, 0), s, d, 0.5, ON, 0), Move)


def test_in_flight_moves_count():
    """A host busy with max_concurrent migrations starts no other; a VM already moving is not chosen
    again; the loads count moves in flight as done."""
    hosts, place, sizes = lopsided()
    hl, vl = host_loads(hosts, place, sizes), vm_loads(place, sizes)
    first = choose_move("a", hl, vl, ON, 0)
    assert choose_move("a", hl, vl, ON, 0, in_flight=[first]) is None
    two = BalancerPolicy(enabled=True, max_concurrent=2)
    second = choose_move("a", hl, vl, two, 0, in_flight=[first])
    assert second.vm_id != first.vm_id and second.dst == "c"  # b counts as one VM fuller


def test_policy_checks_its_fields():
    """A policy out of range names the field."""
    for kw, field in [
        ({"threshold": 1.5}, "threshold"),
        ({"hysteresis": 0}, "hysteresis"),
        ({"min_residence_ms": -1}, "min_residence_ms"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"cpu_overcommit": 0.5}, "cpu_overcommit"),
    ]:
        with pytest.raises(InvalidArgument, match=field):
            BalancerPolicy(**kw)


# -- settings -------------------------------------------------------------------------------------
def test_balancer_settings_are_defined_with_defaults():
    """The balancer's settings exist, off by default, and the defaults make the default policy."""
    assert {"balancer.enabled", "balancer.threshold", "balancer.interval", "balancer.min-residence"} <= set(
        SETTINGS
    )
    p = policy_from_settings({})
    assert p == BalancerPolicy(
        enabled=False, threshold=0.2, min_residence_ms=1_800_000, interval_ms=60_000, cpu_overcommit=4.0
    )


def test_policy_from_settings_reads_every_key():
    """Each setting reaches its policy field, in the policy's units."""
    p = policy_from_settings(
        {
            "balancer.enabled": "true",
            "balancer.threshold": "0.1",
            "balancer.interval": "30",
            "balancer.min-residence": "90.5",
            "cpu_overcommit": "2",
        }
    )
    assert (p.enabled, p.threshold, p.interval_ms, p.min_residence_ms, p.cpu_overcommit) == (
        True,
        0.1,
        30_000,
        90_500,
        2.0,
    )


@pytest.mark.parametrize(
    "key,value",
    [
        ("balancer.enabled", "yes"),
        ("balancer.threshold", "1.5"),
        ("balancer.threshold", "-0.1"),
        ("balancer.threshold", "lots"),
        ("balancer.interval", "0"),
        ("balancer.min-residence", "-5"),
    ],
)
def test_bad_balancer_settings_name_the_key(key, value):
    """SetSetting, and the policy built from settings, refuse a bad value with an error naming the key."""
    with pytest.raises(InvalidArgument, match=key):
        checked_setting(key, value)
    with pytest.raises(InvalidArgument, match=key):
        policy_from_settings({key: value})


# -- choose_move: properties over random grids ----------------------------------------------------
SHAPE = st.tuples(st.integers(1, 4), st.sampled_from([512, 1024, 2048, 4096, 8192]))
HOST = st.tuples(st.sampled_from([2, 4, 8, 16]), st.sampled_from([1024, 2048, 4096, 8192]))


@st.composite
def random_grids(draw):
    """Hosts of mixed sizes and CPU:memory ratios, VMs of mixed shapes placed anywhere they fit
    (mostly on the first hosts), some hosts down or closed, some VMs recently moved."""
    specs = draw(st.lists(HOST, min_size=2, max_size=7))
    hosts = {f"h{i}": (c, c * mpc) for i, (c, mpc) in enumerate(specs)}
    oc = draw(st.sampled_from([1.0, 2.0, 4.0]))
    shapes = draw(st.lists(SHAPE, min_size=1, max_size=40))
    bias = draw(st.integers(1, len(hosts)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    used = {h: [0, 0] for h in hosts}
    place, sizes = {}, {}
    for i, (c, m) in enumerate(shapes):
        order = list(hosts)[:bias] + rng.sample(list(hosts), len(hosts))
        for h in order:
            if used[h][0] + c <= hosts[h][0] * oc and used[h][1] + m <= hosts[h][1]:
                used[h][0] += c
                used[h][1] += m
                place[f"v{i:02d}"], sizes[f"v{i:02d}"] = h, (c, m)
                break
    dead = {h for h in hosts if draw(st.booleans()) and rng.random() < 0.2}
    closed = {h for h in hosts if rng.random() < 0.1}
    moved = {v: rng.choice([None, 0, 9_000_000]) for v in place}
    overlay = {v: rng.randrange(0, 4 * 10**9) for v in place}
    policy = BalancerPolicy(
        enabled=True,
        threshold=draw(st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.4])),
        hysteresis=draw(st.sampled_from([0.0005, 0.002, 0.01])),
        min_residence_ms=1_000_000,
        cpu_overcommit=oc,
    )
    return hosts, place, sizes, dead, closed, moved, overlay, policy


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(random_grids())
def test_every_chosen_move_obeys_the_rule_on_the_true_state(g):
    """Whatever host decides on a random grid, its move (if any) is one of its own resident VMs to a
    live, accepting host with room, lowers Φ by at least the hysteresis, keeps the destination
    below the source, and is the best benefit per cost of all moves the rule allows."""
    hosts, place, sizes, dead, closed, moved, overlay, policy = g
    now = 10_000_000
    hl, vl = host_loads(hosts, place, sizes, dead, closed), vm_loads(place, sizes, overlay, moved)
    oc = policy.cpu_overcommit
    ideal = ideal_of(hosts, sizes, oc) if sizes else 0.0
    before = loads_of(hosts, place, sizes, oc)
    for me in hosts:
        m = choose_move(me, hl, vl, policy, now)
        if m is None:
            continue
        assert m.src == me and place[m.vm_id] == me
        assert m.dst not in dead and m.dst not in closed and m.dst != me
        assert moved[m.vm_id] is None or now - moved[m.vm_id] >= policy.min_residence_ms
        after_place = {**place, m.vm_id: m.dst}
        after = loads_of(hosts, after_place, sizes, oc)
        c, mem = sizes[m.vm_id]
        assert sum(sizes[v][0] for v, h in after_place.items() if h == m.dst) <= hosts[m.dst][0] * oc
        assert sum(sizes[v][1] for v, h in after_place.items() if h == m.dst) <= hosts[m.dst][1]
        drop = phi_of(before, ideal) - phi_of(after, ideal)
        assert drop >= policy.hysteresis - EPS
        assert abs(drop - m.benefit) < EPS
        assert after[m.dst] < after[me] < before[me]
        assert m.cost == overlay[m.vm_id] + mem * MIB
        mine = next(h for h in hl if h.host_id == me)
        allowed = [
            x
            for v in vl
            if v.host_id == me
            for d in hl
            for x in [assess(v, mine, d, grid_load(hl, oc), policy, now)]
            if isinstance(x, Move)
        ]
        assert m.score == max(x.score for x in allowed)


# -- the simulator --------------------------------------------------------------------------------
def no_return(report) -> None:
    """No VM ever arrives at a host it has left (A→B→A, A→B→C→A)."""
    left = defaultdict(set)
    for m in sorted(report.completed, key=lambda m: m.end_s):
        assert m.dst not in left[m.vm_id], f"{m.vm_id} went back to {m.dst}"
        left[m.vm_id].add(m.src)


def bands(report, policy) -> None:
    """Every finished move left its destination at or under M + θ and its source at or over M − θ
    (the bounds the no-return argument rests on), on the true loads, moves in flight or not."""
    m, th = report.grid_load, policy.threshold
    for x in report.completed:
        assert x.dst_load <= m + th + EPS and x.src_load >= m - th - EPS, x


def one_mover(report, policy) -> None:
    """No two migrations of one VM overlap in time, and no host takes part in more than
    max_concurrent migrations at once."""
    by_vm = defaultdict(list)
    for m in report.migrations:
        by_vm[m.vm_id].append((m.start_s, m.end_s))
    for spans in by_vm.values():
        spans.sort()
        for (_, e1), (s2, _) in zip(spans, spans[1:]):
            assert e1 <= s2
    events = sorted(
        (t, d, h)
        for m in report.migrations
        for h in (m.src, m.dst)
        for t, d in ((m.start_s, 1), (m.end_s, -1))
    )  # at equal times, ends (-1) first
    running = defaultdict(int)
    for _, d, h in events:
        running[h] += d
        assert running[h] <= policy.max_concurrent, h


def potential_bound(report, policy) -> None:
    """Each finished move lowered the true Φ by at least the hysteresis, hence the count bound."""
    for m in report.completed:
        assert m.phi_before - m.phi_after >= policy.hysteresis - EPS, m
    assert len(report.completed) * policy.hysteresis <= report.phi_start - report.phi_end + EPS
    assert len(report.completed) <= report.phi_start / policy.hysteresis + EPS


@st.composite
def sim_cases(draw, crashes=False):
    specs = draw(st.lists(HOST, min_size=2, max_size=6))
    hosts = [SimHost(f"h{i}", c, c * mpc) for i, (c, mpc) in enumerate(specs)]
    n_start = draw(st.integers(1, 2))
    load = draw(st.floats(0.15, 0.7))
    rng = random.Random(draw(st.integers(0, 2**32)))
    cap = {h.id: [h.cpus * 4, h.mem_mib] for h in hosts}
    goal = load * sum(h.mem_mib for h in hosts)
    vms, total = [], 0
    while total < goal and len(vms) < 60:
        c, m = rng.choice([(1, 512), (1, 1024), (2, 2048), (2, 4096), (4, 4096), (4, 8192)])
        order = [h.id for h in hosts[:n_start]] + [h.id for h in hosts[n_start:]]
        for h in order:
            if cap[h][0] >= c and cap[h][1] >= m:
                cap[h][0] -= c
                cap[h][1] -= m
                vms.append(SimVm(f"v{len(vms):02d}", h, c, m, rng.randrange(0, 3 * 10**9)))
                break
        total += m
    policy = BalancerPolicy(
        enabled=True,
        threshold=draw(st.sampled_from([0.05, 0.1, 0.2, 0.3])),
        hysteresis=draw(st.sampled_from([0.001, 0.002, 0.005])),
        min_residence_ms=draw(st.sampled_from([0, 60_000, 1_800_000])),
        max_concurrent=draw(st.sampled_from([1, 2])) if crashes else 1,
        interval_ms=60_000,
        cpu_overcommit=4.0,
    )
    params = SimParams(
        gossip_delay_s=(0.5, draw(st.sampled_from([1.0, 30.0, 300.0]))),
        fail_rate=draw(st.sampled_from([0.0, 0.1, 0.5])),
        crashes=tuple((draw(st.floats(0, 3600)), h.id) for h in hosts[1:] if crashes and rng.random() < 0.3),
    )
    return hosts, vms, policy, params, draw(st.integers(0, 2**32))


@pytest.mark.property
@settings(max_examples=100, deadline=None)
@given(sim_cases())
def test_simulated_grid_balances_within_the_potential_bound(case):
    """From a packed start, with stale views and failing migrations, the grid goes quiet (no host
    has a move left, even once residences end) after at most Φ₀ / hysteresis migrations, each of
    which lowered the true Φ by the hysteresis; no VM goes back to a host it left, none moves twice
    at once, and every VM ends on exactly one host."""
    hosts, vms, policy, params, seed = case
    sim = BalanceSim(hosts, vms, policy, params, seed=seed)
    r = sim.run()
    assert r.quiet and sim.no_move_possible()
    potential_bound(r, policy)
    bands(r, policy)
    no_return(r)
    one_mover(r, policy)
    assert sorted(v for h in sim.runs.values() for v in h) == sorted(v.id for v in vms)
    # the end state seen from outside the simulator: loads and Φ as defined
    hd = {h.id: (h.cpus, h.mem_mib) for h in hosts}
    sizes = {v.id: (v.vcpus, v.mem_mib) for v in vms}
    if vms:
        ideal = ideal_of(hd, sizes, 4.0)
        end = loads_of(hd, dict(sim.loc), sizes, 4.0)
        assert abs(phi_of(end, ideal) - r.phi_end) < EPS and abs(ideal - r.grid_load) < EPS


@pytest.mark.property
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 8),
    cpus=st.sampled_from([8, 16]),
    load=st.floats(0.1, 0.6),
    threshold=st.sampled_from([0.15, 0.2, 0.3]),
    fail=st.sampled_from([0.0, 0.2]),
    delay=st.sampled_from([1.0, 120.0]),
    n_start=st.integers(1, 2),
    seed=st.integers(0, 2**32),
)
def test_equal_hosts_end_within_the_threshold_band(n, cpus, load, threshold, fail, delay, n_start, seed):
    """Equal hosts and VMs small beside them (each at most half the threshold of a host, at least
    hysteresis / threshold): the grid ends with every host within the threshold of the grid load,
    so max − min ≤ 2 × threshold.

    Why: a host above M + θ could give any VM to the least loaded host (≤ M): it stays ≤ M + θ, the
    source ≥ M, the destination below the source, and Φ drops by 2a(x − y − a) ≥ aθ ≥ hysteresis;
    likewise a host below M − θ could take any VM from the most loaded (> M). A quiet grid has no
    such move, so it has no such host."""
    rng = random.Random(seed)
    hosts = [SimHost(f"h{i}", cpus, cpus * 4096) for i in range(n)]
    cap = {h.id: cpus * 4 for h in hosts}  # 1 GiB per vCPU: memory and CPU loads agree
    vms, goal = [], load * n * cpus * 4
    while sum(v.vcpus for v in vms) < goal:
        c = rng.choice([1, 2])
        h = next((h.id for h in hosts[:n_start] if cap[h.id] >= c), None) or next(
            (h.id for h in hosts if cap[h.id] >= c)
        )
        cap[h] -= c
        vms.append(SimVm(f"v{len(vms):03d}", h, c, 1024 * c, rng.randrange(0, 2 * 10**9)))
    policy = BalancerPolicy(enabled=True, threshold=threshold, hysteresis=0.002, cpu_overcommit=4.0)
    assert 2 / (cpus * 4) <= threshold / 2 and 1 / (cpus * 4) * threshold >= policy.hysteresis
    r = BalanceSim(
        hosts, vms, policy, SimParams(fail_rate=fail, gossip_delay_s=(0.5, delay)), seed=seed
    ).run()
    assert r.quiet
    m = r.grid_load
    assert max(r.loads_end.values()) <= m + threshold + EPS
    assert min(r.loads_end.values()) >= m - threshold - EPS
    assert r.spread_end() <= 2 * threshold + EPS
    potential_bound(r, policy)
    no_return(r)


@settings(max_examples=100, deadline=None)
@given(sim_cases(crashes=True))
def test_crashes_and_failures_lose_no_vm_and_send_none_back(case):
    """With hosts crashing, migrations failing half the time and two migrations per host at once,
    every VM is on exactly one host after every event (the simulator checks), no VM moves twice at
    once, none goes back to a host it left, so none visits more hosts than there are."""
    hosts, vms, policy, params, seed = case
    sim = BalanceSim(hosts, vms, policy, params, seed=seed)
    r = sim.run()  # raises SimInvariantError on a VM on two hosts or none, or a lease mismatch
    assert r.quiet
    bands(r, policy)
    no_return(r)
    one_mover(r, policy)
    assert sorted(v for h in sim.runs.values() for v in h) == sorted(v.id for v in vms)
    for h in sim.crashed:
        assert all(sim.loc[v] == h for v in sim.runs[h])
    per_vm = defaultdict(int)
    for m in r.completed:
        per_vm[m.vm_id] += 1
    assert all(k <= len(hosts) - 1 for k in per_vm.values())
    if policy.max_concurrent == 1:
        potential_bound(r, policy)


@pytest.mark.parametrize("seed", range(12))
def test_concurrent_arrivals_count_against_the_cap(seed):
    """Three overloaded hosts, one host with room for exactly one more VM, three migrations allowed
    at once: the destination counts the moves already coming to it, so it takes one VM and stays
    under M + θ, however the three proposals overlap."""
    hosts = [SimHost(f"s{i}", 16, 65536) for i in range(3)] + [
        SimHost("d", 16, 65536),
        SimHost("e", 64, 262144),
    ]
    counts = {"s0": 24, "s1": 24, "s2": 24, "d": 21, "e": 35}  # loads 0.75 ×3, 0.656, 0.273; M = 0.5
    vms = [SimVm(f"{h}-{i}", h, 1, 2048, 10**8) for h, n in counts.items() for i in range(n)]
    policy = BalancerPolicy(enabled=True, threshold=0.2, max_concurrent=3)
    # e is down from the start: it counts in M but takes nothing.
    r = BalanceSim(hosts, vms, policy, SimParams(crashes=((0.0, "e"),)), seed=seed).run()
    assert r.quiet
    bands(r, policy)
    assert [m.dst for m in r.completed] == ["d"]
    assert r.loads_end["d"] == 22 / 32


def test_crashed_host_keeps_its_vms_and_gets_none():
    """A host that crashes keeps its VMs (nobody else moves them) and receives none afterwards; the
    moves in flight to or from it fail."""
    hosts, vms = packed_grid(4, 0.4, seed=3)
    policy = BalancerPolicy(enabled=True)
    sim = BalanceSim(hosts, vms, policy, SimParams(crashes=((200.0, "h00"), (200.0, "h03"))), seed=3)
    r = sim.run()
    kept = {v.id for v in vms if v.host == "h00"} - {m.vm_id for m in r.completed if m.end_s < 200.0}
    assert kept and all(sim.loc[v] == "h00" for v in kept)
    assert not [m for m in r.completed if m.end_s > 200.0 and "h03" in (m.src, m.dst)]
    assert not [m for m in r.completed if m.end_s > 200.0 and m.src == "h00"]
    assert r.quiet and r.live_end == {"h01", "h02"}


def test_a_held_lease_keeps_the_vm_in_place():
    """While someone else holds a VM's migration lease, the balancer does not move that VM, and
    moves others instead."""
    hosts = [SimHost("a", 8, 32768), SimHost("b", 8, 32768)]
    vms = [
        SimVm("v1", "a", 1, 8192, 0),
        SimVm("v2", "a", 1, 8192, 10**9),
        SimVm("v3", "a", 1, 8192, 2 * 10**9),
    ]
    sim = BalanceSim(hosts, vms, BalancerPolicy(enabled=True), SimParams(max_time_s=3600), seed=1)
    sim.leases["migration/v1"] = "user:admin"
    r = sim.run()
    assert r.lease_busy > 0
    assert sim.loc["v1"] == "a"
    assert [m.vm_id for m in r.completed] == ["v2"]


def test_invariant_check_catches_a_doubled_or_lost_vm():
    """The simulator's own check is not vacuous: a VM on two hosts, or on none, is reported."""
    hosts, vms = packed_grid(3, 0.3, seed=1)
    sim = BalanceSim(hosts, vms, BalancerPolicy(enabled=True), seed=1)
    v = vms[0].id
    sim.runs["h01"].add(v)
    with pytest.raises(SimInvariantError, match="several hosts"):
        sim._check()
    sim.runs["h01"].discard(v)
    sim.runs[vms[0].host].discard(v)
    with pytest.raises(SimInvariantError, match="none"):
        sim._check()


def test_same_seed_same_run():
    """The simulator is deterministic: the same seed gives the same migrations at the same times."""
    hosts, vms = packed_grid(6, 0.5, seed=4)
    policy = BalancerPolicy(enabled=True)
    runs = [BalanceSim(hosts, vms, policy, SimParams(fail_rate=0.2), seed=9).run() for _ in range(2)]
    assert runs[0].migrations == runs[1].migrations and runs[0].migrations


def test_three_heterogeneous_hosts_figures():
    """The doc's 3-host case (16/8/4 CPUs, half full, packed onto the big one) balances in a few
    migrations to within the threshold band."""
    policy = BalancerPolicy(enabled=True)
    hosts, vms = packed_grid(3, 0.5, seed=0)
    r = BalanceSim(hosts, vms, policy, seed=0).run()
    assert r.quiet and r.spread_start() > 0.8
    assert r.spread_end() <= 2 * policy.threshold
    assert len(r.completed) <= r.phi_start / policy.hysteresis
    no_return(r)
