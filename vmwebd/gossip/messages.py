"""The peer wire protocol: every message kind, declared once, versioned. ONLY APPEND TO THIS FILE.

A message travels in an :class:`Envelope` that also carries piggybacked rumors: membership states
(SWIM's alive/suspect/dead, "left" for a clean leave) and DOM entity states. Kinds keep their
numeric code forever; a new field gets a default so older peers' messages still decode; a kind
that is no longer sent stays listed (deprecated), never reused. See docs/gossip.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOL_VERSION = 1

Stamp = tuple[int, int]  # (wall ms, counter) of a hybrid logical clock


@dataclass(frozen=True)
class MemberState:
    """What one host claims about a member: SWIM's (status, incarnation) plus its address."""

    node: str
    addr: str
    incarnation: int
    status: str  # alive | suspect | dead | left
    # Appended in protocol version 1: for a suspicion, the host whose own probe failed. Hosts
    # count distinct accusers as independent confirmations (Lifeguard); "" (an older peer) counts
    # as none.
    by: str = ""


# -- message kinds (code, name): ONLY APPEND ---------------------------------------------------
@dataclass(frozen=True)
class Ping:
    """Are you there? ``target`` is who the sender thinks it is talking to."""

    CODE = 1
    seq: int
    target: str


@dataclass(frozen=True)
class Ack:
    """Answer to a Ping (or forwarded answer to a PingReq): ``target`` was reached."""

    CODE = 2
    seq: int
    target: str


@dataclass(frozen=True)
class PingReq:
    """Please ping ``target`` for me and forward its Ack (SWIM's indirect probe)."""

    CODE = 3
    seq: int
    target: str
    target_addr: str
    # Appended in protocol version 1: the requester understands ProbeNack, so a helper that gets
    # no Ack from the target within its probe timeout says so (older requesters would reject it).
    nack: bool = False


@dataclass(frozen=True)
class Gossip:
    """Nothing but the envelope's piggybacked rumors."""

    CODE = 4


@dataclass(frozen=True)
class Sync:
    """Anti-entropy, first leg: my complete version vector, my member list, and a summary of
    what I hold above that vector (``held``: see ``Dom.held_above``; older peers send none)."""

    CODE = 5
    cvv: dict = field(default_factory=dict)
    members: tuple = ()
    held: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SyncReply:
    """Anti-entropy, second leg: what you lack (bounded), how far you are then complete, my
    complete version vector, my member list, and a summary of what I hold above my vector."""

    CODE = 6
    entities: tuple = ()
    claims: dict = field(default_factory=dict)
    cvv: dict = field(default_factory=dict)
    members: tuple = ()
    held: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SyncDelta:
    """Anti-entropy, third leg: what the replier lacks (bounded) and its claims."""

    CODE = 7
    entities: tuple = ()
    claims: dict = field(default_factory=dict)


KINDS: dict[int, type] = {k.CODE: k for k in (Ping, Ack, PingReq, Gossip, Sync, SyncReply, SyncDelta)}
NAMES: dict[type, str] = {
    Ping: "ping",
    Ack: "ack",
    PingReq: "ping-req",
    Gossip: "gossip",
    Sync: "sync",
    SyncReply: "sync-reply",
    SyncDelta: "sync-delta",
}


@dataclass(frozen=True)
class Envelope:
    src: str
    src_addr: str
    dst: str | None  # None: the sender does not know who listens there (a seed)
    msg: object
    members: tuple = ()  # piggybacked MemberState rumors
    entities: tuple = ()  # piggybacked DOM entity states (lxml elements)
    version: int = PROTOCOL_VERSION


# -- consensus leases (vmwebd/lease/paxos.py), appended in protocol version 1 ---------------------
# The message classes live with the Paxos core; their codes are fixed here.
def _register_paxos_kinds():
    from vmwebd.lease import paxos

    for code, cls, name in (
        (8, paxos.Prepare, "prepare"),
        (9, paxos.Promise, "promise"),
        (10, paxos.Accept, "accept"),
        (11, paxos.Accepted, "accepted"),
        (12, paxos.Commit, "commit"),
        (13, paxos.Nack, "nack"),
        (16, paxos.Forward, "forward"),
        (17, paxos.Outcome, "outcome"),
    ):
        cls.CODE = code
        KINDS[code] = cls
        NAMES[cls] = name


_register_paxos_kinds()


# -- Lifeguard, appended in protocol version 1 ----------------------------------------------------
@dataclass(frozen=True)
class ProbeNack:
    """A PingReq helper got no Ack from ``target`` within its probe timeout. The requester's
    probe still fails, but hearing this in time shows the requester itself is keeping up: a
    missing nack is what raises its local health score."""

    CODE = 14
    seq: int
    target: str


KINDS[ProbeNack.CODE] = ProbeNack
NAMES[ProbeNack] = "probe-nack"


# -- several consensus messages for one host in one envelope, appended in protocol version 1 -------
@dataclass(frozen=True)
class Bundle:
    """Consensus messages (``vmwebd/lease/paxos.py`` kinds) for one host, taken in order: a
    proposer's Commit of one round and Prepare of the next travel as one request. Sent only to a
    host whose Deliver answers carry ``X-Vmweb-Bundles`` (an older host would refuse the kind)."""

    CODE = 15
    msgs: tuple = ()


KINDS[Bundle.CODE] = Bundle
NAMES[Bundle] = "bundle"
