"""One proposer for the grid: operations forwarded to it, answered with their Outcome, and run
here after all when it does not answer."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from vmwebd.dom.hlc import Version
from vmwebd.gossip.codec import decode, encode
from vmwebd.gossip.messages import Envelope
from vmwebd.lease import paxos
from vmwebd.lease.capacity import Entry, SetUpdate


def round_trip(msg):
    return decode(encode(Envelope("host1", "127.0.0.1:1", "host2", msg))).msg


def test_forward_and_outcome_travel_whole():
    """A forwarded operation keeps its compare-and-set pairs and its updates (entries, limit),
    and every kind of outcome comes back as it was."""
    cap = SetUpdate(
        frozenset({Entry("c/a", "t1", 2, 1024)}),
        frozenset({Entry("c/b", "t2", 1, 512)}),
        True,
        (32.0, 16384),
        "host1",
    )
    quota = SetUpdate(frozenset({Entry("c/a", "t1")}), frozenset(), False, 16, "alice")
    free = SetUpdate(frozenset(), frozenset({Entry("c/z", "t", 1, 1)}), True, None, "host2")
    cas = {
        "ip/lab/10.0.0.5": (None, "vm:c/a#t"),
        "mac/52:54:00:00:00:01": ("vm:c/b#t", None),
        "cap/host1": (cap, None),
        "quota/alice": (quota, None),
        "cap/host2": (free, None),
    }
    assert round_trip(paxos.Forward("host1-7-99", cas)) == paxos.Forward("host1-7-99", cas)
    b = Version(10**12, 3, "host2")
    for r in (
        paxos.Decided("o", b, {"k": "v", "j": None}),
        paxos.Decided("o", None, {}),
        paxos.NoQuorum("o", 1, 2, 3),
    ):
        assert round_trip(paxos.Outcome("o", r)) == paxos.Outcome("o", r)
    c = round_trip(paxos.Outcome("o", paxos.Conflict("o", "cap/host1", "x", {"cap/host1": "x", "q": None})))
    assert c.result == paxos.Conflict("o", "cap/host1", "x") and c.result.seen == {
        "cap/host1": "x",
        "q": None,
    }


@pytest_twisted.inlineCallbacks
def test_an_operation_goes_to_the_proposer_and_its_outcome_settles_it(start_node):
    h = yield start_node()
    leases = h.node.leases
    sent = []
    leases.send = lambda dst, msgs, **kw: sent.append((dst, msgs)) or defer.succeed(True)
    leases.proposer_for = lambda: "host9"
    d = leases.propose({"name/x/a": (None, "h#1")})
    [(dst, [fwd])] = sent
    assert dst == "host9" and isinstance(fwd, paxos.Forward) and fwd.cas == {"name/x/a": (None, "h#1")}
    decided = paxos.Decided(fwd.op, Version(10**12, 0, "host9"), {"name/x/a": "h#1"})
    yield leases.receive("host9", [paxos.Outcome(fwd.op, decided)])
    assert (yield d) == decided
    assert leases.core.committed("name/x/a") == (None, None)  # not run here


@pytest_twisted.inlineCallbacks
def test_without_an_answer_the_operation_runs_here(start_node):
    """Not delivered: run here at once; delivered but never answered: run here once the
    forward timeout has passed (a late outcome then changes nothing)."""
    h = yield start_node()
    leases = h.node.leases
    leases.proposer_for = lambda: "host9"
    leases.send = lambda dst, msgs, **kw: defer.succeed(False)
    r = yield leases.propose({"name/x/a": (None, "h#1")})
    assert isinstance(r, paxos.Decided) and leases.fell_back == 1
    sent = []
    leases.send = lambda dst, msgs, **kw: sent.append(msgs) or defer.succeed(True)
    leases.forward_timeout = 0.05
    r = yield leases.propose({"name/x/b": (None, "h#2")})
    assert isinstance(r, paxos.Decided) and r.values == {"name/x/b": "h#2"} and leases.fell_back == 2
    [[fwd]] = sent
    yield leases.receive("host9", [paxos.Outcome(fwd.op, paxos.NoQuorum(fwd.op, 0, 2, 3))])


@pytest_twisted.inlineCallbacks
def test_the_proposer_runs_a_forwarded_operation_once_and_answers_inline(start_node):
    """A forwarded operation is proposed here; its Outcome is the inline answer; the same
    Forward delivered twice is run once and answered twice alike."""
    h = yield start_node()
    leases = h.node.leases
    fwd = paxos.Forward("host9-1-5", {"name/x/c": (None, "h#3")})
    first, again = yield defer.gatherResults(
        [leases.receive("host9", [fwd], inline=True), leases.receive("host9", [fwd], inline=True)]
    )
    assert first == again and len(first) == 1 and isinstance(first[0], paxos.Outcome)
    assert isinstance(first[0].result, paxos.Decided) and first[0].result.values == {"name/x/c": "h#3"}
    # Refused: the Conflict travels back as it is (no error raised here)
    taken = yield leases.receive(
        "host9", [paxos.Forward("host9-2-5", {"name/x/c": (None, "h#4")})], inline=True
    )
    assert isinstance(taken[0].result, paxos.Conflict) and taken[0].result.holder == "h#3"


def test_a_value_accepted_and_committed_at_one_ballot_travels_once():
    """A Promise carries a key's value once when it was accepted and committed at the same
    ballot, and reads back the same; different or missing values travel as they are."""
    b1, b2 = Version(10**12, 1, "host1"), Version(10**12, 2, "host1")
    big = ",".join(f"c/vm{i}:t:1:512" for i in range(200))
    entries = {
        "cap/host1": (b2, big, b2, big),
        "ip/a": (b2, "vm:x#1", b1, "vm:y#1"),
        "ip/b": (b1, None, b1, None),
        "ip/c": (None, None, None, None),
    }
    el = encode(Envelope("host1", "127.0.0.1:1", "host2", paxos.Promise("r1", b2, entries)))
    from lxml import etree

    assert etree.tostring(el).count(big.encode()) == 1
    assert decode(el).msg.entries == entries


@pytest_twisted.inlineCallbacks
def test_operations_asked_while_forwards_are_out_leave_together(start_node):
    """At most ``forwards_in_flight`` Forward requests go to the proposer at once; operations
    asked meanwhile wait and leave in one bundle when a request returns (one request per round
    instead of one per operation); a bundle that cannot be delivered runs its operations here."""
    h = yield start_node()
    leases = h.node.leases
    leases.proposer_for = lambda: "host9"
    requests = []

    def send(dst, msgs, **kw):
        d = defer.Deferred()
        requests.append((list(msgs), d))
        return d

    leases.send = send
    ops = [leases.propose({f"name/x/f{i}": (None, f"h#{i}")}) for i in range(7)]
    assert [len(m) for m, _ in requests] == [1, 1]  # two out, five waiting
    first, d1 = requests[0]
    decided = paxos.Decided(first[0].op, Version(10**12, 0, "host9"), {"name/x/f0": "h#0"})
    yield leases.receive("host9", [paxos.Outcome(first[0].op, decided)])
    d1.callback(True)
    assert [len(m) for m, _ in requests] == [1, 1, 5]  # the five, in one request
    assert (yield ops[0]) == decided
    assert [f.cas for f in requests[2][0]] == [{f"name/x/f{i}": (None, f"h#{i}")} for i in range(2, 7)]
    requests[2][1].callback(False)  # not delivered: run here at once
    for i in range(2, 7):
        r = yield ops[i]
        assert isinstance(r, paxos.Decided) and r.values == {f"name/x/f{i}": f"h#{i}"}
    assert leases.fell_back == 5
    requests[1][1].callback(False)
    assert isinstance((yield ops[1]), paxos.Decided) and leases.fell_back == 6
