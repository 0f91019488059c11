"""The cluster's certificate authority and host certificates for the mutual-TLS peer endpoint.

Pure functions and file helpers on top of ``cryptography``; no Twisted (see :mod:`.tls`).

Files (the names are a contract with the CLI and the daemon)::

    CA directory      ca.key (0600)   ca.crt
    host directory    host.key (0600) host.crt   ca.crt (a copy of the cluster CA's certificate)

The CA and the first host may share one directory (``vmweb init`` on the first host); then the
copy of ``ca.crt`` is the file itself. Keys are EC P-256: every TLS stack we meet handles it.

A host certificate names its host: CN = host id, SAN DNS:<host id> (plus the IP addresses and DNS
names it was issued for), extended key usage serverAuth + clientAuth, because every daemon is both
the server and the client of its peers. The CA has ``pathlen:0``, so a host certificate can never
issue further certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmwebd.atomicfile import write_atomic
from vmwebd.errors import CertificateError, InvalidArgument
from vmwebd.ids import is_host_id

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
HOST_KEY = "host.key"
HOST_CERT = "host.crt"

CA_VALIDITY = datetime.timedelta(days=3650)
HOST_VALIDITY = datetime.timedelta(days=730)
# Certificates start a little in the past so that a peer whose clock lags a few minutes behind
# the issuing host's does not refuse a fresh certificate as "not yet valid".
CLOCK_SKEW = datetime.timedelta(minutes=10)

_DNS_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", re.IGNORECASE
)


@dataclass(frozen=True)
class CaPaths:
    """Where :func:`init_ca` wrote the cluster CA."""

    directory: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class HostCertPaths:
    """Where :func:`issue_host_cert` wrote a host's credentials."""

    directory: Path
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class HostCredentials:
    """A host's verified TLS credentials, as PEM bytes, and the host id its certificate names."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    host_id: str


# -- validation ----------------------------------------------------------------------------------
def check_host_id(host_id: str) -> str:
    """Returns ``host_id`` if it is a valid host id, else raises :class:`InvalidArgument`."""
    if not is_host_id(host_id):
        raise InvalidArgument(
            "host_id",
            f"{host_id!r} is not a host id (lower-case letters, digits "
            "and '-', starting with a letter or digit, at most 63 characters)",
        )
    return host_id


def _check_grid_name(grid_name: str) -> str:
    if (
        not isinstance(grid_name, str)
        or not grid_name.strip()
        or len(grid_name) > 53
        or any(not c.isprintable() for c in grid_name)
    ):
        raise InvalidArgument("grid_name", f"{grid_name!r} must be 1 to 53 printable characters")
    return grid_name


def _san_entries(host_id: str, addresses) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(host_id)]
    for a in addresses:
        text = str(a).strip()
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            if not _DNS_RE.fullmatch(text):
                raise InvalidArgument(
                    "addresses", f"{text!r} is neither an IP address nor a DNS name"
                ) from None
            entry: x509.GeneralName = x509.DNSName(text.lower())
        else:
            entry = x509.IPAddress(ip)
        if entry not in names:
            names.append(entry)
    return names


# -- files ---------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes, mode: int, replace: bool) -> None:
    """Writes ``path`` whole or not at all (:func:`vmwebd.atomicfile.write_atomic`).

    Without ``replace``, ``os.link`` refuses an existing target atomically, so two concurrent
    ``vmweb init`` never leave a CA key that does not match its certificate.
    """
    try:
        write_atomic(path, data, mode=mode, replace=replace)
    except FileExistsError:
        raise CertificateError(path, "already exists; refusing to overwrite it") from None


def _make_dir(directory) -> Path:
    d = Path(directory)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CertificateError(d, f"cannot create the directory: {e.strerror}") from None
    return d


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(path, f"{what} is missing") from None
    except OSError as e:
        raise CertificateError(path, f"cannot read the {what}: {e.strerror}") from None


def _load_cert(path: Path, data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CertificateError(path, f"is not a PEM {what}: {e}") from None


def _load_key(path: Path, data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(path, f"is not an unencrypted PEM private key: {e}") from None


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _same_key(key, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# -- the CA --------------------------------------------------------------------------------------
def init_ca(directory, grid_name: str = "vmweb") -> CaPaths:
    """Creates the cluster CA in ``directory``: ``ca.key`` (0600) and a self-signed ``ca.crt``.

    EC P-256, valid 10 years, ``basicConstraints CA:TRUE, pathlen:0``, ``keyUsage keyCertSign,
    cRLSign``. Refuses (:class:`CertificateError` naming the file) if either file exists.
    """
    _check_grid_name(grid_name)
    d = _make_dir(directory)
    paths = CaPaths(d, d / CA_CERT, d / CA_KEY)
    for p in (paths.key, paths.cert):
        if p.exists():
            raise CertificateError(p, "a cluster CA already exists here; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, grid_name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{grid_name} cluster CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a key without a certificate, which init refuses to
    # overwrite and a person can inspect, never a certificate whose key is lost.
    _write_file(paths.key, _key_pem(key), 0o600, replace=False)
    _write_file(paths.cert, _cert_pem(cert), 0o644, replace=False)
    return paths


def _load_ca(ca_dir: Path):
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    cert = _load_cert(cert_path, _read(cert_path, "cluster CA certificate"), "certificate")
    key = _load_key(key_path, _read(key_path, "cluster CA key"))
    if not _same_key(key, cert):
        raise CertificateError(key_path, f"is not the key of the CA certificate {cert_path}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CertificateError(cert_path, "is not a CA certificate")
    if cert.not_valid_after_utc <= _now():
        raise CertificateError(cert_path, f"the cluster CA expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def issue_host_cert(ca_dir, host_id: str, out_dir, addresses=(), replace: bool = False) -> HostCertPaths:
    """Issues host ``host_id`` a key (``host.key``, 0600) and a certificate (``host.crt``) signed by
    the CA in ``ca_dir``, valid 2 years, and copies ``ca.crt`` into ``out_dir``.

    ``addresses`` are IP addresses (IP SANs) or DNS names (DNS SANs) the host is also known by.
    Refuses to overwrite existing host credentials unless ``replace``; refuses a different CA
    certificate already in ``out_dir`` likewise.
    """
    check_host_id(host_id)
    sans = _san_entries(host_id, addresses)
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = _load_ca(ca_dir)
    d = _make_dir(out_dir)
    paths = HostCertPaths(d, d / HOST_CERT, d / HOST_KEY, d / CA_CERT)
    ca_pem = _cert_pem(ca_cert)
    if not replace:
        for p in (paths.key, paths.cert):
            if p.exists():
                raise CertificateError(p, "host credentials already exist here; refusing to overwrite them")
    copy_ca = True
    if paths.ca.exists():
        existing = paths.ca.read_bytes()
        if paths.ca.resolve() == (ca_dir / CA_CERT).resolve() or existing == ca_pem:
            copy_ca = False
        elif not replace:
            raise CertificateError(
                paths.ca, f"holds another CA certificate than {ca_dir / CA_CERT}; refusing to overwrite it"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + HOST_VALIDITY, ca_cert.not_valid_after_utc)
    org = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    subject = x509.Name(list(org[:1]) + [x509.NameAttribute(NameOID.COMMON_NAME, host_id)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    if copy_ca:
        _write_file(paths.ca, ca_pem, 0o644, replace=True)
    _write_file(paths.key, _key_pem(key), 0o600, replace=replace)
    _write_file(paths.cert, _cert_pem(cert), 0o644, replace=replace)
    return paths


# -- loading ---------------------------------------------------------------------------------------
def host_id_of(cert) -> str | None:
    """The CN of a certificate (pyOpenSSL ``X509`` or ``cryptography`` certificate), or None."""
    if cert is None:
        return None
    if not isinstance(cert, x509.Certificate):
        cert = cert.to_cryptography()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        return None
    value = cns[0].value
    return value.decode() if isinstance(value, bytes) else value


def load_host_credentials(cert_dir) -> HostCredentials:
    """Reads and checks ``ca.crt``, ``host.crt`` and ``host.key`` in ``cert_dir``.

    Refuses (:class:`CertificateError` naming the file) a missing or unreadable file, a key that is
    not the certificate's, a certificate not issued by that CA, an expired or not yet valid one,
    and one whose CN is not a host id.
    """
    d = Path(cert_dir)
    ca_path, cert_path, key_path = d / CA_CERT, d / HOST_CERT, d / HOST_KEY
    ca_pem = _read(ca_path, "cluster CA certificate")
    cert_pem = _read(cert_path, "host certificate")
    key_pem = _read(key_path, "host key")
    ca = _load_cert(ca_path, ca_pem, "certificate")
    cert = _load_cert(cert_path, cert_pem, "certificate")
    key = _load_key(key_path, key_pem)
    if not _same_key(key, cert):
        raise CertificateError(key_path, f"is not the key of the certificate {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(cert_path, f"was not issued by the cluster CA in {ca_path}") from None
    now = _now()
    for path, c, what in ((ca_path, ca, "the cluster CA"), (cert_path, cert, "the host certificate")):
        if c.not_valid_after_utc <= now:
            raise CertificateError(path, f"{what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if c.not_valid_before_utc > now:
            raise CertificateError(
                path, f"{what} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
    host_id = host_id_of(cert)
    if not is_host_id(host_id):
        raise CertificateError(cert_path, f"its common name {host_id!r} is not a host id")
    return HostCredentials(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, host_id=host_id)
