"""Consensus messages over the peer endpoint: bundles out, answers back on the same exchange.

A proposer's messages for one host leave as one ``Deliver`` (several in a :class:`Bundle` when
the host reads bundles), asking for the answers inline (``X-Vmweb-Replies``): the acceptor's
Promise, Accepted or Nack comes back in the Deliver response, once what it depends on is durable
there, instead of as a request of its own. Answers are taken only from the host asked (the
answering envelope's ``src`` must be the host the request went to, whose certificate the TLS
connection checked). A peer that answers "ok" (an older one) sends its answers as requests, which
arrive through :meth:`PaxosTransport.deliver` like any other.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from vmwebd.gossip.codec import answers_from, encode
from vmwebd.gossip.messages import Bundle, Envelope
from vmwebd.lease import paxos
from vmwebd.wiring import LeaseReceiver, PeerDirectory

log = Logger()
KINDS = (
    paxos.Prepare,
    paxos.Promise,
    paxos.Accept,
    paxos.Accepted,
    paxos.Commit,
    paxos.Nack,
    paxos.Forward,
    paxos.Outcome,
)


class PaxosTransport:
    """Sends a lease service's messages to peers and delivers theirs to it.

    ``client`` is the gossip layer's :class:`~vmwebd.gossip.service.PeerClient` (kept
    connections); ``address_of(host)`` says where a host's peer endpoint is (None: unknown, the
    message is dropped); ``my_address()`` is this host's own peer address, for envelopes."""

    def __init__(
        self,
        me: str,
        client,
        address_of: PeerDirectory,
        my_address: Callable[[], str | None],
        leases: LeaseReceiver | None = None,
    ):
        self.me = me
        self.client = client
        self.address_of = address_of
        self.my_address = my_address
        self.leases = leases  # the LeaseService that delivered messages go to
        self.requests = 0

    def send(self, dst: str, msgs, timeout: float | None = None) -> defer.Deferred:
        """Sends ``msgs`` (in order) to host ``dst``; fires True if they were delivered. A failed
        send is a lost message: the Paxos core copes."""
        if not isinstance(msgs, (list, tuple)):
            msgs = [msgs]
        addr = self.address_of(dst)
        if addr is None or not msgs:
            return defer.succeed(False)
        if len(msgs) == 1:
            units = [msgs[0]]
        elif self.client.reads_bundles(addr):
            units = [Bundle(tuple(msgs))]
        else:
            units = list(msgs)  # an older peer, or not heard from yet: one request each
        ds = []
        for msg in units:
            self.requests += 1
            env = Envelope(self.me, self.my_address(), dst, msg)
            ds.append(
                self.client.send(
                    addr,
                    encode(env),
                    on_reply=lambda els, dst=dst: self._answered(dst, els),
                    **({"timeout": timeout} if timeout else {}),
                )
            )
        if len(ds) == 1:
            return ds[0]
        return defer.gatherResults(ds).addCallback(all)

    def _answered(self, dst: str, elements) -> None:
        """Answers that came back in a Deliver response: only from the host asked."""
        msgs = [env.msg for env in answers_from(dst, elements) if isinstance(env.msg, KINDS)]
        if msgs and self.leases is not None:
            self.leases.receive(dst, msgs)

    def deliver(self, env: Envelope, inline: bool = False) -> defer.Deferred:
        """A consensus envelope from the peer endpoint; fires once its effects are durable, with
        the answers to its sender encoded as envelopes when ``inline``."""
        if self.leases is None or (env.dst is not None and env.dst != self.me):
            # Not started yet, or meant for a host that was here before: a lost message.
            return defer.succeed([] if inline else None)
        msgs = list(env.msg.msgs) if isinstance(env.msg, Bundle) else [env.msg]
        d = self.leases.receive(env.src, msgs, inline=inline)
        if not inline:
            return d
        return d.addCallback(
            lambda replies: [encode(Envelope(self.me, self.my_address(), env.src, m)) for m in replies]
        )
