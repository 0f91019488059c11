"""Logins: who is calling the SOAP API and the web pages (the application's checks of what they
may do are :mod:`vmwebd.app`; accounts' data and its checks :mod:`vmwebd.accounts`).

* **Authentication** (:class:`Authenticator`): scrypt is slow on purpose (~0.1 s), so it runs on
  the reactor's thread pool, and a successful check is remembered (keyed by an HMAC of the
  name, the password and the stored hash under a per-process random key) so that HTTP Basic on
  every SOAP call costs one dict lookup. A changed password changes the stored hash, which
  invalidates the entry. Repeated failures from one client address are refused for a while.
* **The first admin** comes from a file ``<state dir>/bootstrap-admin`` (``name:hash``, written by
  ``vmweb user bootstrap`` / ``vmweb init --admin`` / the demo): at start the daemon makes that
  user an admin with that password (creating it, or resetting its password), then deletes the
  file. Whoever can write the state directory is root on the host anyway.
* :class:`BasicAuthGuard` puts HTTP Basic in front of the SOAP resource: an anonymous call or a
  wrong password gets the fault ``Client.NotAuthorized`` with HTTP 401; :func:`principal_of`
  gives a request's caller (a :class:`~vmwebd.accounts.Principal`).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import hmac
import secrets
from pathlib import Path

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from vmwebd.accounts import (
    BOOTSTRAP_FILE,
    DEFAULT_QUOTA,
    OWNER_RE,
    Principal,
    hash_password,
    verify_password,
)
from vmwebd.dom.records import UserRec
from vmwebd.errors import ConfigError, NotAuthorized

log = Logger()

_DUMMY: list[str] = []


def _dummy_hash() -> str:
    """A hash nobody's password matches: checked for unknown users so that a wrong name costs as
    much time as a wrong password (no user enumeration by timing). Made on first use."""
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY[0]


# -- logins ------------------------------------------------------------------------------------
class FailureLimiter:
    """Counts failed logins per client address in a sliding window; over ``limit`` it refuses
    further attempts from that address until the window has passed (bounded memory)."""

    def __init__(self, clock, limit: int = 20, window: float = 60.0, max_clients: int = 4096):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._fails: dict[str, collections.deque] = {}

    def _recent(self, client: str) -> collections.deque:
        q = self._fails.get(client)
        if q is None:
            return collections.deque()
        cutoff = self.clock.seconds() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._fails[client]
        return q

    def blocked_for(self, client: str) -> float:
        """Seconds until ``client`` may try again (0 if it may now)."""
        q = self._recent(client)
        if len(q) < self.limit:
            return 0.0
        return max(0.0, q[0] + self.window - self.clock.seconds())

    def failed(self, client: str) -> None:
        if client not in self._fails and len(self._fails) >= self.max_clients:
            self._fails.pop(next(iter(self._fails)))
        self._fails.setdefault(client, collections.deque()).append(self.clock.seconds())
        q = self._fails[client]
        while len(q) > self.limit:
            q.popleft()


class Authenticator:
    """Checks user names and passwords against the DOM's users (see the module docstring)."""

    CACHE_SIZE = 4096

    def __init__(self, dom, reactor, limiter: FailureLimiter | None = None, verify=verify_password):
        self.dom = dom
        self.reactor = reactor
        self.limiter = limiter or FailureLimiter(reactor)
        self._verify = verify
        self._key = secrets.token_bytes(32)
        self._ok: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def _cache_key(self, name: str, password: str, stored: str) -> bytes:
        msg = b"\0".join(s.encode("utf-8", "surrogatepass") for s in (name, password, stored))
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    @defer.inlineCallbacks
    def authenticate(self, name: str, password: str, client: str = "?"):
        """Fires with a :class:`Principal`, or fails with NotAuthorized (which never says whether
        the name or the password was wrong)."""
        wait = self.limiter.blocked_for(client)
        if wait:
            raise NotAuthorized(f"too many failed logins from {client}; try again in {wait:.0f} s")
        rec = self.dom.get(UserRec, name) if isinstance(name, str) and name else None
        stored = rec.password_hash if rec is not None and rec.password_hash else None
        if stored is not None:
            key = self._cache_key(name, password, stored)
            if key in self._ok:
                self._ok.move_to_end(key)
                return Principal(rec.id, rec.role)
        ok = yield threads.deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            lambda: self._verify(password, stored or _dummy_hash()),
        )
        # The user may have changed (or gone) while scrypt ran: judge against the record now.
        rec = self.dom.get(UserRec, name) if rec is not None else None
        if not ok or stored is None or rec is None or rec.password_hash != stored:
            self.limiter.failed(client)
            # repr: the name is the caller's text, and must not be able to forge log lines
            log.info("login refused for user {name} from {client}", name=repr(str(name)[:64]), client=client)
            raise NotAuthorized("wrong user name or password")
        self._ok[key] = None
        if len(self._ok) > self.CACHE_SIZE:
            self._ok.popitem(last=False)
        return Principal(rec.id, rec.role)


# -- the first admin ---------------------------------------------------------------------------
def read_bootstrap_admin(path: Path) -> tuple[str, str]:
    """``(name, hash)`` from a bootstrap file; ConfigError naming the file if it is malformed."""
    text = path.read_text(encoding="utf-8").strip()
    name, _, stored = text.partition(":")
    if not OWNER_RE.match(name) or not stored.startswith("scrypt$") or "\n" in text:
        raise ConfigError(
            str(path),
            1,
            "bootstrap-admin",
            "expected one line 'name:scrypt$...' (write it with `vmweb user bootstrap`)",
        )
    return name, stored


def apply_bootstrap_admin(domsvc, state_dir: Path) -> defer.Deferred:
    """Makes the user in ``<state_dir>/bootstrap-admin`` an admin with that password (the replica
    changes at once), and deletes the file once the change is durable. Nothing if there is no file."""
    path = Path(state_dir) / BOOTSTRAP_FILE
    if not path.exists():
        return defer.succeed(None)
    name, stored = read_bootstrap_admin(path)
    cur = domsvc.dom.get(UserRec, name)
    quota = max(cur.quota_vms if cur else 0, DEFAULT_QUOTA * 4)
    # An existing account keeps everything else it has (its SSH keys).
    rec = (
        dataclasses.replace(cur, role="admin", password_hash=stored, quota_vms=quota)
        if cur
        else UserRec(id=name, role="admin", password_hash=stored, quota_vms=quota)
    )
    d = domsvc.put(rec)
    log.info(
        "user {name} is an admin, with the password from {path} (file now deleted)", name=name, path=str(path)
    )
    return d.addCallback(lambda _: path.unlink(missing_ok=True))


# -- HTTP Basic in front of SOAP ----------------------------------------------------------------
def parse_basic(header: bytes | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    return (user, password) if sep else None


def client_address(request) -> str:
    return getattr(request.getClientAddress(), "host", "?")


class BasicAuthGuard(Resource):
    """Lets a SOAP POST through to ``inner`` only with valid HTTP Basic credentials; the WSDL
    (GET) stays public. The caller's :class:`Principal` is left on ``request.vmweb_principal``."""

    isLeaf = True

    def __init__(self, inner: Resource, authenticator: Authenticator):
        super().__init__()
        self.inner = inner
        self.authn = authenticator

    def render(self, request):
        if request.method != b"POST":
            return self.inner.render(request)
        creds = parse_basic(request.getHeader(b"authorization"))
        if creds is None:
            return _unauthorized(
                request, NotAuthorized("this call needs a user name and password (HTTP Basic)")
            )
        d = self.authn.authenticate(creds[0], creds[1], client_address(request))
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def go(principal):
            if finished:  # the client went away while scrypt ran
                return
            request.vmweb_principal = principal
            out = self.inner.render(request)
            if out is not NOT_DONE_YET:
                request.write(out)
                request.finish()

        def refuse(f):
            if finished:
                return
            exc = f.value if f.check(NotAuthorized) else NotAuthorized("authentication failed")
            if not f.check(NotAuthorized):
                log.failure("authentication crashed", failure=f)
            request.write(_unauthorized(request, exc))
            request.finish()

        d.addCallbacks(go, refuse)
        return NOT_DONE_YET


def _unauthorized(request, exc: NotAuthorized) -> bytes:
    from vmwebd.api.soap import _fault_body  # the same fault envelope as every other refusal

    request.setResponseCode(401)
    request.setHeader(b"WWW-Authenticate", b'Basic realm="vmweb", charset="UTF-8"')
    request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
    return _fault_body(exc.faultcode, exc.message)


def principal_of(request) -> Principal:
    """The authenticated caller of a request (NotAuthorized if nobody authenticated it)."""
    p = getattr(request, "vmweb_principal", None)
    if not isinstance(p, Principal):
        raise NotAuthorized("this call needs a user name and password")
    return p
