"""Anti-entropy skips what the other replica already holds above its complete vector.

A replica learns most entities outside anti-entropy (a rumor, a Paxos Commit), which does not
move its complete version vector; the next anti-entropy round would send them all again. So a
Sync carries a summary of what its sender holds above that vector (``Dom.held_above``:
checkpoints of a running hash along each origin's parts in stamp order), and the replier sends
nothing of an origin up to the highest checkpoint whose hash matches its own parts
(``Dom.matched``), and claims the sender complete up to it as far as it is complete itself.

Checked here: claims stay sound (the receiver holds every part it is claimed to hold) for any
two replicas holding any subsets of any history, same-stamp batches (a Paxos round's leases)
included; a replica that heard everything by rumor is sent nothing; a difference anywhere sends
what follows it; and the summary's wire form.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmwebd.dom.document import Dom
from vmwebd.dom.hlc import HybridClock, Version
from vmwebd.dom.records import SettingRec
from vmwebd.errors import MalformedRequest
from vmwebd.gossip.codec import NS, decode, encode
from vmwebd.gossip.domport import DomPortAdapter
from vmwebd.gossip.messages import Envelope, Sync, SyncReply

ORIGINS = ("a", "b", "c")
BIG = 1 << 24


def _dom(name: str) -> Dom:
    return Dom(HybridClock(name, lambda: 1_000))


def _history(writes):
    """Applies ``writes`` (origin, key, same stamp as that origin's last write) to a replica
    holding everything; returns it and each write as (version, entity state after it)."""
    truth = _dom("t")
    wall = 10_000
    last: dict[str, Version] = {}
    batch_keys: dict[str, set] = {}
    out = []
    for i, (origin, key, batch) in enumerate(writes):
        if batch and origin in last and key not in batch_keys[origin]:
            v = last[origin]  # the same ballot: a round that decided several leases
        else:
            wall += 7
            v = Version(wall, 0, origin)
            batch_keys[origin] = set()
        if truth.version_of("setting", key) is not None and truth.version_of("setting", key).stamp >= v.stamp:
            continue  # an older stamp than what is there: not a write this history makes
        batch_keys[origin].add(key)
        last[origin] = v
        el = truth.put(SettingRec(id=key, value=f"{origin}{i}"), version=v)
        out.append((v, copy.deepcopy(el)))
    return truth, out


def _replica(name, history, picks):
    dom = _dom(name)
    for i in picks:
        dom.merge(copy.deepcopy(history[i][1]), validate=False)
    return dom


def _true_complete(dom: Dom, history) -> dict:
    """The greatest stamp per origin up to which ``dom`` holds every write (or a newer state)."""
    out = {}
    for origin in ORIGINS:
        writes = sorted((v.stamp, k) for v, el in history if v.origin == origin for k in [el.get("id")])
        held_to = (-1, -1)
        by_stamp: dict = {}
        for stamp, key in writes:
            by_stamp.setdefault(stamp, []).append(key)
        for stamp in sorted(by_stamp):
            if all(_holds(dom, key, Version(stamp[0], stamp[1], origin)) for key in by_stamp[stamp]):
                held_to = stamp
            else:
                break
        if held_to != (-1, -1):
            out[origin] = held_to
    return out


def _holds(dom: Dom, key: str, v: Version) -> bool:
    have = dom.version_of("setting", key)
    return have is not None and (have.stamp, have.origin) >= (v.stamp, v.origin)


def _lowered(cvv: dict, cuts) -> dict:
    """A complete vector that lags behind the true one (still sound)."""
    out = {}
    for i, (origin, stamp) in enumerate(sorted(cvv.items())):
        cut = cuts[i % len(cuts)] if cuts else 0
        if cut == 0:
            out[origin] = stamp
        elif cut == 1:
            out[origin] = (stamp[0] - 7, stamp[1])
    return out


writes_st = st.lists(
    st.tuples(st.sampled_from(ORIGINS), st.sampled_from([f"k{i}" for i in range(24)]), st.booleans()),
    max_size=40,
)


def _picks(data, n: int, who: str) -> list[int]:
    """Which writes a replica heard: most of them but a few (the usual case: a lost rumor), or
    any subset."""
    if not n:
        return []
    index = st.integers(0, n - 1)
    if data.draw(st.booleans(), label=f"{who} heard most"):
        lost = data.draw(st.sets(index, min_size=1, max_size=3), label=f"{who} lost")
        return [i for i in range(n) if i not in lost]
    return data.draw(st.lists(index, max_size=n), label=f"{who} heard")


@pytest.mark.property
@settings(max_examples=400, deadline=None)
@given(
    writes=writes_st,
    data=st.data(),
    budget=st.sampled_from([BIG, 300, 900]),
    checkpoints=st.integers(1, 5),
)
def test_claims_after_a_summarised_delta_are_sound(writes, data, budget, checkpoints):
    """Whatever each replica holds of the history and however far behind its complete vector
    lags, after P's delta to A (A's summary matched by P) A holds every part P claims for it."""
    truth, history = _history(writes)
    n = len(history)
    a, p = _replica("a1", history, _picks(data, n, "A")), _replica("p1", history, _picks(data, n, "P"))
    cvv_a = _lowered(_true_complete(a, history), data.draw(st.lists(st.integers(0, 2), max_size=3)))
    cvv_p = _lowered(_true_complete(p, history), data.draw(st.lists(st.integers(0, 2), max_size=3)))
    port_p = DomPortAdapter(p, validate=False, me="p1")
    held = a.held_above(cvv_a, checkpoints=checkpoints)
    ents, claims = port_p.delta(cvv_a, cvv_p, budget, held)
    for el in ents:
        a.merge(el, validate=False)
    for el in truth.entities():
        v = Version.parse(el.get("v"))
        if v.stamp <= claims.get(v.origin, (-1, -1)):
            assert _holds(a, el.get("id"), v), (el.get("id"), v, claims, held)


def _three_writers():
    """Writes at origins a and b (one a batch sharing a stamp, as a Paxos round's leases do),
    as every replica would hear them by rumor."""
    writes = [("a", f"k{i}", i % 3 != 0) for i in range(12)] + [("b", f"j{i}", False) for i in range(5)]
    return _history(writes)


def test_a_replica_that_heard_everything_by_rumor_is_sent_nothing():
    """A and P both hold every write (rumors), their complete vectors are empty (no anti-entropy
    yet): with A's summary P sends nothing and claims all of it; without, it sends it all again."""
    _truth, history = _three_writers()
    everything = range(len(history))
    a, p = _replica("a1", history, everything), _replica("p1", history, everything)
    cvv_p = _true_complete(p, history)
    port_p = DomPortAdapter(p, validate=False, me="p1")
    ents, claims = port_p.delta({}, cvv_p, BIG, a.held_above({}))
    assert ents == [] and claims == cvv_p
    resent, _ = port_p.delta({}, cvv_p, BIG)
    assert len(resent) == len({el.get("id") for _, el in history})


def test_a_difference_sends_what_follows_the_last_matching_checkpoint():
    """A lacks one write of origin a in the middle: P's delta sends that write and what follows
    it from origin a, nothing before the last checkpoint that matched, nothing of origin b."""
    _truth, history = _three_writers()
    a_writes = [i for i, (v, _el) in enumerate(history) if v.origin == "a"]
    missing = a_writes[len(a_writes) // 2]
    a = _replica("a1", history, [i for i in range(len(history)) if i != missing])
    p = _replica("p1", history, range(len(history)))
    cvv_p = _true_complete(p, history)
    port_p = DomPortAdapter(p, validate=False, me="p1")
    held = a.held_above({}, checkpoints=len(a_writes))
    ents, claims = port_p.delta({}, cvv_p, BIG, held)
    sent = {el.get("id") for el in ents}
    missed_v = history[missing][0]
    assert history[missing][1].get("id") in sent
    assert all(Version.parse(el.get("v")).origin == "a" for el in ents)
    assert all(Version.parse(el.get("v")).stamp >= missed_v.stamp or el.get("id") in sent for el in ents)
    before_missing = {history[i][1].get("id") for i in a_writes if history[i][0].stamp < missed_v.stamp}
    assert not (sent & before_missing)
    for el in ents:
        a.merge(el, validate=False)
    assert a.digest() == p.digest() and claims == cvv_p


def test_a_checkpoint_is_never_taken_beyond_what_the_replier_is_complete_up_to():
    """P holds the same parts as A but is complete (its vector) only up to an earlier stamp: a
    part below A's checkpoints could still reach P later (a Paxos round's ballot is older than
    its record), so P moves A's vector no further than its own."""
    _truth, history = _three_writers()
    everything = range(len(history))
    a, p = _replica("a1", history, everything), _replica("p1", history, everything)
    full = _true_complete(p, history)
    stamps_a = sorted({v.stamp for v, _ in history if v.origin == "a"})
    cvv_p = {**full, "a": stamps_a[1]}
    port_p = DomPortAdapter(p, validate=False, me="p1")
    _ents, claims = port_p.delta({}, cvv_p, BIG, a.held_above({}, checkpoints=len(stamps_a)))
    assert claims["a"] == stamps_a[1]


def test_what_matches_is_not_sent_even_beyond_what_the_replier_is_complete_up_to():
    """Two replicas that heard the same rumors, neither complete (their vectors empty: no
    anti-entropy yet): what matches is not sent again, although neither can claim it."""
    _truth, history = _three_writers()
    everything = range(len(history))
    a, p = _replica("a1", history, everything), _replica("p1", history, everything)
    port_p = DomPortAdapter(p, validate=False, me="p1")
    ents, claims = port_p.delta({}, {}, BIG, a.held_above({}))
    assert ents == [] and claims == {}
    resent, _ = port_p.delta({}, {}, BIG)
    assert resent


def _sync_env(msg):
    return Envelope("host1", "127.0.0.1:1", "host2", msg)


def test_the_summary_travels_in_sync_and_sync_reply():
    held = {"host1": [((1_000, 0), "0" * 32), ((1_007, 2), "ab" * 16)], "host3": [((5, 1), "f" * 32)]}
    for msg in (Sync({"host1": (900, 0)}, (), held), SyncReply((), {}, {"host1": (900, 0)}, (), held)):
        back = decode(encode(_sync_env(msg)))
        assert back.msg.held == held
    assert decode(encode(_sync_env(Sync({}, ())))).msg.held == {}  # an older peer's: none


@pytest.mark.parametrize(
    "at,error",
    [
        ('<at stamp="1.0" h="xyz"/>', "held/at/@h"),
        ('<at stamp="soon" h="' + "0" * 32 + '"/>', "held/at/@stamp"),
        ('<at h="' + "0" * 32 + '"/>', "held/at/@stamp is missing"),
        (
            '<at stamp="9.0" h="' + "0" * 32 + '"/><at stamp="1.0" h="' + "0" * 32 + '"/>',
            "out of stamp order",
        ),
        ("".join(f'<at stamp="{i}.0" h="' + "0" * 32 + '"/>' for i in range(65)), "more than 64"),
    ],
)
def test_a_malformed_summary_is_refused_naming_the_field(at, error):
    root = encode(_sync_env(Sync({}, ())))
    (sync,) = [c for c in root if etree.QName(c).localname == "sync"]
    sync.append(etree.fromstring(f'<held xmlns="{NS}" origin="host1">{at}</held>'))
    with pytest.raises(MalformedRequest, match=error):
        decode(root)
