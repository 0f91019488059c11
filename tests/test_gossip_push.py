"""Local writes are pushed one round at a time: what is written while a push round is under way
leaves together in the next one (GossipService._local)."""

from __future__ import annotations

import random

from twisted.internet import defer
from twisted.internet import task as ttask

from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import VClusterRec
from vmwebd.gossip.codec import decode
from vmwebd.gossip.core import LOCAL_TEST, GossipCore
from vmwebd.gossip.domport import DomPortAdapter
from vmwebd.gossip.messages import Envelope, Gossip, MemberState
from vmwebd.gossip.service import PUSH_GAP_S, GossipService


class _Commits:
    def __init__(self):
        self.on_local_commit = []

    def commit(self, entities):
        return defer.succeed(None)


class _HeldSends:
    """Records every envelope sent; each send's answer waits until the test releases it."""

    def __init__(self):
        self.sent: list[tuple[Envelope, defer.Deferred]] = []

    def send(self, addr, el, on_reply=None, timeout=None):
        d = defer.Deferred()
        self.sent.append((decode(el), d))
        return d

    def close(self):
        return defer.succeed(None)

    def pushes_of(self, cluster_id):
        return [
            (env, d)
            for env, d in self.sent
            if isinstance(env.msg, Gossip) and any(e.get("id") == cluster_id for e in env.entities)
        ]


def _service():
    clock = ttask.Clock()
    dom = Dom(HybridClock("host1", lambda: int(clock.seconds() * 1000)))
    core = GossipCore(
        "host1", "127.0.0.1:1", LOCAL_TEST, random.Random(3), DomPortAdapter(dom), clock.seconds()
    )
    # three live peers, learnt from a gossip message of one of them
    core.receive(
        Envelope(
            "host2",
            "127.0.0.1:2",
            "host1",
            Gossip(),
            tuple(MemberState(f"host{i}", f"127.0.0.1:{i}", 0, "alive") for i in (2, 3, 4)),
        ),
        clock.seconds(),
    )
    sends = _HeldSends()
    svc = GossipService(core, _Commits(), sends, clock)
    svc.start()
    return svc, dom, sends, clock


def _write(svc, dom, name):
    return svc._local([dom.put(VClusterRec(id=name, owner="o"))])


def test_writes_during_a_push_round_leave_together_in_the_next():
    svc, dom, sends, clock = _service()
    first = _write(svc, dom, "c1")
    round1 = sends.pushes_of("c1")
    assert len(round1) == svc.core.cfg.fanout  # pushed at once, to fanout peers
    acks = []
    for name in ("c2", "c3"):
        _write(svc, dom, name).addCallback(acks.append)
    assert sends.pushes_of("c2") == [] and sends.pushes_of("c3") == []  # waiting for round 1
    for _, d in round1:
        d.callback(True)
    assert first.called and first.result == len(round1)
    round2 = sends.pushes_of("c2")
    assert len(round2) == svc.core.cfg.fanout and round2 == sends.pushes_of("c3")  # one round
    assert acks == []  # acknowledged once round 2 is answered
    for _, d in round2:
        d.callback(True)
    assert acks == [len(round2), len(round2)]
    # nothing under way: a lone write leaves at once
    lone = _write(svc, dom, "c4")
    assert len(sends.pushes_of("c4")) == svc.core.cfg.fanout
    for _, d in sends.pushes_of("c4"):
        d.callback(True)
    assert lone.called
    svc._loop.stop()


def test_a_silent_peer_holds_the_next_round_for_push_gap_only():
    svc, dom, sends, clock = _service()
    _write(svc, dom, "c1")
    round1 = sends.pushes_of("c1")
    for _, d in round1[1:]:
        d.callback(True)  # one peer never answers
    waiting = _write(svc, dom, "c2")
    assert sends.pushes_of("c2") == []
    clock.advance(PUSH_GAP_S / 2)
    assert sends.pushes_of("c2") == []
    clock.advance(PUSH_GAP_S)
    assert len(sends.pushes_of("c2")) == svc.core.cfg.fanout
    for _, d in sends.pushes_of("c2"):
        d.callback(True)
    assert waiting.called
    svc._loop.stop()


def test_stopping_releases_the_writes_waiting_for_a_round():
    svc, dom, sends, clock = _service()
    _write(svc, dom, "c1")
    waiting = _write(svc, dom, "c2")
    svc.stop(leave=False)
    assert waiting.called and waiting.result == 0
    assert not clock.getDelayedCalls() or all(
        not c.active() for c in clock.getDelayedCalls() if c.func == svc._push_slot_free
    )
