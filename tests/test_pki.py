"""The cluster CA and host certificates (vmwebd.gossip.pki), and mutual TLS on loopback (.tls).

The network tests run a twisted.web Site behind :func:`server_context` on 127.0.0.1 with the real
reactor (pytest-twisted) and call it with a real ``Agent``; the resource records whether it was
ever rendered, so a refused peer is shown to be cut off before the HTTP layer read anything.
"""

from __future__ import annotations

import datetime
import ipaddress
import stat
from dataclasses import replace

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.error import ConnectError
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from vmwebd.errors import CertificateError, InvalidArgument
from vmwebd.gossip import pki, tls


# -- files -----------------------------------------------------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    """A cluster CA with host1 (sharing the CA's directory, as `vmweb init` does) and host2."""
    ca = pki.init_ca(tmp_path / "ca", grid_name="lab")
    pki.issue_host_cert(ca.directory, "host1", ca.directory, addresses=("127.0.0.1",))
    pki.issue_host_cert(ca.directory, "host2", tmp_path / "host2")
    return tmp_path


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_writes_a_self_signed_ca_with_a_private_key(tmp_path):
    """init_ca writes ca.key (0600) and a self-signed 10-year CA certificate with pathlen 0."""
    paths = pki.init_ca(tmp_path / "pki", grid_name="lab")
    assert paths.key == tmp_path / "pki" / "ca.key" and paths.cert == tmp_path / "pki" / "ca.crt"
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    cert = _cert(paths.cert)
    cert.verify_directly_issued_by(cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=3650)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "lab"


def test_init_ca_refuses_to_overwrite_an_existing_ca(tmp_path):
    """A second init_ca in the same directory fails, naming the existing file, and changes nothing."""
    paths = pki.init_ca(tmp_path)
    before = paths.key.read_bytes(), paths.cert.read_bytes()
    with pytest.raises(CertificateError, match="already exists") as e:
        pki.init_ca(tmp_path)
    assert str(paths.key) in str(e.value)
    assert (paths.key.read_bytes(), paths.cert.read_bytes()) == before


def test_issue_host_cert_names_the_host_and_its_addresses(cluster):
    """A host certificate has CN and DNS SAN = host id, the given IP SANs, both EKUs, 2 years."""
    host_dir = cluster / "ca"
    cert, ca = _cert(host_dir / "host.crt"), _cert(host_dir / "ca.crt")
    cert.verify_directly_issued_by(ca)
    assert pki.host_id_of(cert) == "host1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=731)
    assert stat.S_IMODE((host_dir / "host.key").stat().st_mode) == 0o600
    assert (cluster / "host2" / "ca.crt").read_bytes() == (cluster / "ca" / "ca.crt").read_bytes()


@pytest.mark.parametrize("bad", ["", "Host1", "-host", "host_1", "h" * 64, "host 1", "hôst"])
def test_issue_host_cert_refuses_a_bad_host_id(tmp_path, bad):
    """A host id outside [a-z0-9][a-z0-9-]{0,62} is refused as an invalid host_id argument."""
    pki.init_ca(tmp_path / "ca")
    with pytest.raises(InvalidArgument, match="host_id"):
        pki.issue_host_cert(tmp_path / "ca", bad, tmp_path / "h")
    assert not (tmp_path / "h" / "host.key").exists()


def test_issue_host_cert_refuses_a_bad_address(tmp_path):
    """An address that is neither an IP nor a DNS name is refused, naming the field."""
    pki.init_ca(tmp_path / "ca")
    with pytest.raises(InvalidArgument, match="addresses"):
        pki.issue_host_cert(tmp_path / "ca", "host1", tmp_path / "h", addresses=("not an address",))


def test_issue_host_cert_refuses_to_overwrite_unless_asked(cluster):
    """Issuing again into a host directory fails naming host.key; replace=True re-issues."""
    old = (cluster / "host2" / "host.crt").read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite") as e:
        pki.issue_host_cert(cluster / "ca", "host2", cluster / "host2")
    assert str(cluster / "host2" / "host.key") in str(e.value)
    pki.issue_host_cert(cluster / "ca", "host2", cluster / "host2", replace=True)
    assert (cluster / "host2" / "host.crt").read_bytes() != old
    assert pki.load_host_credentials(cluster / "host2").host_id == "host2"


def test_issue_host_cert_without_a_ca_names_the_missing_file(tmp_path):
    """Issuing from a directory without a CA fails naming ca.crt."""
    with pytest.raises(CertificateError, match="missing") as e:
        pki.issue_host_cert(tmp_path, "host1", tmp_path / "h")
    assert str(tmp_path / "ca.crt") in str(e.value)


def test_load_host_credentials_returns_pems_and_host_id(cluster):
    """Loading a host directory returns the three PEMs and the host id named by the certificate."""
    creds = pki.load_host_credentials(cluster / "host2")
    assert creds.host_id == "host2"
    assert creds.ca_pem == (cluster / "ca" / "ca.crt").read_bytes()
    assert b"PRIVATE KEY" in creds.key_pem and "PRIVATE" not in repr(creds)


@pytest.mark.parametrize("name", ["ca.crt", "host.crt", "host.key"])
def test_load_host_credentials_names_a_missing_file(cluster, name):
    """A missing credential file is reported with its full path."""
    (cluster / "host2" / name).unlink()
    with pytest.raises(CertificateError, match="missing") as e:
        pki.load_host_credentials(cluster / "host2")
    assert str(cluster / "host2" / name) in str(e.value)


def test_load_host_credentials_refuses_a_cert_from_another_ca(cluster):
    """A host certificate not issued by the CA in ca.crt is refused, naming host.crt."""
    pki.init_ca(cluster / "other")
    (cluster / "host2" / "ca.crt").write_bytes((cluster / "other" / "ca.crt").read_bytes())
    with pytest.raises(CertificateError, match="not issued by the cluster CA") as e:
        pki.load_host_credentials(cluster / "host2")
    assert str(cluster / "host2" / "host.crt") in str(e.value)


def test_load_host_credentials_refuses_a_key_that_is_not_the_certificates(cluster):
    """A host.key belonging to another certificate is refused, naming host.key."""
    (cluster / "host2" / "host.key").write_bytes((cluster / "ca" / "host.key").read_bytes())
    with pytest.raises(CertificateError, match="not the key") as e:
        pki.load_host_credentials(cluster / "host2")
    assert str(cluster / "host2" / "host.key") in str(e.value)


def test_load_host_credentials_refuses_an_expired_certificate(cluster):
    """A host certificate past its end date is refused, naming host.crt and the date."""
    ca_key = serialization.load_pem_private_key((cluster / "ca" / "ca.key").read_bytes(), None)
    ca = _cert(cluster / "ca" / "ca.crt")
    cert = _cert(cluster / "host2" / "host.crt")
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=800))
        .not_valid_after(now - datetime.timedelta(days=70))
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    expired = builder.sign(ca_key, hashes.SHA256())
    (cluster / "host2" / "host.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateError, match="expired on") as e:
        pki.load_host_credentials(cluster / "host2")
    assert str(cluster / "host2" / "host.crt") in str(e.value)


def test_load_host_credentials_refuses_garbage(cluster):
    """A file that is not PEM is refused, naming it."""
    (cluster / "host2" / "host.crt").write_text("hello")
    with pytest.raises(CertificateError, match="not a PEM") as e:
        pki.load_host_credentials(cluster / "host2")
    assert str(cluster / "host2" / "host.crt") in str(e.value)


def test_host_id_of_reads_pyopenssl_and_cryptography_certificates(cluster):
    """host_id_of gives the CN of a cryptography certificate and of a pyOpenSSL X509 alike."""
    pem = (cluster / "host2" / "host.crt").read_bytes()
    assert pki.host_id_of(x509.load_pem_x509_certificate(pem)) == "host2"
    assert pki.host_id_of(ssl.Certificate.loadPEM(pem).original) == "host2"
    assert pki.host_id_of(None) is None


def test_peer_host_id_is_none_without_tls():
    """A request that did not arrive over TLS has no peer host id."""
    assert tls.peer_host_id(DummyRequest([b""])) is None


# -- mutual TLS on loopback ----------------------------------------------------------------------
class Recorder(Resource):
    """Answers every request with the caller's host id, and remembers that it was rendered."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.rendered = 0

    def render_GET(self, request):
        self.rendered += 1
        return (tls.peer_host_id(request) or "-").encode()


@implementer(IPolicyForHTTPS)
class TrustCaOnly:
    """Trusts the cluster CA (and checks the server's name) but presents no client certificate."""

    def __init__(self, ca_pem: bytes):
        self.ca = ssl.Certificate.loadPEM(ca_pem)

    def creatorForNetloc(self, hostname, port):
        return ssl.optionsForClientTLS("host1", trustRoot=self.ca)


@pytest.fixture
def net(cluster):
    """host1 serving a Recorder behind server_context on 127.0.0.1; creds of host2 and intruders."""
    pki.init_ca(cluster / "other", grid_name="other")
    pki.issue_host_cert(cluster / "other", "host2", cluster / "intruder")
    pki.issue_host_cert(cluster / "other", "host1", cluster / "impostor")
    resource = Recorder()
    host1 = pki.load_host_credentials(cluster / "ca")
    port = tls.listen_tls(reactor, 0, Site(resource), host1, "127.0.0.1")
    listening = []

    class Net:
        recorder = resource
        url = f"https://127.0.0.1:{port.getHost().port}/".encode()
        creds = {
            name: pki.load_host_credentials(cluster / name) for name in ("host2", "intruder", "impostor")
        }
        creds["host1"] = host1

        @staticmethod
        def listen(site_resource, context):
            p = reactor.listenSSL(0, Site(site_resource), context, interface="127.0.0.1")
            listening.append(p)
            return f"https://127.0.0.1:{p.getHost().port}/".encode()

    yield Net
    for p in [port] + listening:
        pytest_twisted.blockon(p.stopListening())


def _agent(policy):
    return Agent(reactor, contextFactory=policy, pool=HTTPConnectionPool(reactor, persistent=False))


REFUSED = (ResponseNeverReceived, ResponseFailed, ConnectError, SSL.Error)


def _reasons(failure_value) -> str:
    """The text of an Agent failure including the TLS errors it wraps."""
    inner = getattr(failure_value, "reasons", None) or []
    return " ".join([str(failure_value)] + [f.getErrorMessage() for f in inner])


@pytest_twisted.inlineCallbacks
def test_peer_with_a_cluster_certificate_is_served_and_identified(net):
    """A client with host2's certificate from the cluster CA gets 200 and is identified as host2."""
    response = yield _agent(tls.client_policy(net.creds["host2"])).request(b"GET", net.url)
    body = yield readBody(response)
    assert (response.code, body) == (200, b"host2")
    assert net.recorder.rendered == 1


@pytest_twisted.inlineCallbacks
def test_peer_with_a_certificate_from_another_ca_is_refused_before_http(net):
    """A client whose certificate comes from another CA fails and the resource is never rendered."""
    # The intruder trusts our CA, so the only check that can fail is the server's check of its
    # certificate (the server answers with an "unknown ca" alert).
    intruder = replace(net.creds["intruder"], ca_pem=net.creds["host2"].ca_pem)
    with pytest.raises(REFUSED) as e:
        yield _agent(tls.client_policy(intruder)).request(b"GET", net.url)
    assert "unknown ca" in _reasons(e.value)
    assert net.recorder.rendered == 0


@pytest_twisted.inlineCallbacks
def test_peer_without_a_certificate_is_refused_before_http(net):
    """A client that trusts the cluster CA but presents no certificate fails and nothing is rendered."""
    with pytest.raises(REFUSED) as e:
        yield _agent(TrustCaOnly(net.creds["host2"].ca_pem)).request(b"GET", net.url)
    assert "certificate required" in _reasons(e.value) or "handshake failure" in _reasons(e.value)
    assert net.recorder.rendered == 0


@pytest_twisted.inlineCallbacks
def test_client_refuses_a_server_certificate_from_another_ca(net):
    """client_policy refuses a server whose certificate comes from another CA, even one asking nothing of us."""
    impostor = ssl.PrivateCertificate.loadPEM(net.creds["impostor"].cert_pem + net.creds["impostor"].key_pem)
    evil = Recorder()
    url = net.listen(
        evil, ssl.CertificateOptions(privateKey=impostor.privateKey.original, certificate=impostor.original)
    )
    with pytest.raises(REFUSED) as e:
        yield _agent(tls.client_policy(net.creds["host2"])).request(b"GET", url)
    assert "certificate verify failed" in _reasons(e.value)
    assert evil.rendered == 0


@pytest_twisted.inlineCallbacks
def test_client_checks_the_expected_host_id_when_given(net):
    """With expected_host_id, the server's certificate must name that host: host1 passes, host3 fails."""
    response = yield _agent(tls.client_policy(net.creds["host2"], expected_host_id="host1")).request(
        b"GET", net.url
    )
    assert response.code == 200
    yield readBody(response)
    policy = tls.client_policy(net.creds["host2"], expected_host_id=lambda host, port: "host3")
    with pytest.raises(REFUSED) as e:
        yield _agent(policy).request(b"GET", net.url)
    assert "host3" in _reasons(e.value) or "VerificationError" in _reasons(e.value)
    assert net.recorder.rendered == 1
