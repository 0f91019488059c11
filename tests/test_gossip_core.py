"""The peer protocol core driven by hand (no simulator), and the DOM's bounded anti-entropy delta."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmwebd.dom.document import Dom, _part_children, entity_bytes
from vmwebd.dom.hlc import HybridClock, Version
from vmwebd.dom.records import NS, VClusterRec
from vmwebd.gossip.broadcast import BroadcastQueue
from vmwebd.gossip.codec import decode, encode
from vmwebd.gossip.core import (
    ALIVE,
    DEAD,
    LAN,
    LEFT,
    LOCAL_TEST,
    SUSPECT,
    Awareness,
    GossipConfig,
    GossipCore,
    Suspicion,
    suspicion_timeout_after,
)
from vmwebd.gossip.domport import DomPortAdapter
from vmwebd.gossip.messages import (
    PROTOCOL_VERSION,
    Ack,
    Envelope,
    Gossip,
    MemberState,
    Ping,
    PingReq,
    ProbeNack,
)

Q = "{%s}" % NS
CFG = GossipConfig(
    probe_interval=1.0,
    probe_timeout=0.5,
    indirect_checks=3,
    suspicion_mult=4,
    gossip_interval=0.2,
    fanout=3,
    retransmit_mult=4,
    sync_interval=1000.0,
)


class Net:
    """A handful of cores wired by hand: we decide which envelope is delivered, and when."""

    def __init__(self, ids, now=0.0, cfg=CFG):
        self.now = now
        self.cores = {}
        for i, hid in enumerate(ids):
            dom = Dom(HybridClock(hid, lambda: int(self.now * 1000)))
            self.cores[hid] = GossipCore(
                hid, hid, cfg, random.Random(i), DomPortAdapter(dom, validate=False), now
            )
        # everyone knows everyone (as after a join), without any traffic
        for c in self.cores.values():
            for other in ids:
                if other != c.me:
                    c.receive(
                        Envelope(
                            other, other, c.me, Gossip(), members=(MemberState(other, other, 0, ALIVE),)
                        ),
                        now,
                    )
        for c in self.cores.values():  # forget the join rumors so tests see only their own traffic
            c.queue = BroadcastQueue(cfg.retransmit_mult)

    def deliver(self, out, drop_to=()):
        """Delivers every send of ``out`` (except to ``drop_to``), then what those answers send, etc."""
        pending = list(out.sends)
        seen = []
        while pending:
            s = pending.pop(0)
            seen.append(s)
            if s.addr in drop_to or s.addr not in self.cores:
                continue
            pending += self.cores[s.addr].receive(s.envelope, self.now).sends
        return seen


def of_kind(sends, kind):
    return [s for s in sends if isinstance(s.envelope.msg, kind)]


def tick_until(core, t_end, step=0.05, start=None):
    """Ticks one core on a 50 ms grid; returns every Output."""
    outs = []
    t = start if start is not None else 0.0
    while t <= t_end + 1e-9:
        outs.append(core.tick(t))
        t = round(t + step, 6)
    return outs


def test_ping_is_answered_with_ack_and_clears_the_probe():
    """A probe's Ping reaches its target, whose Ack marks the probe done and nobody is suspected."""
    net = Net(["a", "b"])
    a = net.cores["a"]
    out = a.tick(1.0)  # the first probe starts within one probe interval
    pings = of_kind(out.sends, Ping)
    assert [(p.dst, p.envelope.msg.target) for p in pings] == [("b", "b")]
    sent = net.deliver(out)
    acks = of_kind(sent, Ack)
    assert len(acks) == 1 and acks[0].dst == "a" and acks[0].envelope.msg.seq == pings[0].envelope.msg.seq
    assert a._probe.acked
    changes = []
    t = 1.05
    while t < 10.0:  # keep answering a's later probes, each as soon as it is sent
        o = a.tick(t)
        changes += o.changes
        net.deliver(o)
        t = round(t + 0.05, 6)
    assert changes == [] and a.status_of("b") == ALIVE


def test_probe_timeout_sends_pingreq_and_a_forwarded_ack_clears_it():
    """No direct Ack within probe_timeout: PingReq goes to k helpers, and one's forwarded Ack clears it."""
    net = Net(["a", "b", "c", "d", "e"])
    a = net.cores["a"]
    t = 0.0
    while a._probe is None:
        out = a.tick(t)
        t = round(t + 0.05, 6)
    target = a._probe.target
    net.deliver(out, drop_to={target})  # the direct Ping is lost
    assert not a._probe.acked
    out = a.tick(a._probe.started + CFG.probe_timeout)
    reqs = of_kind(out.sends, PingReq)
    helpers = {s.dst for s in reqs}
    assert len(reqs) == CFG.indirect_checks and target not in helpers and "a" not in helpers
    assert all(s.envelope.msg.target == target and s.envelope.msg.target_addr == target for s in reqs)
    # one helper reaches the target; its Ack comes back to a as Ack(a's seq, target)
    first = reqs[0]
    sent = net.deliver(type(out)(sends=[first]))
    fwd = [s for s in of_kind(sent, Ack) if s.dst == "a"]
    assert len(fwd) == 1 and fwd[0].envelope.msg.seq == a._probe.seq
    assert fwd[0].envelope.msg.target == target and fwd[0].envelope.src == first.dst
    assert a._probe.acked
    assert not a.tick(a._probe.started + CFG.probe_interval).changes
    assert a.status_of(target) == ALIVE


def test_no_ack_means_suspect_then_dead_after_suspicion_timeout():
    """A target that answers nothing is suspected after one period and declared dead after the timeout."""
    net = Net(["a", "b"])
    a = net.cores["a"]
    n = len(a.members)
    changes = []
    t = 0.0
    suspected_at = dead_at = None
    while dead_at is None and t < 60:
        out = a.tick(t)  # nothing is ever delivered
        for ch in out.changes:
            changes.append(ch)
            if ch == ("b", ALIVE, SUSPECT):
                suspected_at = t
            if ch == ("b", SUSPECT, DEAD):
                dead_at = t
        t = round(t + 0.05, 6)
    assert changes == [("b", ALIVE, SUSPECT), ("b", SUSPECT, DEAD)]
    assert suspected_at <= CFG.probe_interval * 2 + 0.05
    timeout = CFG.suspicion_timeout(n)
    assert timeout - 1e-6 <= dead_at - suspected_at <= timeout + 0.05 + 1e-6
    # it is no longer probed, and the dead rumor is queued for spreading
    assert a.alive() == ["a"]
    assert any(
        isinstance(p, MemberState) and p.status == DEAD for p in (i.payload for i in a.queue._items.values())
    )


def test_suspected_host_refutes_with_higher_incarnation():
    """A host that hears itself suspected raises its incarnation and spreads alive, which others accept."""
    net = Net(["a", "b", "c"])
    a, b = net.cores["a"], net.cores["b"]
    out = a.receive(Envelope("c", "c", "a", Gossip(), members=(MemberState("a", "a", 0, SUSPECT),)), 0.0)
    assert a.incarnation == 1 and a.status_of("a") == ALIVE
    assert not out.changes
    # b believes the suspicion (from c), then hears a's refutation piggybacked on a's next message
    b.receive(Envelope("c", "c", "b", Gossip(), members=(MemberState("a", "a", 0, SUSPECT),)), 0.0)
    assert b.status_of("a") == SUSPECT
    out = a.tick(2.0)
    carried = [m for s in out.sends for m in s.envelope.members if m.node == "a"]
    assert carried and all(m == MemberState("a", "a", 1, ALIVE) for m in carried)
    out = b.receive(
        out.sends[0].envelope
        if out.sends[0].dst == "b"
        else Envelope("a", "a", "b", Gossip(), members=(carried[0],)),
        2.0,
    )
    assert b.status_of("a") == ALIVE and b.members["a"].incarnation == 1
    assert ("a", SUSPECT, ALIVE) in out.changes


def test_declared_dead_host_refutes_too_and_stale_rumors_do_not_override():
    """Hearing itself dead also makes a host refute; an older suspicion cannot undo the newer alive."""
    net = Net(["a", "b"])
    a, b = net.cores["a"], net.cores["b"]
    a.receive(Envelope("b", "b", "a", Gossip(), members=(MemberState("a", "a", 0, DEAD),)), 0.0)
    assert a.incarnation == 1
    b.receive(Envelope("a", "a", "b", Gossip(), members=(MemberState("a", "a", 1, ALIVE),)), 0.0)
    b.receive(Envelope("x", "x", "b", Gossip(), members=(MemberState("a", "a", 0, SUSPECT),)), 0.0)
    b.receive(Envelope("x", "x", "b", Gossip(), members=(MemberState("a", "a", 0, DEAD),)), 0.0)
    assert b.status_of("a") == ALIVE and b.members["a"].incarnation == 1


def test_leave_spreads_left_to_peers():
    """A clean leave raises the incarnation, goes 'left', and peers that hear it record 'left'."""
    net = Net(["a", "b", "c", "d"])
    a = net.cores["a"]
    out = a.leave(5.0)
    assert a.status_of("a") == LEFT
    assert {s.dst for s in out.sends} == {"b", "c", "d"}
    for s in out.sends:
        assert MemberState("a", "a", 1, LEFT) in s.envelope.members
        got = net.cores[s.dst].receive(s.envelope, 5.0)
        assert ("a", ALIVE, LEFT) in got.changes
        assert net.cores[s.dst].status_of("a") == LEFT
        assert "a" not in net.cores[s.dst].alive()
    # a left host does not refute a later 'dead' about itself
    a.receive(Envelope("b", "b", "a", Gossip(), members=(MemberState("a", "a", 5, DEAD),)), 6.0)
    assert a.status_of("a") == LEFT and a.incarnation == 1


def test_rumor_is_sent_exactly_retransmit_limit_times():
    """A local change is piggybacked on exactly limit(n) messages, then dropped from the queue."""
    net = Net(["a", "b", "c", "d", "e", "f"])
    a = net.cores["a"]
    el = a.dom.dom.put(VClusterRec(id="c1", owner="alice"))
    outs = [a.local_changes([el], 0.0)]
    outs += tick_until(a, 30.0)
    carrying = [s for o in outs for s in o.sends if any(e.get("id") == "c1" for e in s.envelope.entities)]
    limit = a.queue.limit(len(a.members))
    assert limit == CFG.retransmit_mult * 1  # ceil(log10(6 + 1)) == 1
    assert len(carrying) == limit
    assert len(of_kind(outs[0].sends, Gossip)) == CFG.fanout  # pushed at once to fanout peers
    assert not [k for k in a.queue._items if k[0] == "e"]


def test_broadcast_queue_replaces_and_prefers_least_sent():
    """A newer rumor with the same key replaces the old (count restarts); least-sent go first."""
    q = BroadcastQueue(retransmit_mult=2)
    assert q.limit(9) == 2 and q.limit(10) == 4 and q.limit(1000) == 8
    q.put(("m", "x"), "x0", 10)
    assert q.take(100, 9) == ["x0"]
    q.put(("m", "y"), "y0", 10)
    assert q.take(15, 9) == ["y0"]  # y was never sent: it goes first; x does not fit
    q.put(("m", "x"), "x1", 10)  # replaces x0, count restarts
    assert sorted(q.take(100, 9)) == ["x1", "y0"]
    assert q.take(100, 9) == ["x1"]  # y0 reached its limit of 2
    assert len(q) == 0


def test_newer_protocol_version_is_ignored():
    """An envelope from a newer protocol version changes nothing and is not answered."""
    net = Net(["a", "b"])
    a = net.cores["a"]
    env = Envelope(
        "b", "b", "a", Ping(7, "a"), members=(MemberState("z", "z", 0, ALIVE),), version=PROTOCOL_VERSION + 1
    )
    out = a.receive(env, 0.0)
    assert not out.sends and not out.changes and a.status_of("z") is None


def test_envelope_for_another_host_id_is_ignored():
    """An envelope addressed to another host id (a former owner of this address) is ignored."""
    net = Net(["a", "b"])
    a = net.cores["a"]
    out = a.receive(
        Envelope("b", "b", "old-a", Ping(7, "old-a"), members=(MemberState("z", "z", 0, ALIVE),)), 0.0
    )
    assert not out.sends and a.status_of("z") is None
    # but one with no destination id (sent to a seed address) is taken
    out = a.receive(Envelope("b", "b", None, Ping(8, "a")), 0.0)
    assert len(of_kind(out.sends, Ack)) == 1


# -- Lifeguard: local health, dynamic suspicion, buddy system, nacks -----------------------------
@given(mult=st.integers(1, 12), deltas=st.lists(st.integers(-5, 5), max_size=60), base=st.floats(0.01, 10.0))
def test_awareness_score_stays_in_range_and_scales_timeouts(mult, deltas, base):
    """The health score is the clamped running sum of its deltas, always within 0 .. max - 1, and
    scales a timeout by score + 1; a multiplier of 1 keeps it at 0 (Lifeguard off)."""
    a = Awareness(mult)
    model = 0
    for d in deltas:
        a.apply(d)
        model = min(mult - 1, max(0, model + d))
        assert a.score == model and 0 <= a.score <= mult - 1
        assert a.scale(base) == base * (a.score + 1)
        assert base <= a.scale(base) <= mult * base
    if mult == 1:
        assert a.score == 0


@given(k=st.integers(-1, 10), lo=st.floats(0.1, 50.0), mult=st.floats(1.0, 10.0), c=st.integers(0, 15))
def test_suspicion_timeout_shrinks_with_confirmations_between_min_and_max(k, lo, mult, c):
    """The timeout is max with no confirmation, never grows with more, reaches min at k, and stays
    within [min, max]; with nothing to wait for (k < 1) it is min."""
    hi = lo * mult
    t = suspicion_timeout_after(c, k, lo, hi)
    assert lo <= t <= hi
    assert suspicion_timeout_after(c + 1, k, lo, hi) <= t
    if k < 1:
        assert t == lo
    else:
        assert suspicion_timeout_after(0, k, lo, hi) == hi
        assert abs(suspicion_timeout_after(k, k, lo, hi) - lo) < 1e-9
        if c >= k:
            assert abs(t - lo) < 1e-9
        if 0 < c < k and hi - lo > 1e-6 * hi:
            # strictly between, where min and max are more than rounding apart
            assert lo < t < hi


def test_suspicion_timeouts_of_the_presets():
    """LAN, 8 hosts: 4 s once confirmed, 24 s unconfirmed, 11.4 s after one of the two confirmations."""
    assert LAN.suspicion_timeout(8) == 4.0 and LAN.suspicion_max_timeout(8) == 24.0
    assert LAN.suspicion_confirmations(8) == 2 and LAN.suspicion_confirmations(3) == 0
    assert abs(suspicion_timeout_after(1, 2, 4.0, 24.0) - (24 - 20 * 0.6309297535714574)) < 1e-9
    assert LOCAL_TEST.suspicion_confirmations(8) == 1
    assert LOCAL_TEST.suspicion_max_timeout(8) == 6 * LOCAL_TEST.suspicion_timeout(8) == 9.0
    off = LAN.without_lifeguard()
    assert off.suspicion_max_timeout(8) == off.suspicion_timeout(8) == 4.0
    assert (off.awareness_max_multiplier, off.buddy_system, off.probe_nacks) == (1, False, False)
    assert off.probe_interval == LAN.probe_interval


def test_suspicion_counts_each_other_accuser_once_up_to_k():
    """The accuser that started a suspicion is no confirmation; others count once each, up to k."""
    s = Suspicion(10.0, 2, 4.0, 24.0, {"x"})
    assert s.deadline() == 34.0
    assert not s.confirm("x") and not s.confirm("")
    assert s.confirm("y") and not s.confirm("y")
    assert 14.0 < s.deadline() < 34.0
    assert s.confirm("z") and s.deadline() == 14.0
    assert not s.confirm("w") and s.deadline() == 14.0  # k reached: no more counting


def _suspect_rumor(node, by, inc=0):
    return Envelope(by, by, None, Gossip(), members=(MemberState(node, node, inc, SUSPECT, by),))


def test_confirmations_from_other_accusers_bring_death_forward_and_are_passed_on():
    """A suspicion heard from x waits the max timeout; the same suspicion from y (another accuser)
    shortens it to the min and is re-queued with y as its accuser; then the member dies at the min."""
    net = Net([f"h{i}" for i in range(6)])
    a = net.cores["h0"]
    n = len(a.members)
    lo, hi = CFG.suspicion_timeout(n), CFG.suspicion_max_timeout(n)
    assert CFG.suspicion_confirmations(n) == 2
    out = a.receive(_suspect_rumor("h5", "h1"), 0.0)
    assert ("h5", ALIVE, SUSPECT) in out.changes
    assert a.suspicion_deadline("h5") == hi
    a.receive(_suspect_rumor("h5", "h1"), 0.1)  # the same accuser again: nothing
    assert a.suspicion_deadline("h5") == hi
    a.receive(_suspect_rumor("h5", "h2"), 0.2)
    one = a.suspicion_deadline("h5")
    assert lo < one < hi
    queued = a.queue._items[("m", "h5")].payload
    assert queued == MemberState("h5", "h5", 0, SUSPECT, "h2")
    a.receive(_suspect_rumor("h5", "h3"), 0.3)
    assert a.suspicion_deadline("h5") == lo
    assert not [c for c in a.tick(lo - 0.01).changes if c[0] == "h5"]
    assert ("h5", SUSPECT, DEAD) in a.tick(lo).changes
    assert a.suspicion_deadline("h5") is None


def test_unconfirmed_suspicion_waits_the_max_timeout_and_a_refutation_cancels_it():
    """Without confirmations the member is not declared dead before the max timeout; its
    refutation (alive at a higher incarnation) ends the suspicion."""
    net = Net([f"h{i}" for i in range(6)])
    a = net.cores["h0"]
    hi = CFG.suspicion_max_timeout(len(a.members))
    a.receive(_suspect_rumor("h5", "h1"), 0.0)
    changes, t = [], 0.0
    while t < hi - 0.1:
        out = a.tick(t)
        changes += [c for c in out.changes if c[0] == "h5"]
        for s in out.sends:  # everyone answers; h5 answers its Pings without hearing the rumors
            if s.dst != "h5":
                net.deliver(type(out)(sends=[s]))
            elif isinstance(s.envelope.msg, Ping):
                a.receive(Envelope("h5", "h5", "h0", Ack(s.envelope.msg.seq, "h5")), t)
        t = round(t + 0.05, 6)
    assert changes == [] and a.status_of("h5") == SUSPECT
    assert a.suspicion_deadline("h5") == hi
    a.receive(Envelope("h5", "h5", "h0", Gossip(), members=(MemberState("h5", "h5", 1, ALIVE),)), hi - 0.05)
    assert a.status_of("h5") == ALIVE and a.suspicion_deadline("h5") is None
    assert not [c for c in a.tick(hi).changes if c[0] == "h5"]  # the old deadline passes harmlessly


def test_failed_probes_raise_health_score_and_stretch_the_probe_period():
    """Each failed probe (no helper known to nack) raises the score by one, and the next probe
    period and timeout are scaled by score + 1; a successful probe lowers the score by one."""
    net = Net(["a", "b", "c", "d", "e", "f"])  # unconfirmed suspicions here last 24 s: nobody dies
    a = net.cores["a"]
    t, starts, scores = 0.0, [], []
    while len(starts) < 5 and t < 20.0:
        before = a._probe
        a.tick(t)  # nothing is ever delivered: every probe fails
        if a._probe is not None and a._probe is not before:
            starts.append(a._probe.started)
            scores.append(a.health_score)
            assert (
                abs(a._probe.deadline - a._probe.started - CFG.probe_interval * (a.health_score + 1)) < 1e-9
            )
            assert (
                abs(a._probe.timeout_at - a._probe.started - CFG.probe_timeout * (a.health_score + 1)) < 1e-9
            )
        t = round(t + 0.05, 6)
    assert len(starts) == 5 and scores == [0, 1, 2, 3, 4]
    gaps = [round(b - a_, 6) for a_, b in zip(starts, starts[1:])]
    assert all(g >= CFG.probe_interval * (s + 1) - 1e-9 for g, s in zip(gaps, scores))
    # now answer a's probes: each success lowers the score
    probe = a._probe
    a.receive(Envelope(probe.target, probe.target, "a", Ack(probe.seq, probe.target)), t)
    a.tick(t + 0.05)
    assert a.health_score == scores[-1] - 1


def test_refuting_an_accusation_raises_health_score():
    """Having to refute a suspicion of oneself counts against one's own health."""
    net = Net(["a", "b"])
    a = net.cores["a"]
    a.receive(_suspect_rumor("a", "b"), 0.0)
    assert a.incarnation == 1 and a.health_score == 1


def test_helper_nacks_when_the_target_is_silent_and_not_when_it_answers():
    """A helper asked with nack=True sends ProbeNack after its probe timeout if the target has not
    answered; not if it answered, nor if the requester did not ask."""
    net = Net(["a", "b", "c"])
    b = net.cores["b"]
    out = b.receive(Envelope("a", "a", "b", PingReq(9, "c", "c", True)), 0.0)
    assert [s.dst for s in of_kind(out.sends, Ping)] == ["c"]
    assert not of_kind(b.tick(CFG.probe_timeout - 0.01).sends, ProbeNack)
    nacks = of_kind(b.tick(CFG.probe_timeout).sends, ProbeNack)
    assert [(s.dst, s.envelope.msg) for s in nacks] == [("a", ProbeNack(9, "c"))]
    assert not of_kind(b.tick(CFG.probe_timeout + 0.05).sends, ProbeNack)  # only once
    # the target answers in time: the Ack is forwarded, no nack
    out = b.receive(Envelope("a", "a", "b", PingReq(10, "c", "c", True)), 5.0)
    ping = of_kind(out.sends, Ping)[0].envelope.msg
    b.receive(Envelope("c", "c", "b", Ack(ping.seq, "c")), 5.05)
    assert not of_kind(b.tick(5.0 + CFG.probe_timeout).sends, ProbeNack)
    # not asked: no nack
    b.receive(Envelope("a", "a", "b", PingReq(11, "c", "c", False)), 10.0)
    assert not of_kind(b.tick(10.0 + CFG.probe_timeout).sends, ProbeNack)


def _failed_probe(net, a, nack_from, t):
    """Runs one probe of a's that its target never answers; helpers in ``nack_from`` nack in time.
    Returns (score before, score after, time after)."""
    end = t + 10 * CFG.probe_interval * CFG.awareness_max_multiplier
    while (a._probe is None or a._probe.indirect) and t < end:
        a.tick(t)
        t = round(t + 0.05, 6)
    p = a._probe
    assert p is not None and not p.indirect
    before = a.health_score
    out = a.tick(p.timeout_at)
    for s in of_kind(out.sends, PingReq):
        if s.dst in nack_from:
            a.receive(Envelope(s.dst, s.dst, "a", ProbeNack(p.seq, p.target)), p.timeout_at + 0.1)
    a.tick(p.deadline)
    return before, a.health_score, p.deadline


def test_missed_nacks_raise_health_score_and_received_ones_spare_it():
    """Once helpers are known to nack, a failed probe costs one point per nack that did not come,
    and nothing when all came (the target is the problem, not us)."""
    net = Net(["a", "b", "c", "d", "e"])
    a = net.cores["a"]
    everyone = {"b", "c", "d", "e"}
    before, after, t = _failed_probe(net, a, set(), 0.0)
    assert after == before + 1  # nobody known to nack (older helpers, say): counts once
    for _ in range(3):  # every helper nacks in time: the score does not move
        before, after, t = _failed_probe(net, a, everyone, t)
        assert after == before
    assert len(a._nackers) >= CFG.indirect_checks
    a._nackers = set(everyone)  # as if every helper had nacked us before
    before, after, t = _failed_probe(net, a, set(), t)  # now none nacks: we are the slow one
    assert after == min(CFG.awareness_max_multiplier - 1, before + CFG.indirect_checks)


def test_buddy_system_ping_to_a_suspect_carries_the_suspicion_and_the_ack_refutes():
    """A Ping to a member suspect here carries that suspicion; the target refutes at once and its
    Ack brings the refutation back, so the prober sees it alive again."""
    net = Net(["a", "b"])
    a, b = net.cores["a"], net.cores["b"]
    a.receive(_suspect_rumor("b", "x"), 0.0)
    assert a.status_of("b") == SUSPECT and b.incarnation == 0
    t = 0.0
    while a._probe is None:
        out = a.tick(t)
        t = round(t + 0.05, 6)
    ping = of_kind(out.sends, Ping)[0]
    assert ping.envelope.members[0] == MemberState("b", "b", 0, SUSPECT, "x")
    net.deliver(out)
    assert b.incarnation == 1 and a.status_of("b") == ALIVE
    # without the buddy system the Ping carries no such rumor
    off = Net(["a", "b"], cfg=GossipConfig(**{**CFG.__dict__, "buddy_system": False}))
    a2 = off.cores["a"]
    a2.receive(_suspect_rumor("b", "x"), 0.0)
    for _ in range(a2.queue.limit(2)):  # spend the rumor's sends, so only a buddy copy could carry it
        a2.queue.take(10**6, 2)
    assert len(a2.queue) == 0
    t = 0.0
    while a2._probe is None and t < 2 * CFG.probe_interval:
        out = a2.tick(t)
        t = round(t + 0.05, 6)
    pings = of_kind(out.sends, Ping)
    assert len(pings) == 1 and not [m for m in pings[0].envelope.members if m.node == "b"]


def test_lifeguard_wire_additions_round_trip_and_stay_readable_by_old_decoders():
    """ProbeNack, PingReq's nack flag and a member's accuser survive encoding; an accuser is only
    an optional attribute, and a member without one (an older peer) decodes with none."""
    env = Envelope(
        "h1",
        "a:1",
        "h2",
        ProbeNack(4, "h3"),
        (MemberState("h3", "c:3", 2, SUSPECT, "h1"), MemberState("h4", "d:4", 0, ALIVE)),
    )
    el = encode(env)
    back = decode(etree.fromstring(etree.tostring(el)))
    assert back.msg == ProbeNack(4, "h3") and back.members == env.members
    members = [c for c in el if etree.QName(c).localname == "member"]
    assert members[0].get("by") == "h1" and members[1].get("by") is None
    req = decode(
        etree.fromstring(etree.tostring(encode(Envelope("h1", "a:1", "h2", PingReq(5, "h3", "c:3", True)))))
    )
    assert req.msg == PingReq(5, "h3", "c:3", True)
    old = etree.fromstring(
        '<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="a:1">'
        '<ping-req seq="5" target="h3" target-addr="c:3"/>'
        '<member node="h3" addr="c:3" inc="2" status="suspect"/></env>'
    )
    back = decode(old)
    assert back.msg == PingReq(5, "h3", "c:3", False) and back.members[0].by == ""


# -- Dom.delta: bounded, sound anti-entropy ---------------------------------------------------
ORIGINS = ["a", "b", "c"]
IDS = ["x", "y", "z", "w", "v", "u"]


def _el(kind, id_, version, owner, status=None):
    el = etree.Element(Q + kind)
    el.set("id", id_)
    el.set("v", str(version))
    el.set("owner" if kind == "vcluster" else "host", owner)
    if status is not None:
        s = etree.SubElement(el, Q + "status")
        s.set("v", str(status))
        s.set("state", "running")
    return el


@st.composite
def histories(draw):
    """Entity states written by origins a, b, c, and which of them replicas A and B received.

    A is origin a and B origin b: each holds every state that carries one of its own writes (as a
    real host does), and one of them every state from c; the rest reached either side at random,
    with gaps on both sides. (If no host were complete for some origin — it died for good before
    anyone synced with it — its parts above everyone's vector can only be re-sent oldest first; see
    the test below and docs/gossip.md.)"""
    n = draw(st.integers(1, 30))
    states = []
    for i in range(n):
        origin = draw(st.sampled_from(ORIGINS))
        v = Version(draw(st.integers(0, 3)) * 100 + i, draw(st.integers(0, 2)), origin)
        kind = draw(st.sampled_from(["vcluster", "vm"]))
        id_ = draw(st.sampled_from(IDS))
        pad = "p" * draw(st.integers(0, 120))
        if kind == "vm" and draw(st.booleans()):
            # a status-part write on top of a main part by some origin
            main = Version(draw(st.integers(0, 3)) * 100 + i, 5, draw(st.sampled_from(ORIGINS)))
            states.append(_el("vm", id_, main, pad, status=v))
        else:
            states.append(_el(kind, id_, v, pad))

    def own(el, o):
        return any(w[0] == o for w in _writes_of(el))

    # origin c is a third host that one of the two has fully synced with (so is complete for)
    c_at = draw(st.sampled_from("ab"))
    at_a = [e for e in states if own(e, "a") or (c_at == "a" and own(e, "c")) or draw(st.booleans())]
    at_b = [e for e in states if own(e, "b") or (c_at == "b" and own(e, "c")) or draw(st.booleans())]
    budget = draw(st.integers(1, 700))
    return states, at_a, at_b, budget


def _writes_of(el):
    """(origin, stamp, kind, id, part name, version) of every part of an entity state."""
    kind = etree.QName(el).localname
    out = []
    for name, p in [("", el), *_part_children(el).items()]:
        v = Version.parse(p.get("v"))
        out.append((v.origin, v.stamp, kind, el.get("id"), name, v))
    return out


def _replica(states, origin):
    d = Dom(HybridClock(origin, lambda: 0))
    for el in states:
        d.merge(el, validate=False)
    return d


def _parts(d: Dom):
    return [w for el in d.entities() for w in _writes_of(el)]


def _dominated(d: Dom, kind, id_, name, v: Version) -> bool:
    mine = d.version_of(kind, id_, name)
    return mine is not None and mine >= v


def _complete(all_states, d: Dom) -> dict:
    """The ground-truth complete vector of replica ``d``: for each origin, the greatest stamp up to
    which every write of that origin is held (or dominated) there."""
    writes = sorted(
        {(w[0], w[1], w[2], w[3], w[4]): w for el in all_states for w in _writes_of(el)}.values(),
        key=lambda w: (w[0], w[1]),
    )
    cvv = {}
    for o in ORIGINS:
        for _origin, stamp, kind, id_, name, v in (w for w in writes if w[0] == o):
            if not _dominated(d, kind, id_, name, v):
                break
            cvv[o] = stamp
    return cvv


def _round(src: Dom, src_cvv: dict, dst: Dom, dst_cvv: dict, budget: int):
    """One bounded delta from src to dst, checking the budget and the soundness of the claims."""
    ents, claims = src.delta(dict(dst_cvv), dict(src_cvv), budget)
    sizes = [len(entity_bytes(e)) for e in ents]
    assert len(ents) <= 1 or sum(sizes) <= budget
    for o, s in claims.items():  # never more than the sender is complete up to (or the receiver had)
        assert s <= max(src_cvv.get(o, (-1, -1)), dst_cvv.get(o, (-1, -1)))
    for e in ents:
        dst.merge(e, validate=False)
    for o, s in claims.items():
        if s > dst_cvv.get(o, (-1, -1)):
            dst_cvv[o] = s
    # soundness: everything from o up to the claim that the sender has is dominated at the receiver
    for origin, stamp, kind, id_, name, v in _parts(src):
        if origin in claims and stamp <= claims[origin]:
            assert _dominated(dst, kind, id_, name, v), (origin, stamp, kind, id_, name, claims)
    return len(ents)


@pytest.mark.property
@settings(max_examples=300, deadline=None)
@given(histories())
def test_bounded_delta_rounds_converge_and_claims_are_sound(h):
    """Repeated bounded delta rounds between two replicas reach equal digests, with sound claims."""
    writes, at_a, at_b, budget = h
    A, B = _replica(at_a, "a"), _replica(at_b, "b")
    cva, cvb = _complete(writes, A), _complete(writes, B)
    union = _replica(at_a + at_b, "u").canonical_digest()
    for _ in range(4 * len(writes) + 4):
        _round(A, cva, B, cvb, budget)
        _round(B, cvb, A, cva, budget)
        if A.canonical_digest() == B.canonical_digest():
            break
    assert A.canonical_digest() == B.canonical_digest() == union
    # the vectors stay sound against the ground truth
    for d, cv in ((A, cva), (B, cvb)):
        truth = _complete(writes, d)
        for o, s in cv.items():
            assert s <= truth.get(o, (-1, -1))


def test_delta_respects_budget_and_claims_stop_before_the_first_skipped_entity():
    """A budget smaller than the diff sends the oldest entities first and claims only below the cut."""
    src = Dom(HybridClock("a", lambda: 0))
    for i in range(10):
        src.merge(_el("vcluster", f"c{i}", Version(100 + i, 0, "a"), "x" * 50), validate=False)
    one = len(entity_bytes(next(src.entities())))
    ents, claims = src.delta({}, {"a": (109, 0)}, 3 * one)
    assert [e.get("id") for e in ents] == ["c0", "c1", "c2"]
    assert claims == {"a": (102, 10**9)}
    # the first entity always goes, even over budget, so a round always makes progress
    ents, claims = src.delta({"a": (102, 10**9)}, {"a": (109, 0)}, 1)
    assert [e.get("id") for e in ents] == ["c3"] and claims == {"a": (103, 10**9)}
    # nothing is claimed beyond what the sender is complete up to
    ents, claims = src.delta({}, {"a": (104, 0)}, 10**6)
    assert len(ents) == 10 and claims == {"a": (104, 0)}


def test_parts_nobody_can_claim_do_not_starve_claimable_ones():
    """Parts above both complete vectors (from an origin nobody is complete for) go after claimable ones."""
    A, B = Dom(HybridClock("a", lambda: 0)), Dom(HybridClock("b", lambda: 0))
    stray = _el("vm", "y", Version(20, 5, "c"), "", status=Version(20, 0, "a"))
    A.merge(stray, validate=False)
    A.merge(_el("vcluster", "x", Version(100, 0, "a"), ""), validate=False)
    cva, cvb = {"a": (100, 0)}, {}
    for _ in range(3):
        _round(A, cva, B, cvb, 1)
        _round(B, cvb, A, cva, 1)
    assert A.canonical_digest() == B.canonical_digest()
    assert cvb == {"a": (100, 0)}
