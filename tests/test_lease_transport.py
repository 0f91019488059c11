"""The lease service's Twisted layer and transport: group commit of acceptor records, answers
handed back inline, answers taken only from the host asked, bundles only to peers that read them."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from vmwebd.blocking import ThreadPoolRunner
from vmwebd.dom.hlc import Version
from vmwebd.gossip.codec import decode, encode
from vmwebd.gossip.messages import Bundle, Envelope
from vmwebd.lease import paxos
from vmwebd.lease.service import GroupCommit
from vmwebd.lease.transport import PaxosTransport


@pytest_twisted.inlineCallbacks
def test_records_handed_in_during_a_write_go_down_together_in_order():
    """While one write is under way, three more callers' records wait and then go down in one
    write (one fsync); every caller's Deferred fires only once its records were written."""
    from twisted.internet import reactor

    pool = ThreadPool(1, 1, "test-group-commit")
    pool.start()
    release = threading.Event()
    writes = []

    def append_many(records):
        if not writes:
            release.wait(10)
        writes.append(list(records))

    try:
        g = GroupCommit(ThreadPoolRunner(reactor, pool), append_many, reactor)
        first = g.append([b"a"])
        later = [g.append([b"b"]), g.append([b"c", b"d"]), g.append([b"e"])]
        assert not any(d.called for d in later)
        release.set()
        yield defer.gatherResults([first] + later)
    finally:
        pool.stop()
    assert writes == [[b"a"], [b"b", b"c", b"d", b"e"]] and g.writes == 2


@pytest_twisted.inlineCallbacks
def test_a_barrier_fires_once_every_record_handed_in_before_it_is_durable():
    """With nothing pending a barrier fires at once; during a write it fires with that write;
    with records waiting for the next write it fires with that one (a round's Prepare leaves only
    once the ballot reserve handed in before it is on disk)."""
    from twisted.internet import reactor

    pool = ThreadPool(1, 1, "test-group-commit-barrier")
    pool.start()
    release = [threading.Event(), threading.Event()]
    writes = []

    def append_many(records):
        release[len(writes)].wait(10)
        writes.append(list(records))

    try:
        g = GroupCommit(ThreadPoolRunner(reactor, pool), append_many, reactor)
        assert g.barrier().called
        first = g.append([b"reserve"])
        during = g.barrier()
        assert not during.called
        second = g.append([b"promise"])  # waits for the next write
        after_second = g.barrier()
        release[0].set()
        yield first
        yield during
        assert writes == [[b"reserve"]] and not after_second.called and not second.called
        release[1].set()
        yield after_second
        assert second.called and writes == [[b"reserve"], [b"promise"]]
        assert g.barrier().called
    finally:
        for r in release:
            r.set()
        pool.stop()


@pytest_twisted.inlineCallbacks
def test_an_acceptor_answers_inline_after_its_promise_is_durable(start_node):
    """A Prepare delivered with inline answers gets its Promise back from receive (and not as a
    message of its own); the promise is in the acceptor's state."""
    h = yield start_node()
    leases = h.node.leases
    sent = []
    leases.send = lambda dst, msgs: sent.append((dst, msgs)) or defer.succeed(True)
    ballot = Version(10**12, 0, "host9")
    answers = yield leases.receive(
        "host9", [paxos.Prepare("host9.1", ballot, ("ip/lab/10.0.0.9",))], inline=True
    )
    assert [type(m) for m in answers] == [paxos.Promise] and answers[0].ballot == ballot
    assert leases.core.keys["ip/lab/10.0.0.9"].promised == ballot
    assert sent == []
    plain = yield leases.receive("host9", [paxos.Prepare("host9.2", Version(10**12, 1, "host9"), ("k",))])
    assert plain is None and [type(m) for _, ms in sent for m in ms] == [paxos.Promise]


class _Leases:
    def __init__(self):
        self.got = []

    def receive(self, src, msgs, inline=False):
        self.got.append((src, list(msgs)))
        return defer.succeed([] if inline else None)


class _Client:
    """A PeerClient stand-in: records what is posted, answers with ``answers(env)``."""

    def __init__(self, bundles: bool, answers=lambda env: []):
        self.bundles, self.answers, self.posted = bundles, answers, []

    def reads_bundles(self, addr):
        return self.bundles

    def send(self, addr, el, on_reply=None):
        env = decode(el)
        self.posted.append(env)
        replies = [encode(e) for e in self.answers(env)]
        if replies and on_reply is not None:
            on_reply(replies)
        return defer.succeed(True)


def test_answers_are_taken_only_from_the_host_asked():
    """An answer riding back on host2's response is delivered to the lease service; one that
    claims to come from host3 is dropped."""
    ballot = Version(5, 0, "host1")
    client = _Client(
        False,
        lambda env: [
            Envelope("host2", "a:2", "host1", paxos.Promise(env.msg.op, ballot, {})),
            Envelope("host3", "a:3", "host1", paxos.Promise(env.msg.op, ballot, {})),
        ],
    )
    t = PaxosTransport(
        "host1", client, lambda h: f"127.0.0.1:{h[-1]}", lambda: "127.0.0.1:1", leases=_Leases()
    )
    t.send("host2", [paxos.Prepare("host1.1", ballot, ("k",))])
    assert t.leases.got == [("host2", [paxos.Promise("host1.1", ballot, {})])]


def test_several_messages_travel_as_one_bundle_only_to_a_peer_that_reads_them():
    """A Commit and a Prepare for one host: one request holding a bundle when the peer said it
    reads bundles, two requests otherwise."""
    msgs = [
        paxos.Commit(Version(5, 0, "host1"), {"k": "vm:a"}),
        paxos.Prepare("host1.2", Version(6, 0, "host1"), ("j",)),
    ]
    for reads, requests in ((True, 1), (False, 2)):
        client = _Client(reads)
        t = PaxosTransport("host1", client, lambda h: "127.0.0.1:2", lambda: "127.0.0.1:1")
        t.send("host2", msgs)
        assert len(client.posted) == requests
        got = [
            m for env in client.posted for m in (env.msg.msgs if isinstance(env.msg, Bundle) else (env.msg,))
        ]
        assert got == msgs


def test_a_consensus_envelope_meant_for_another_host_is_dropped():
    """An envelope addressed to a host that was at this address before is not fed to the lease
    service (a lost message)."""
    t = PaxosTransport("host1", _Client(True), lambda h: None, lambda: "127.0.0.1:1", leases=_Leases())
    env = Envelope("host2", "a:2", "host7", paxos.Prepare("host2.1", Version(5, 0, "host2"), ("k",)))
    assert t.deliver(env, inline=True).result == []
    assert t.leases.got == []


@pytest_twisted.inlineCallbacks
def test_records_nothing_waits_for_ride_along_with_the_next_write_or_go_later():
    """Records appended 'later' start no write of their own: they go down with the next write
    someone waits for, or by themselves once ``later_s`` has passed without one."""
    from twisted.internet import reactor, task

    pool = ThreadPool(1, 1, "test-group-commit-later")
    pool.start()
    writes = []
    clock = task.Clock()
    try:
        g = GroupCommit(
            ThreadPoolRunner(reactor, pool), lambda records: writes.append(list(records)), clock, later_s=0.1
        )
        g.append_later([b"commit-1"])
        assert g.writes == 0
        yield g.append([b"promise"])
        assert writes == [[b"commit-1", b"promise"]]
        g.append_later([b"commit-2"])
        clock.advance(0.05)
        assert g.writes == 1
        clock.advance(0.05)
        assert g.writes == 2
        yield g.append([b"accept"])
    finally:
        pool.stop()
    assert writes == [[b"commit-1", b"promise"], [b"commit-2"], [b"accept"]]


def _wire(msg):
    from lxml import etree

    env = Envelope(src="h1", src_addr="127.0.0.1:1", dst="h2", msg=msg)
    return decode(etree.fromstring(etree.tostring(encode(env)))).msg


def test_values_named_instead_of_carried_survive_the_wire():
    """A Prepare's known ballots, a Promise's KNOWN, a Commit's ACCEPTED and a forwarded
    Decided's elided large values are read back as they were sent."""
    b, c = Version(1000, 0, "h1"), Version(900, 1, "h2")
    big = "x" * paxos.BIG_VALUE
    prep = _wire(paxos.Prepare("r1", b, ("cap/a", "ip/x"), {"cap/a": c}))
    assert prep.keys == ("cap/a", "ip/x") and prep.known == {"cap/a": c}
    prom = _wire(
        paxos.Promise("r1", b, {"cap/a": (c, paxos.KNOWN, c, paxos.KNOWN), "ip/x": (None, None, c, "vm:1")})
    )
    assert prom.entries["cap/a"][1] is paxos.KNOWN and prom.entries["cap/a"][3] is paxos.KNOWN
    assert prom.entries["ip/x"] == (None, None, c, "vm:1")
    com = _wire(paxos.Commit(b, {"cap/a": paxos.ACCEPTED, "ip/x": "vm:1", "ip/y": None}))
    assert com.values == {"cap/a": paxos.ACCEPTED, "ip/x": "vm:1", "ip/y": None}
    # Only an acceptor that says it reads ACCEPTED is sent one (an older host's Accepted has no
    # such word, and reads False).
    assert _wire(paxos.Accepted("r1", b, refs=True)).refs is True
    assert _wire(paxos.Accepted("r1", b)).refs is False
    out = _wire(paxos.Outcome("op", paxos.Decided("op", b, {"cap/a": big, "ip/x": "vm:1"})))
    assert out.result.values == {"cap/a": paxos.ELIDED, "ip/x": "vm:1"}


def test_a_promise_naming_a_known_value_without_its_ballot_is_malformed():
    from lxml import etree

    from vmwebd.errors import MalformedRequest

    b = Version(1000, 0, "h1")
    env = encode(
        Envelope(
            src="h1",
            src_addr="127.0.0.1:1",
            dst="h2",
            msg=paxos.Promise("r1", b, {"cap/a": (None, None, None, None)}),
        )
    )
    for entry in env.iter("{*}entry"):
        entry.set("com-known", "1")
    with pytest.raises(MalformedRequest, match="com-known"):
        decode(etree.fromstring(etree.tostring(env)))


def test_terms_survive_the_wire():
    """A term prepare's end, digest and kept start, a whole promise, and an Accept's keys only
    read are read back as they were sent; a plain Prepare and Promise stay plain."""
    b, e, k = Version(1000, 0, "h1"), Version(3000, 0, "h1"), Version(900, 2, "h1")
    digest = tuple(range(0, 2**64, 2**58))
    prep = _wire(paxos.Prepare("r1", b, (), {}, end=e, digest=digest, keep=k))
    assert (prep.end, prep.digest, prep.keep, prep.keys) == (e, digest, k, ())
    plain = _wire(paxos.Prepare("r2", b, ("ip/x",)))
    assert (plain.end, plain.digest, plain.keep) == (None, (), None)
    prom = _wire(paxos.Promise("r1", b, {"ip/x": (b, "vm:1", None, None)}, whole=True))
    assert prom.whole is True and prom.entries == {"ip/x": (b, "vm:1", None, None)}
    assert _wire(paxos.Promise("r2", b, {})).whole is False
    acc = _wire(paxos.Accept("r1", b, {"ip/x": "vm:1"}, reads=("cap/a", "quota/u")))
    assert acc.values == {"ip/x": "vm:1"} and acc.reads == ("cap/a", "quota/u")
    assert _wire(paxos.Accept("r3", b, {})).reads == ()


def test_a_term_prepare_with_a_bad_digest_is_malformed_naming_it():
    """A term prepare whose digest is not hexadecimal numbers is refused with a MalformedRequest
    naming the attribute (the envelope changes nothing)."""
    from lxml import etree

    from vmwebd.errors import MalformedRequest

    b = Version(1000, 0, "h1")
    env = encode(
        Envelope(
            src="h1", src_addr="127.0.0.1:1", dst="h2", msg=paxos.Prepare("r1", b, (), end=b, digest=(1, 2))
        )
    )
    for el in env.iter("{*}prepare"):
        el.set("digest", "1 zz")
    with pytest.raises(MalformedRequest, match="prepare/@digest"):
        decode(etree.fromstring(etree.tostring(env)))
