"""A thin zeep client for the user API, used by the CLI, the tests and the benchmarks."""
from __future__ import annotations

from dataclasses import dataclass

import requests
import requests.auth
import zeep
from zeep.helpers import serialize_object
from zeep.transports import Transport

from vmwebd.api.soap import local_faultcode


@dataclass
class ApiFault(Exception):
    """A SOAP fault from a vmweb host: ``code`` like ``Client.NoSuchCluster``."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ApiClient:
    """Calls a host's user API; results come back as plain dicts and lists."""

    def __init__(self, address: str, timeout: float = 180.0, user: str | None = None,
                 password: str | None = None):
        """``user``/``password``: HTTP Basic credentials sent with every call (the WSDL is public)."""
        base = address if address.startswith("http") else f"http://{address}"
        self.url = base.rstrip("/") + "/soap"
        self.user = user
        session = requests.Session()
        if user is not None:
            session.auth = requests.auth.HTTPBasicAuth(user, password or "")
        transport = Transport(session=session, timeout=10, operation_timeout=timeout)
        settings = zeep.Settings(strict=True, xml_huge_tree=False, forbid_dtd=True,
                                 forbid_entities=True, forbid_external=True)
        self._client = zeep.Client(self.url + "?wsdl", transport=transport, settings=settings)
        # The WSDL names the address the client used; bind explicitly anyway.
        self._service = self._client.service

    def call(self, operation: str, *args):
        try:
            result = getattr(self._service, operation)(*args)
        except zeep.exceptions.Fault as f:
            raise ApiFault(local_faultcode(f.code or "Server"), f.message or "") from None
        except zeep.exceptions.TransportError as e:
            if e.status_code == 401:     # a 401 without a SOAP body (e.g. from a proxy)
                raise ApiFault("Client.NotAuthorized", "user name or password refused") from None
            raise
        return _plain(serialize_object(result))


def _plain(value):
    """zeep returns arrays as ``{'TypeName': [...]}`` wrappers and OrderedDicts; flatten both."""
    if isinstance(value, dict):
        if len(value) == 1:
            (k, v), = value.items()
            if isinstance(v, list):
                return [_plain(x) for x in v]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(x) for x in value]
    return value
