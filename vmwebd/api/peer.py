"""The peer SOAP endpoint (``urn:vmweb:peer:1``): one operation, ``Deliver(envelope)``.

Every peer message kind travels as an envelope (see :mod:`vmwebd.gossip.codec`). With mutual TLS,
the connection's verified client certificate names the sending host, and an envelope claiming to
come from another host is refused (``Client.NotAuthorized``).
"""
from __future__ import annotations

from spyne import AnyXml, Service, Unicode, rpc

from vmwebd.api import compat

compat.apply()

from vmwebd.api.soap import build_soap_resource  # noqa: E402
from vmwebd.errors import MalformedRequest, NotAuthorized  # noqa: E402
from vmwebd.gossip.codec import NS, decode  # noqa: E402

PEER_SERVICE_NAME = "VmwebPeer"


def make_peer_service(gossip, require_identity: bool, identity_of):
    class VmwebPeer(Service):
        @rpc(AnyXml, _returns=Unicode)
        def Deliver(ctx, envelope):
            if envelope is None:
                raise MalformedRequest("Deliver: envelope is required")
            env = decode(envelope)
            if require_identity:
                who = identity_of(ctx.transport.req)
                if who != env.src:
                    raise NotAuthorized(f"envelope claims to come from {env.src!r} but the "
                                        f"connection's certificate is {who!r}")
            return gossip.receive(env).addCallback(lambda _: "ok")
    return VmwebPeer


def build_peer_api(gossip, max_body_bytes: int, require_identity: bool = False, identity_of=None):
    return build_soap_resource([make_peer_service(gossip, require_identity, identity_of)],
                               tns=NS, name=PEER_SERVICE_NAME, max_body_bytes=max_body_bytes)
