"""A thin zeep client for the user API, used by the CLI, the tests and the benchmarks.

Addresses: ``https://host:port`` (TLS), ``http://host:port`` or a bare ``host:port`` (plain HTTP).
Over TLS the server's certificate must chain to ``ca`` (a PEM file: the grid's ``ca.crt`` for a
host serving ``api-tls="grid"``) or, without one, to the system's trust store, and must name the
host dialled; a failure raises :class:`ApiTlsError` naming the host.

This module is the command line's only way to the grid, so it imports no server code (no spyne,
no Twisted, no libvirt): ``vmweb`` installs and starts with zeep and requests alone.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import requests
import requests.auth
import zeep
from zeep.helpers import serialize_object
from zeep.transports import Transport


@dataclass
class ApiFault(Exception):
    """A SOAP fault from a vmweb host: ``code`` like ``Client.NoSuchCluster``."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class ApiTlsError(Exception):
    """TLS with a host failed: most often its certificate is not trusted (``reason`` says why)."""

    host: str
    reason: str
    #: True when the certificate itself was refused (untrusted CA, wrong name, expired).
    certificate: bool = True

    def __str__(self) -> str:
        what = "cannot verify the TLS certificate of" if self.certificate else "TLS failed with"
        return f"{what} {self.host}: {self.reason}"


def local_faultcode(code: str) -> str:
    """The faultcode without its namespace prefix: ``soap11env:Client.NameTaken`` → ``Client.NameTaken``."""
    return code.rpartition(":")[2]


def base_url(address: str) -> str:
    """``scheme://host:port`` from ``https://host:port``, ``http://host:port`` or ``host:port``."""
    address = address.strip().rstrip("/")
    scheme, sep, rest = address.partition("://")
    if not sep:
        return f"http://{address}"
    if scheme.lower() not in ("http", "https") or not rest:
        raise ValueError(f"{address!r}: give host:port, http://host:port or https://host:port")
    return f"{scheme.lower()}://{rest}"


def default_ca_file() -> str | bool:
    """The system's trust store (``$SSL_CERT_FILE`` or OpenSSL's default file), else requests' own."""
    cafile = ssl.get_default_verify_paths().cafile
    return cafile if cafile and Path(cafile).is_file() else True


def _ssl_error_in(e: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind a requests exception (wrapped in urllib3's), if any."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ssl.SSLError):
            return x
        todo.extend(a for a in getattr(x, "args", ()) if isinstance(a, BaseException))
        todo.extend(
            v
            for v in (getattr(x, "reason", None), x.__cause__, x.__context__)
            if isinstance(v, BaseException)
        )
    return None


def _tls_error(url: str, e: Exception) -> ApiTlsError:
    err = _ssl_error_in(e)
    if isinstance(err, ssl.SSLCertVerificationError):
        return ApiTlsError(url, f"certificate verify failed: {err.verify_message}".rstrip("."))
    text = str(err if err is not None else e)
    m = re.search(r"\[SSL: [A-Z0-9_]+\] (.+?)(?: \(_ssl\.c:\d+\))?$", text)
    return ApiTlsError(url, m.group(1) if m else text, certificate=False)


class _Session(requests.Session):
    """A session whose ``verify`` wins: requests would let ``$REQUESTS_CA_BUNDLE`` replace it."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self.verify if verify is None else verify
        return settings


class ApiClient:
    """Calls a host's user API; results come back as plain dicts and lists."""

    def __init__(
        self,
        address: str,
        timeout: float = 180.0,
        user: str | None = None,
        password: str | None = None,
        ca: str | Path | None = None,
        connect_timeout: float = 10.0,
    ):
        """``user``/``password``: HTTP Basic credentials sent with every call (the WSDL is public).
        ``ca``: a PEM file of the CA(s) to trust over TLS (default: the system's trust store).
        ``timeout`` bounds each call, ``connect_timeout`` the fetch of the WSDL."""
        self.base = base_url(address)
        self.url = self.base + "/soap"
        self.user = user
        session = _Session()
        if ca is not None:
            if not Path(ca).is_file():
                raise FileNotFoundError(f"CA file {str(ca)!r} does not exist")
            session.verify = str(ca)
        else:
            session.verify = default_ca_file()
        if user is not None:
            session.auth = requests.auth.HTTPBasicAuth(user, password or "")
        transport = Transport(session=session, timeout=connect_timeout, operation_timeout=timeout)
        settings = zeep.Settings(
            strict=True, xml_huge_tree=False, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
        try:
            self._client = zeep.Client(self.url + "?wsdl", transport=transport, settings=settings)
        except requests.exceptions.SSLError as e:
            raise _tls_error(self.base, e) from None
        # The WSDL names the address the client used; bind explicitly anyway.
        self._service = self._client.service

    def call(self, operation: str, *args):
        try:
            result = getattr(self._service, operation)(*args)
        except requests.exceptions.SSLError as e:
            raise _tls_error(self.base, e) from None
        except zeep.exceptions.Fault as f:
            raise ApiFault(local_faultcode(f.code or "Server"), f.message or "") from None
        except zeep.exceptions.TransportError as e:
            if e.status_code == 401:  # a 401 without a SOAP body (e.g. from a proxy)
                raise ApiFault("Client.NotAuthorized", "user name or password refused") from None
            raise
        return _plain(serialize_object(result))


def _plain(value):
    """zeep returns arrays as ``{'TypeName': [...]}`` wrappers and OrderedDicts; flatten both."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((k, v),) = value.items()
            if isinstance(v, list):
                return [_plain(x) for x in v]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(x) for x in value]
    return value


# -- a VM's console ------------------------------------------------------------------------------


class ConsoleRefused(Exception):
    """The host refused the console (a 401, an ``error`` event); ``code`` as a SOAP faultcode."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConsoleConnection:
    """A VM's console over a host's ``/console/CLUSTER/VM`` WebSocket (see docs/console.md):
    ``recv()`` answers ``("output", bytes)`` or ``("ready"|"error"|"end", message)`` (an error's
    faultcode left in ``code``); ``send``
    sends keystrokes in pieces the host takes (at most ``CHUNK`` bytes a message)."""

    #: The largest message sent (the host takes up to 64 KiB).
    CHUNK = 16 * 1024

    def __init__(
        self,
        address: str,
        cluster: str,
        vm: str,
        user: str | None = None,
        password: str | None = None,
        ca: str | Path | None = None,
        timeout: float = 30.0,
    ):
        import base64
        from urllib.parse import quote

        import websocket  # websocket-client: a small blocking client, no server code

        self._ws_mod = websocket
        base = base_url(address)
        scheme, _, rest = base.partition("://")
        url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/console/{quote(cluster, safe='')}/{quote(vm, safe='')}"
        self.what = f"{cluster}/{vm}"
        self.code = ""
        headers = []
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
            headers.append(f"Authorization: Basic {token}")
        sslopt = {"cert_reqs": ssl.CERT_REQUIRED}
        if ca is not None:
            if not Path(ca).is_file():
                raise FileNotFoundError(f"CA file {str(ca)!r} does not exist")
            sslopt["ca_certs"] = str(ca)
        else:
            cafile = default_ca_file()
            if isinstance(cafile, str):
                sslopt["ca_certs"] = cafile
        try:
            self.ws = websocket.create_connection(
                url,
                header=headers,
                sslopt=sslopt,
                timeout=timeout,
                suppress_origin=True,
                enable_multithread=True,
            )
        except websocket.WebSocketBadStatusException as e:
            body = (e.resp_body or b"").decode("utf-8", "replace").strip()
            if e.status_code == 401:
                raise ConsoleRefused(
                    "Client.NotAuthorized", body or "user name or password refused"
                ) from None
            raise ConsoleRefused(
                "Client" if e.status_code < 500 else "Server", f"HTTP {e.status_code}: {body}"
            ) from None
        except ssl.SSLCertVerificationError as e:
            raise ApiTlsError(base, f"certificate verify failed: {e.verify_message}".rstrip(".")) from None
        except ssl.SSLError as e:
            raise ApiTlsError(base, str(e), certificate=False) from None
        except websocket.WebSocketException as e:  # not a WebSocket there, a bad answer
            raise ConnectionError(f"no console WebSocket at {base}: {e}") from None
        # Wait for the host to attach us (what the console printed lately comes first).
        self._backlog: list = []
        while True:
            kind, data = self._recv()
            if kind == "ready":
                break
            if kind == "output":
                self._backlog.append((kind, data))
                continue
            self.close()
            raise ConsoleRefused(self.code or "Server.ConsoleUnavailable", data)
        self.ws.settimeout(None)

    def recv(self):
        """The next output or event; ``("end", why)`` when the connection closed."""
        if self._backlog:
            return self._backlog.pop(0)
        return self._recv()

    def _recv(self):
        ws = self._ws_mod
        try:
            opcode, data = self.ws.recv_data()
        except (ws.WebSocketConnectionClosedException, OSError):
            return "end", f"the connection to the console of {self.what} was lost"
        except ws.WebSocketTimeoutException:
            return "error", f"the host did not answer within {self.ws.gettimeout()} s"
        if opcode == ws.ABNF.OPCODE_BINARY:
            return "output", data
        if opcode == ws.ABNF.OPCODE_TEXT:
            import json

            try:
                doc = json.loads(data)
                self.code = str(doc.get("code") or "Server.ConsoleUnavailable")
                return str(doc["event"]), str(doc.get("message", ""))
            except (ValueError, KeyError, TypeError):
                return "error", "the host sent a malformed event"
        return "end", f"the console of {self.what} closed"

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), self.CHUNK):
            self.ws.send_binary(data[i : i + self.CHUNK])

    def close(self) -> None:
        try:
            self.ws.close(timeout=2)
        except Exception:
            pass  # already gone: nothing to release but the socket, which close() freed
