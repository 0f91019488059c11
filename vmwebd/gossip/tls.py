"""Mutual TLS for the peer endpoint under the cluster CA (Twisted side of :mod:`.pki`).

Server: :func:`server_context` demands a client certificate that chains to the cluster CA. The
check runs inside the TLS handshake, so a peer with no certificate, or one from another CA, is cut
off before the HTTP layer has read a single byte (``TLSMemoryBIOProtocol`` hands application data
to the wrapped protocol only after a successful handshake).

Client: :func:`client_policy` is an ``IPolicyForHTTPS`` for ``twisted.web.client.Agent``. It
presents this host's certificate and checks that the server's certificate chains to the cluster
CA. Peers are dialled by ``address:port`` (often an IP, sometimes behind NAT), and addresses are
not what identifies a host, so the dialled name is *not* checked against the certificate. When the
caller knows which host it means to reach, ``expected_host_id`` (a host id, or a function of
``(hostname, port)`` returning one or None) additionally requires the server's certificate to
name that host (its DNS SAN, checked by ``service_identity``).

Identity of a sender: :func:`peer_host_id` gives the host id (CN) of the verified client
certificate of the connection a request arrived on; the peer SOAP endpoint compares it with the
host an envelope claims to come from.
"""

from __future__ import annotations

from typing import Callable, Union

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from vmwebd.gossip.pki import HostCredentials, host_id_of

MINIMUM_TLS = ssl.TLSVersion.TLSv1_2

ExpectedHostId = Union[str, Callable[[bytes, int], "str | None"], None]


def _private_certificate(creds: HostCredentials) -> ssl.PrivateCertificate:
    return ssl.PrivateCertificate.loadPEM(creds.cert_pem + b"\n" + creds.key_pem)


def _ca_certificate(creds: HostCredentials) -> ssl.Certificate:
    return ssl.Certificate.loadPEM(creds.ca_pem)


def _certificate_options(creds: HostCredentials) -> ssl.CertificateOptions:
    """Our key and certificate; peers must present a certificate issued by the cluster CA."""
    own = _private_certificate(creds)
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        verify=True,
        caCerts=[_ca_certificate(creds).original],
        requireCertificate=True,
        raiseMinimumTo=MINIMUM_TLS,
    )


def server_context(creds: HostCredentials) -> ssl.CertificateOptions:
    """A TLS server context for the peer endpoint: TLS >= 1.2, client certificate required and
    verified against the cluster CA during the handshake."""
    return _certificate_options(creds)


@implementer(IOpenSSLClientConnectionCreator)
class _ChainOnlyCreator:
    """Client connections that verify the server's chain to the cluster CA, not its name."""

    def __init__(self, context: SSL.Context):
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class PeerTLSPolicy:
    """An ``IPolicyForHTTPS`` presenting this host's certificate and trusting only the cluster CA.

    See the module docstring for why the dialled address is not checked, and what
    ``expected_host_id`` adds.
    """

    def __init__(self, creds: HostCredentials, expected_host_id: ExpectedHostId = None):
        self._creds = creds
        self._expected = expected_host_id
        # One OpenSSL context for every chain-only connection: building one per connection
        # would re-parse the key and the CA each time.
        self._context = _certificate_options(creds).getContext()

    def _expected_for(self, hostname: bytes, port: int) -> str | None:
        if callable(self._expected):
            return self._expected(hostname, port)
        return self._expected

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        expected = self._expected_for(hostname, port)
        if expected is None:
            return _ChainOnlyCreator(self._context)
        return ssl.optionsForClientTLS(
            expected,
            trustRoot=_ca_certificate(self._creds),
            clientCertificate=_private_certificate(self._creds),
            extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS},
        )


def client_policy(creds: HostCredentials, expected_host_id: ExpectedHostId = None) -> PeerTLSPolicy:
    """An ``IPolicyForHTTPS`` for ``Agent(reactor, contextFactory=...)`` between peers.

    Always: present ``creds``' host certificate, require the server's to chain to the cluster CA.
    With ``expected_host_id`` (a host id, or ``f(hostname: bytes, port: int) -> host id | None``),
    also require the server's certificate to name that host.
    """
    return PeerTLSPolicy(creds, expected_host_id)


def peer_host_id(request) -> str | None:
    """The host id (CN) of the client certificate of the connection ``request`` arrived on.

    None when the connection is not TLS or carries no client certificate. The certificate was
    verified against the cluster CA during the handshake, which holds for any listener built from
    :func:`server_context` (it refuses every connection without a valid one).
    """
    for transport in (
        getattr(request, "transport", None),
        getattr(getattr(request, "channel", None), "transport", None),
    ):
        get_cert = getattr(transport, "getPeerCertificate", None)
        if get_cert is not None:
            return host_id_of(get_cert())
    return None


def listen_tls(reactor, port: int, site, creds: HostCredentials, interface: str = ""):
    """Listens with ``site`` on ``interface:port`` behind :func:`server_context`; returns the
    ``IListeningPort``."""
    return reactor.listenSSL(port, site, server_context(creds), interface=interface)
