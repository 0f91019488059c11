"""TLS for the user API port (SOAP at ``/soap`` and the web pages), chosen by ``listen/@api-tls``.

* ``off`` (default): plain HTTP. Basic credentials and session cookies travel in clear, so this is
  meant for loopback; the daemon logs a warning when it listens elsewhere without TLS.
* ``grid``: the host's grid certificate (``host.crt``/``host.key`` in ``peers/@cert-dir``, issued by
  the grid CA). Server authentication only: users have no client certificates, so unlike the peer
  endpoint nobody is asked for one. Clients trust the grid CA (``vmweb --ca ca.crt``); the
  certificate names the host id and the addresses it was issued for.
* ``files``: a certificate (optionally followed by its intermediate CAs) and an unencrypted key the
  admin provides (``listen/@api-cert``, ``listen/@api-key``), e.g. from a public CA. Read at start:
  restart the daemon after renewing them.

TLS 1.2 at least, as for peers. :func:`check_cert_files` is pure ``cryptography`` (the config
loader uses it); :func:`server_options` builds the Twisted context factory.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from vmwebd.errors import CertificateError, ConfigError

TLS_MODES = ("off", "grid", "files")


class CertFileError(CertificateError):
    """A problem with the API's certificate (``role`` ``"cert"``) or key (``"key"``) file."""

    def __init__(self, path, message: str, role: str):
        super().__init__(path, message)
        self.role = role


def is_loopback(host: str) -> bool:
    """Whether a listen host only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grid_cert_dir(config) -> Path:
    """Where this host's grid certificate lives: ``peers/@cert-dir``, default ``<state dir>/pki``."""
    return config.peers.cert_dir or (config.state_dir / "pki")


def _read(path: Path, role: str) -> bytes:
    what = "certificate" if role == "cert" else "key"
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertFileError(path, f"the {what} does not exist", role) from None
    except OSError as e:
        raise CertFileError(path, f"cannot read the {what}: {e.strerror}", role) from None


def load_cert_files(cert_path, key_path):
    """Reads and checks an admin-provided certificate (chain) and key; returns them as
    ``(certificates, key)`` (``cryptography`` objects, the server's own certificate first).

    Raises :class:`CertFileError` naming the file: missing or unreadable, not PEM, an encrypted
    key, a key that is not the certificate's, a certificate expired or not yet valid. The two may
    be one file holding both.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert_data, key_data = _read(cert_path, "cert"), _read(key_path, "key")
    try:
        certs = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise CertFileError(
            cert_path, "is not a PEM certificate (-----BEGIN CERTIFICATE-----)", "cert"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CertFileError(
            key_path,
            "is an encrypted key: the daemon needs it unencrypted (readable by its user only)",
            "key",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertFileError(key_path, "is not a PEM private key", "key") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != certs[0].public_key().public_bytes(*fmt):
        raise CertFileError(key_path, f"is not the key of the certificate {cert_path}", "key")
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = certs[0]
    if leaf.not_valid_after_utc <= now:
        raise CertFileError(cert_path, f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", "cert")
    if leaf.not_valid_before_utc > now:
        raise CertFileError(
            cert_path, f"is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", "cert"
        )
    return certs, key


def check_cert_files(cert_path, key_path) -> None:
    """:func:`load_cert_files`, for its checks only."""
    load_cert_files(cert_path, key_path)


def server_options(config):
    """The TLS context factory for the user API listener, or None when ``api-tls`` is ``off``.

    ``grid``: the host's grid credentials (checked like the peer endpoint's, and required to name
    this host). ``files``: :func:`load_cert_files`. Raises :class:`CertificateError` or
    :class:`ConfigError` naming the file.
    """
    mode = config.listen.api_tls
    if mode == "off":
        return None
    from OpenSSL import crypto
    from twisted.internet import ssl

    if mode == "grid":
        from vmwebd.gossip.pki import load_host_credentials

        cert_dir = grid_cert_dir(config)
        creds = load_host_credentials(cert_dir)
        if creds.host_id != config.host.id:
            raise ConfigError(
                str(cert_dir / "host.crt"),
                None,
                "certificate",
                f"is for host {creds.host_id!r}, but this host is {config.host.id!r}",
            )
        certs = [x509.load_pem_x509_certificate(creds.cert_pem)]
        key = serialization.load_pem_private_key(creds.key_pem, password=None)
    else:
        certs, key = load_cert_files(config.listen.api_cert, config.listen.api_key)
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certs[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
