"""The peer SOAP endpoint (``urn:vmweb:peer:1``): one operation, ``Deliver(envelope)``.

Every peer message kind travels as an envelope (see :mod:`vmwebd.gossip.codec`). With mutual TLS,
the connection's verified client certificate names the sending host, and an envelope claiming to
come from another host is refused (``Client.NotAuthorized``).
"""

from __future__ import annotations

from lxml import etree
from spyne import AnyXml, Service, Unicode, rpc
from twisted.internet import defer

from vmwebd.api import compat

compat.apply()

from vmwebd.api.soap import answer_direct, build_soap_resource, call_element  # noqa: E402
from vmwebd.errors import MalformedRequest, NotAuthorized  # noqa: E402
from vmwebd.gossip.codec import NS, decode  # noqa: E402
from vmwebd.gossip.service import BUNDLES_HEADER, REPLIES_HEADER, replies_element  # noqa: E402

PEER_SERVICE_NAME = "VmwebPeer"


_UNKNOWN = object()


def _cached_identity(identity_of):
    """``identity_of(request)``, read once per connection: the client certificate of a TLS
    connection does not change, and reading it for every request cost ~0.1 ms each."""

    def identity(req):
        channel = getattr(req, "channel", None)
        who = getattr(channel, "_vmweb_peer_id", _UNKNOWN)
        if who is _UNKNOWN:
            who = identity_of(req)
            if channel is not None:
                channel._vmweb_peer_id = who
        return who

    return identity


def _answer(replies) -> str:
    """Deliver's result: "ok", or the envelopes answered inline, as a ``<replies>`` document."""
    if not replies:
        return "ok"
    return etree.tostring(replies_element(replies), encoding="unicode")


def _deliverer(gossip, require_identity: bool, identity_of):
    """``deliver(envelope element, request)``: the one thing the endpoint does, fired with
    Deliver's string result (both the spyne operation and the direct path call it)."""
    if identity_of is not None:
        identity_of = _cached_identity(identity_of)

    def deliver(envelope, request):
        if envelope is None:
            raise MalformedRequest("Deliver: envelope is required")
        env = decode(envelope)
        if require_identity:
            who = identity_of(request)
            if who != env.src:
                raise NotAuthorized(
                    f"envelope claims to come from {env.src!r} but the connection's certificate is {who!r}"
                )
        # A sender that reads replies in the response gets them there (see REPLIES_HEADER).
        inline = request.getHeader(REPLIES_HEADER) == b"1"
        request.setHeader(BUNDLES_HEADER, b"1")
        return gossip.receive(env, inline).addCallback(_answer)

    return deliver


def make_peer_service(gossip, require_identity: bool, identity_of, deliver=None):
    deliver = deliver or _deliverer(gossip, require_identity, identity_of)

    class VmwebPeer(Service):
        @rpc(AnyXml, _returns=Unicode)
        def Deliver(ctx, envelope):
            return deliver(envelope, ctx.transport.req)

    return VmwebPeer


def _direct_deliver(deliver):
    """Every peer message is one Deliver of one envelope: served without spyne's per-request
    machinery (a second parse of the body, schema validation, contexts, its serializer), which
    was about 60% of a peer request's time in the daemon (py-spy, 5 daemons creating clusters
    at once, measured 2026-12-02). The answer is what spyne sends; any other shape of call is
    left to spyne."""

    def direct(request, root, obs):
        call = call_element(root, NS, "Deliver")
        if call is None:
            return None
        args = [c for c in call if isinstance(c.tag, str)]
        if len(args) != 1 or args[0].tag != f"{{{NS}}}envelope":
            return None
        inner = [c for c in args[0] if isinstance(c.tag, str)]
        if len(inner) != 1:
            return None
        return answer_direct(request, defer.maybeDeferred(deliver, inner[0], request), NS, "Deliver", obs)

    return direct


def build_peer_api(
    gossip, max_body_bytes: int, require_identity: bool = False, identity_of=None, direct: bool = True
):
    """The peer endpoint's resource; ``direct=False`` serves every call through spyne (the
    tests compare both)."""
    deliver = _deliverer(gossip, require_identity, identity_of)
    return build_soap_resource(
        [make_peer_service(gossip, require_identity, identity_of, deliver)],
        tns=NS,
        name=PEER_SERVICE_NAME,
        max_body_bytes=max_body_bytes,
        direct=_direct_deliver(deliver) if direct else None,
    )
