"""Users, passwords and permissions, shared by the SOAP API and the web pages.

* **Passwords** are kept only as scrypt hashes with a per-user random salt
  (``scrypt$N$r$p$SALT$HASH``, base64), in the user's DOM entity; they are never logged, and every
  view of the DOM given to a caller has the hashes taken out (:meth:`Access.dom_xml`).
* **Authentication** (:class:`Authenticator`): scrypt is slow on purpose (~0.1 s), so it runs on
  the reactor's thread pool, and a successful check is remembered (keyed by an HMAC of the
  name, the password and the stored hash under a per-process random key) so that HTTP Basic on
  every SOAP call costs one dict lookup. A changed password changes the stored hash, which
  invalidates the entry. Repeated failures from one client address are refused for a while.
* **The first admin** comes from a file ``<state dir>/bootstrap-admin`` (``name:hash``, written by
  ``vmweb user bootstrap`` / ``vmweb init --admin`` / the demo): at start the daemon makes that
  user an admin with that password (creating it, or resetting its password), then deletes the
  file. Whoever can write the state directory is root on the host anyway.
* **Permissions** (:class:`Access`): an admin sees and acts on everything; a user sees and acts
  only on the clusters they own, and on their own account. Every cluster belongs to a user
  account; quotas (VMs per owner) are checked at create and scale.
* :class:`BasicAuthGuard` puts HTTP Basic in front of the SOAP resource: an anonymous call or a
  wrong password gets the fault ``Client.NotAuthorized`` with HTTP 401.
* **SSH public keys** (:func:`parse_ssh_key`): a user keeps up to :data:`MAX_SSH_KEYS` OpenSSH
  public keys in their account; every VM of their clusters is given them (the guest's seed, see
  :mod:`vmwebd.net.seed`). A key is checked strictly (a known type, a blob that decodes and whose
  fields match that type, a one-line comment) before it is kept. A user manages their own keys,
  an admin anyone's.
* **Audit** (:mod:`vmwebd.audit`): every writing method of :class:`Access` is recorded when it
  ends (user, operation, object, ``ok`` or the faultcode) by a wrapper put on the class once,
  from the table ``vmwebd.audit.AUDITED``; a user reads only their own records.
"""
from __future__ import annotations

import base64
import binascii
import collections
import copy
import dataclasses
import hashlib
import hmac
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from lxml import etree
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from vmwebd.atomicfile import write_atomic
from vmwebd.audit import AuditLog, check_query, instrument
from vmwebd.cluster import OWNER_RE
from vmwebd.dom.records import NS, UserRec, VClusterRec, VmRec
from vmwebd.errors import (
    ClientError,
    ConfigError,
    InvalidArgument,
    NameTaken,
    NoSuchCluster,
    NotAuthorized,
    QuotaExceeded,
)

log = Logger()

ROLES = ("admin", "user")
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
DEFAULT_QUOTA = 16
MAX_QUOTA = 100000
BOOTSTRAP_FILE = "bootstrap-admin"

# scrypt cost: N=2^15, r=8, p=1 needs 32 MiB and ~0.1 s here (OWASP's floor is N=2^17 with
# p=1 at 128 MiB; we stay lower because every host of a small grid checks logins concurrently).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_SCRYPT_MAXMEM = 1 << 27
_HASH_BYTES = 32


# -- errors ------------------------------------------------------------------------------------
class NoSuchUser(ClientError):
    faultcode = "Client.NoSuchUser"

    def __init__(self, name: str):
        super().__init__(f"no user named {name!r}")


class NoSuchSshKey(ClientError):
    faultcode = "Client.NoSuchSshKey"

    def __init__(self, user: str, key: str):
        super().__init__(f"user {user!r} has no SSH key {key[:80]!r}")


class SshKeyExists(ClientError):
    faultcode = "Client.SshKeyExists"

    def __init__(self, user: str, fingerprint: str):
        super().__init__(f"user {user!r} already has the SSH key {fingerprint}")


# -- SSH public keys ---------------------------------------------------------------------------
#: Key types accepted, with what their blob holds after the type string: ``str`` an SSH string,
#: ``mpint`` a multiple-precision integer, ``curve`` the curve name the type names.
SSH_KEY_TYPES: dict[str, tuple[str, ...]] = {
    "ssh-ed25519": ("ed25519",),
    "ssh-rsa": ("mpint", "mpint"),
    "ecdsa-sha2-nistp256": ("curve", "point"),
    "ecdsa-sha2-nistp384": ("curve", "point"),
    "ecdsa-sha2-nistp521": ("curve", "point"),
    "sk-ssh-ed25519@openssh.com": ("ed25519", "str"),
    "sk-ecdsa-sha2-nistp256@openssh.com": ("curve", "point", "str"),
}
#: Bytes of an uncompressed EC point (0x04, X, Y) per curve.
_EC_POINT_BYTES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}
MAX_SSH_KEYS = 32                # per user (a guest's seed carries them all)
MAX_SSH_KEY_CHARS = 4096         # one key line: an RSA key of 16384 bits fits
MAX_SSH_COMMENT = 256
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class SshKey:
    """One OpenSSH public key, checked: ``kind`` its type, ``blob`` its base64 text."""

    kind: str
    blob: str
    comment: str = ""

    @property
    def line(self) -> str:
        return f"{self.kind} {self.blob} {self.comment}" if self.comment else f"{self.kind} {self.blob}"

    @property
    def fingerprint(self) -> str:
        """As ``ssh-keygen -l`` prints it: ``SHA256:`` and the unpadded base64 of its hash."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _curve_of(key_type: str) -> str:
    """``nistp256`` for ``ecdsa-sha2-nistp256`` and ``sk-ecdsa-sha2-nistp256@openssh.com``."""
    return key_type.split("@")[0].rpartition("-")[2]


def _ssh_fields(blob: bytes, kinds: tuple[str, ...], key_type: str) -> str | None:
    """Why ``blob`` (after its type string) does not hold ``kinds``, or None if it does."""
    pos = 0

    def take() -> bytes | None:
        nonlocal pos
        if pos + 4 > len(blob):
            return None
        n = int.from_bytes(blob[pos:pos + 4], "big")
        if pos + 4 + n > len(blob):
            return None
        out = blob[pos + 4:pos + 4 + n]
        pos += 4 + n
        return out
    if take() is None:
        return "its blob is too short"
    values = []
    for kind in kinds:
        v = take()
        if v is None:
            return "its blob ends early"
        values.append(v)
        if kind == "ed25519" and len(v) != 32:
            return f"its Ed25519 key has {len(v)} bytes, not 32"
        if kind == "curve" and v.decode("ascii", "replace") != _curve_of(key_type):
            return f"its blob names curve {v[:16].decode('ascii', 'replace')!r}, not the type's"
        if kind == "point":
            curve = values[-2].decode("ascii", "replace")
            if len(v) != _EC_POINT_BYTES.get(curve, -1) or v[:1] != b"\x04":
                return f"its {curve} point is malformed"
        if kind == "mpint" and (not v or v[0] & 0x80):
            return "its RSA numbers are malformed"
    if pos != len(blob):
        return "its blob has bytes after the key"
    if key_type == "ssh-rsa":
        bits = int.from_bytes(values[1], "big").bit_length()
        if bits < MIN_RSA_BITS:
            return f"its RSA modulus has {bits} bits; at least {MIN_RSA_BITS} are needed"
    return None


def parse_ssh_key(text, field: str = "key") -> SshKey:
    """An OpenSSH public key line (``TYPE BASE64 [COMMENT]``) checked strictly; InvalidArgument
    naming ``field`` and saying what is wrong otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(field, "an SSH public key is required")
    text = text.strip()
    if len(text) > MAX_SSH_KEY_CHARS:
        raise InvalidArgument(field, f"an SSH public key line has at most {MAX_SSH_KEY_CHARS} "
                                     f"characters, not {len(text)}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise InvalidArgument(field, "holds a line break or a control character (give one key per "
                                     "line)")
    parts = text.split(None, 2)
    kind = parts[0]
    if kind not in SSH_KEY_TYPES:
        raise InvalidArgument(field, f"{kind[:40]!r} is not an SSH key type accepted here (one of "
                                     f"{', '.join(SSH_KEY_TYPES)}); options before the key are "
                                     "not accepted either")
    if len(parts) < 2:
        raise InvalidArgument(field, f"{kind} key has no base64 blob")
    blob_text = parts[1]
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(field, f"{kind} key: its blob is not base64") from None
    if len(blob) < 4 or blob[4:4 + int.from_bytes(blob[:4], "big")] != kind.encode("ascii"):
        raise InvalidArgument(field, f"{kind} key: its blob holds another key type")
    why = _ssh_fields(blob, SSH_KEY_TYPES[kind], kind)
    if why:
        raise InvalidArgument(field, f"{kind} key: {why}")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if len(comment) > MAX_SSH_COMMENT:
        raise InvalidArgument(field, f"a key's comment has at most {MAX_SSH_COMMENT} characters")
    return SshKey(kind, base64.b64encode(blob).decode("ascii"), comment)


def parse_ssh_key_file(text: str, field: str = "key") -> list[SshKey]:
    """The keys of an OpenSSH public key file (one per line; blank and ``#`` lines skipped);
    InvalidArgument naming ``field`` and the line number for a bad one."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(parse_ssh_key(line, f"{field} {n}"))
    if not out:
        raise InvalidArgument(field, "holds no SSH public key")
    return out


# -- password hashes ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """An scrypt hash of ``password`` with a fresh 16-byte salt, parameters included."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                            maxmem=_SCRYPT_MAXMEM, dklen=_HASH_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare); False for a malformed hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        n, r, p = int(n), int(r), int(p)
        if n > (1 << 20) or r > 32 or p > 16:   # a hash from the DOM must not make us burn memory
            return False
        salt_b, digest_b = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode("utf-8"), salt=salt_b, n=n, r=r, p=p,
                             maxmem=_SCRYPT_MAXMEM, dklen=len(digest_b))
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, digest_b)


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    """A hash nobody's password matches: checked for unknown users so that a wrong name costs as
    much time as a wrong password (no user enumeration by timing). Made on first use."""
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY[0]


def check_new_password(password, field: str = "password") -> str:
    if not isinstance(password, str) or len(password) < PASSWORD_MIN:
        raise InvalidArgument(field, f"a password needs at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise InvalidArgument(field, f"a password has at most {PASSWORD_MAX} characters")
    return password


def check_user_name(name, field: str = "name") -> str:
    if not isinstance(name, str) or not OWNER_RE.match(name):
        raise InvalidArgument(field, f"{name!r} is not a valid user name "
                                     "(a-z or _, then up to 31 of a-z 0-9 _ . -)")
    return name


def generate_password() -> str:
    """A fresh random password (~128 bits), easy to copy: url-safe characters, never a leading
    ``-`` (``vmweb --password -x…`` would read it as an option)."""
    return secrets.choice(string.ascii_letters) + secrets.token_urlsafe(16)


# -- who is calling ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """An authenticated user, as seen by one request."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


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
        ok = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                             lambda: self._verify(password, stored or _dummy_hash()))
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
def write_bootstrap_admin(state_dir: str | Path, name: str, password: str) -> Path:
    """Writes ``<state_dir>/bootstrap-admin`` (mode 0600) so the daemon makes ``name`` an admin
    with ``password`` at its next start. Only the hash is written."""
    check_user_name(name)
    check_new_password(password)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / BOOTSTRAP_FILE
    write_atomic(path, f"{name}:{hash_password(password)}\n", mode=0o600)
    return path


def read_bootstrap_admin(path: Path) -> tuple[str, str]:
    """``(name, hash)`` from a bootstrap file; ConfigError naming the file if it is malformed."""
    text = path.read_text(encoding="utf-8").strip()
    name, _, stored = text.partition(":")
    if not OWNER_RE.match(name) or not stored.startswith("scrypt$") or "\n" in text:
        raise ConfigError(str(path), 1, "bootstrap-admin",
                          "expected one line 'name:scrypt$...' (write it with `vmweb user bootstrap`)")
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
    rec = (dataclasses.replace(cur, role="admin", password_hash=stored, quota_vms=quota) if cur
           else UserRec(id=name, role="admin", password_hash=stored, quota_vms=quota))
    d = domsvc.put(rec)
    log.info("user {name} is an admin, with the password from {path} (file now deleted)",
             name=name, path=str(path))
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
            return _unauthorized(request, NotAuthorized(
                "this call needs a user name and password (HTTP Basic)"))
        d = self.authn.authenticate(creds[0], creds[1], client_address(request))
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def go(principal):
            if finished:            # the client went away while scrypt ran
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


# -- permissions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserView:
    name: str
    role: str
    quota_vms: int
    used_vms: int
    used_vcpus: int
    used_memory_mib: int
    clusters: int


class Access:
    """Every user-facing operation, with its permission and quota checks (SOAP and web call this).

    Reads answer from the local replica; writes go through the :class:`~vmwebd.cluster.ClusterManager`
    or straight into the DOM (users, settings), and each is recorded in the audit trail
    (:func:`vmwebd.audit.instrument`, applied below the class)."""

    def __init__(self, node):
        self.node = node
        self.mgr = node.manager
        self.domsvc = node.domsvc
        self.dom = node.domsvc.dom
        # VMs promised to creates/scales still on their way (leases), per owner: two requests
        # at this host can never both slip under a quota.
        self._inflight: collections.Counter = collections.Counter()
        self.audit = AuditLog(node.host_id, node.domsvc, node.now_ms, clock=node.reactor)
        self.audit.start()

    # -- checks ----------------------------------------------------------------------------
    @staticmethod
    def require_admin(p: Principal, what: str) -> None:
        if not p.is_admin:
            raise NotAuthorized(f"{what} is for admins; user {p.name!r} is not one")

    def _owned(self, p: Principal, name) -> VClusterRec:
        c = self.dom.get(VClusterRec, name) if isinstance(name, str) else None
        if c is None:
            raise NoSuchCluster(str(name))
        if not p.is_admin and c.owner != p.name:
            raise NotAuthorized(f"user {p.name!r} may not see or change cluster {name!r}: "
                                "it belongs to another user")
        return c

    def used(self, owner: str, skip_cluster: str | None = None) -> int:
        """VMs ``owner``'s clusters hold (or are about to), one cluster left out if asked."""
        own = [c.id for c in self.dom.select(VClusterRec, "owner", owner) if c.id != skip_cluster]
        return sum(1 for c in own for vm in self.dom.select(VmRec, "cluster", c) if vm.desired != "absent")

    def _check_quota(self, owner: str, wanted: int, skip_cluster: str | None, have: int = 0) -> None:
        rec = self.dom.get(UserRec, owner)
        if rec is None:
            raise NoSuchUser(owner)
        used = self.used(owner, skip_cluster) + self._inflight[owner]
        if used + wanted > rec.quota_vms:
            what = (f"asked for {wanted} VMs" if skip_cluster is None
                    else f"asked to scale cluster {skip_cluster!r} from {have} to {wanted} VMs")
            raise QuotaExceeded(f"user {owner!r} has a quota of {rec.quota_vms} VMs, uses "
                                f"{used} in other clusters, and {what}")

    @defer.inlineCallbacks
    def _holding(self, owner: str, n: int, d_fn):
        self._inflight[owner] += n
        try:
            return (yield d_fn())
        finally:
            self._inflight[owner] -= n
            if self._inflight[owner] <= 0:
                del self._inflight[owner]

    # -- clusters --------------------------------------------------------------------------
    def cluster(self, p: Principal, name):
        self._owned(p, name)
        return self.mgr.cluster(name)

    def clusters(self, p: Principal, owner: str | None = None):
        if not p.is_admin:
            if owner and owner != p.name:
                raise NotAuthorized(f"user {p.name!r} may only list their own clusters")
            owner = p.name
        return self.mgr.clusters(owner or None)

    def create_cluster(self, p: Principal, name, template, owner, count) -> defer.Deferred:
        if not p.is_admin and owner != p.name:
            raise NotAuthorized(f"user {p.name!r} may only create clusters of their own "
                                f"(owner {owner!r} asked)")
        from vmwebd.cluster import _check_name
        from vmwebd.templates import expand
        _check_name(name)
        check_user_name(owner, "owner")
        if self.dom.get(UserRec, owner) is None:
            raise NoSuchUser(owner)
        planned = expand(self.mgr.template(template), count, self.mgr.limits.max_vms_per_cluster)
        self._check_quota(owner, len(planned), None)
        return self._holding(owner, len(planned), lambda: self.mgr.create(name, template, owner, count))

    def scale_cluster(self, p: Principal, name, count, force: bool = False) -> defer.Deferred:
        c = self._owned(p, name)
        from vmwebd.templates import plan_scale
        existing = [vm.name for vm in self.dom.select(VmRec, "cluster", c.id) if vm.desired != "absent"]
        to_add, to_remove = plan_scale(self.mgr.template(c.template), existing, count,
                                       self.mgr.limits.max_vms_per_cluster)
        after = len(existing) + len(to_add) - len(to_remove)
        if to_add:
            self._check_quota(c.owner, after, c.id, have=len(existing))
        return self._holding(c.owner, len(to_add), lambda: self.mgr.scale(name, count, force))

    def destroy_cluster(self, p: Principal, name, force: bool = False) -> defer.Deferred:
        self._owned(p, name)
        return self.mgr.destroy(name, force)

    def set_vm_power(self, p: Principal, cluster, vm, desired: str,
                     force: bool = False) -> defer.Deferred:
        self._owned(p, cluster)
        return self.mgr.set_vm_power(cluster, vm, desired, force)

    # -- migrations ------------------------------------------------------------------------
    def migrate_vm(self, p: Principal, cluster, vm, dest=None) -> defer.Deferred:
        """Owners move their own VMs (an admin any); ``dest`` None lets vmweb choose."""
        self._owned(p, cluster)
        return self.node.migrations.request(cluster, vm, dest or None, requested_by=p.name)

    def evacuate_host(self, p: Principal, host) -> defer.Deferred:
        """Re-places a dead host's VMs on live hosts (admins only: it is a judgement that the
        host is really gone)."""
        self.require_admin(p, "evacuating hosts")
        return self.node.migrations.evacuate(host, requested_by=p.name)

    def add_member(self, p: Principal, host) -> defer.Deferred:
        """Makes ``host`` a consensus member (one host at a time, decided by the members)."""
        self.require_admin(p, "adding hosts")
        from vmwebd.gossip.pki import check_host_id
        try:
            check_host_id(host)
        except Exception:
            raise InvalidArgument("host", f"{host!r} is not a host id") from None
        return self.node.leases.change_members(add=host).addCallback(list)

    def remove_member(self, p: Principal, host) -> defer.Deferred:
        """Removes ``host`` from the consensus members (one host at a time)."""
        self.require_admin(p, "removing hosts")
        return self.node.leases.change_members(remove=host).addCallback(list)

    def drain_host(self, p: Principal, host) -> defer.Deferred:
        self.require_admin(p, "draining hosts")
        return self.node.migrations.drain(host, requested_by=p.name)

    def undrain_host(self, p: Principal, host) -> defer.Deferred:
        self.require_admin(p, "draining hosts")
        return self.node.migrations.undrain(host)

    def migration(self, p: Principal, mid):
        m = self.node.migrations.get(mid)
        self._owned(p, m.vm.partition("/")[0]) if not p.is_admin else None
        return m

    def migrations(self, p: Principal) -> list:
        from vmwebd.dom.records import MigrationRec
        out = []
        for m in self.dom.all(MigrationRec):
            c = self.dom.get(VClusterRec, m.vm.partition("/")[0])
            if p.is_admin or (c is not None and c.owner == p.name):
                out.append(m)
        return sorted(out, key=lambda m: (m.started_at, m.id))

    def add_image(self, p: Principal, name, path, fmt, kernel, initrd, cmdline) -> defer.Deferred:
        self.require_admin(p, "adding base images")
        return self.node.images.add(name, path, fmt or "qcow2", kernel or "", initrd or "",
                                    cmdline or "")

    # -- grid --------------------------------------------------------------------------------
    def set_setting(self, p: Principal, key, value) -> defer.Deferred:
        self.require_admin(p, "changing system settings")
        from vmwebd.settings import checked_setting
        rec = checked_setting(key, value if value is not None else "")
        return self.domsvc.put(rec).addCallback(lambda _: rec)

    def dom_xml(self, p: Principal, pretty: bool = True) -> bytes:
        """The DOM as this principal may see it: never a password hash; a non-admin sees the
        grid (hosts, images, templates, settings), their own account, clusters, VMs and
        migrations, and no leases nor audit records (they name other users' clusters)."""
        root = copy.deepcopy(self.dom.root)
        q = "{%s}" % NS
        for user in root.iter(q + "user"):
            user.attrib.pop("password-hash", None)
        if not p.is_admin:
            mine = {c.id for c in self.dom.select(VClusterRec, "owner", p.name)}

            def keep(el) -> bool:
                kind, id_ = etree.QName(el).localname, el.get("id")
                if kind == "user":
                    return id_ == p.name
                if kind == "vcluster":
                    return id_ in mine
                if kind == "vm":
                    return id_.partition("/")[0] in mine
                if kind == "migration":
                    return str(el.get("vm", "")).partition("/")[0] in mine
                # Audit records name what their user typed, other users' clusters included (a
                # refused attempt): ListAudit gives a user their own; the DOM view none.
                return kind not in ("lease", "audit")
            for container in root:
                for el in list(container):
                    if not keep(el):
                        container.remove(el)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=pretty)

    def list_audit(self, p: Principal, user=None, since=None, limit=None) -> list:
        """Audit records newest first: anyone's for an admin (``user`` to choose one), a user's
        own only; ``since`` an ISO 8601 time or a span back from now (``2d``), ``limit`` at most
        :data:`vmwebd.audit.LIST_MAX` (default :data:`vmwebd.audit.LIST_DEFAULT`)."""
        user = user or None
        if not p.is_admin:
            if user is not None and user != p.name:
                raise NotAuthorized(f"user {p.name!r} may only read their own audit records, "
                                    f"not those of {user!r}")
            user = p.name
        since_ms, limit = check_query(since, limit, self.node.now_ms())
        return self.audit.query(user, since_ms, limit)

    # -- users -----------------------------------------------------------------------------
    def _user_view(self, rec: UserRec) -> UserView:
        own = self.dom.select(VClusterRec, "owner", rec.id)
        vms = [vm for c in own for vm in self.dom.select(VmRec, "cluster", c.id) if vm.desired != "absent"]
        return UserView(rec.id, rec.role, rec.quota_vms, len(vms), sum(v.vcpus for v in vms),
                        sum(v.memory_mib for v in vms), len(own))

    def users(self, p: Principal) -> list[UserView]:
        recs = sorted(self.dom.all(UserRec), key=lambda u: u.id)
        return [self._user_view(r) for r in recs if p.is_admin or r.id == p.name]

    def user(self, p: Principal, name) -> UserView:
        if not p.is_admin and name != p.name:
            raise NotAuthorized(f"user {p.name!r} may only see their own account")
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        return self._user_view(rec)

    @staticmethod
    def _check_role(role) -> str:
        role = role or "user"
        if role not in ROLES:
            raise InvalidArgument("role", f"{role!r} is not a role (admin or user)")
        return role

    @staticmethod
    def _check_quota_value(quota) -> int:
        quota = DEFAULT_QUOTA if quota is None else quota
        if isinstance(quota, bool) or not isinstance(quota, int) or not 0 <= quota <= MAX_QUOTA:
            raise InvalidArgument("quota", f"{quota!r} is not a number of VMs from 0 to {MAX_QUOTA}")
        return quota

    @defer.inlineCallbacks
    def create_user(self, p: Principal, name, password, role=None, quota=None):
        self.require_admin(p, "creating users")
        check_user_name(name)
        check_new_password(password)
        role, quota = self._check_role(role), self._check_quota_value(quota)
        if self.dom.get(UserRec, name) is not None:
            raise NameTaken("user", name)
        stored = yield self._hash(password)
        if self.dom.get(UserRec, name) is not None:    # created meanwhile, while scrypt ran
            raise NameTaken("user", name)
        rec = UserRec(id=name, role=role, password_hash=stored, quota_vms=quota)
        yield self.domsvc.put(rec)
        log.info("user {name} ({role}, quota {quota} VMs) created by {by}", name=name, role=role,
                 quota=quota, by=p.name)
        return self._user_view(rec)

    def _hash(self, password: str) -> defer.Deferred:
        reactor = self.node.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), hash_password, password)

    @defer.inlineCallbacks
    def delete_user(self, p: Principal, name):
        self.require_admin(p, "deleting users")
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        if name == p.name:
            raise InvalidArgument("name", f"user {name!r} cannot delete their own account")
        owned = sorted(c.id for c in self.dom.select(VClusterRec, "owner", name))
        if owned:
            raise InvalidArgument("name", f"user {name!r} still owns cluster(s) {', '.join(owned)}: "
                                          "destroy them first")
        yield self.domsvc.delete(("user", name))
        log.info("user {name} deleted by {by}", name=name, by=p.name)
        return True

    @defer.inlineCallbacks
    def set_password(self, p: Principal, name, password):
        if not p.is_admin and name != p.name:
            raise NotAuthorized(f"user {p.name!r} may only change their own password")
        check_new_password(password)
        if (self.dom.get(UserRec, name) if isinstance(name, str) else None) is None:
            raise NoSuchUser(str(name))
        stored = yield self._hash(password)
        rec = self.dom.get(UserRec, name)
        if rec is None:
            raise NoSuchUser(name)
        yield self.domsvc.put(dataclasses.replace(rec, password_hash=stored))
        log.info("password of user {name} changed by {by}", name=name, by=p.name)
        return True

    @defer.inlineCallbacks
    def set_quota(self, p: Principal, name, quota):
        self.require_admin(p, "changing quotas")
        quota = self._check_quota_value(quota)
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        rec = dataclasses.replace(rec, quota_vms=quota)
        yield self.domsvc.put(rec)
        return self._user_view(rec)

    # -- SSH keys --------------------------------------------------------------------------
    def _key_owner(self, p: Principal, name) -> UserRec:
        """The account whose keys ``p`` asks about (their own when ``name`` is empty)."""
        name = name or p.name
        if not p.is_admin and name != p.name:
            raise NotAuthorized(f"user {p.name!r} may only see or change their own SSH keys, "
                                f"not those of {name!r}")
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        return rec

    def ssh_keys(self, p: Principal, name=None) -> list[SshKey]:
        """A user's SSH public keys, in the order added."""
        return [parse_ssh_key(k) for k in self._key_owner(p, name).ssh_key_list()]

    def add_ssh_key(self, p: Principal, name, key) -> defer.Deferred:
        """Adds one OpenSSH public key to a user's account; fires with the :class:`SshKey`."""
        return self._add_ssh_keys(p, name, [parse_ssh_key(key)]).addCallback(lambda ks: ks[0])

    def add_ssh_key_file(self, p: Principal, name, text) -> defer.Deferred:
        """Adds every key of an OpenSSH public key file's text (one per line), all or none;
        fires with the list of :class:`SshKey` added."""
        if not isinstance(text, str):
            raise InvalidArgument("key", "an SSH public key is required")
        return self._add_ssh_keys(p, name, parse_ssh_key_file(text))

    def _add_ssh_keys(self, p: Principal, name, new: list[SshKey]) -> defer.Deferred:
        rec = self._key_owner(p, name)
        have = [parse_ssh_key(k) for k in rec.ssh_key_list()]
        blobs = {k.blob for k in have}
        for k in new:
            if k.blob in blobs:
                raise SshKeyExists(rec.id, k.fingerprint)
            blobs.add(k.blob)
        if len(have) + len(new) > MAX_SSH_KEYS:
            raise InvalidArgument("key", f"user {rec.id!r} has {len(have)} SSH keys and may have "
                                         f"at most {MAX_SSH_KEYS}; remove some first")
        encoded = UserRec.encode_ssh_keys([k.line for k in have + new])
        if len(encoded) > _SSH_KEYS_ATTR_MAX:
            raise InvalidArgument("key", f"user {rec.id!r}'s SSH keys would take more than "
                                         f"{_SSH_KEYS_ATTR_MAX} bytes; remove one first")
        # Read, change and write in one reactor turn: two requests at this host cannot lose
        # each other's key (two hosts changing one account at once: the later write wins).
        d = self.domsvc.put(dataclasses.replace(rec, ssh_keys=encoded))
        log.info("SSH key(s) {fps} added to user {name} by {by}",
                 fps=" ".join(k.fingerprint for k in new), name=rec.id, by=p.name)
        return d.addCallback(lambda _: new)

    def remove_ssh_key(self, p: Principal, name, key_or_fingerprint) -> defer.Deferred:
        """Removes the key given by its fingerprint (``SHA256:…``), its line or its base64 blob;
        fires with the :class:`SshKey` removed."""
        rec = self._key_owner(p, name)
        if not isinstance(key_or_fingerprint, str) or not key_or_fingerprint.strip():
            raise InvalidArgument("key_or_fingerprint", "give the key or its fingerprint (SHA256:...)")
        want = key_or_fingerprint.strip()
        parts = want.split()
        blob = parts[1] if len(parts) >= 2 and parts[0] in SSH_KEY_TYPES else parts[0]
        have = [parse_ssh_key(k) for k in rec.ssh_key_list()]
        gone = [k for k in have if want == k.fingerprint or blob == k.blob]
        if not gone:
            raise NoSuchSshKey(rec.id, want)
        keep = [k.line for k in have if k not in gone]
        d = self.domsvc.put(dataclasses.replace(rec, ssh_keys=UserRec.encode_ssh_keys(keep)))
        log.info("SSH key {fp} removed from user {name} by {by}", fp=gone[0].fingerprint,
                 name=rec.id, by=p.name)
        return d.addCallback(lambda _: gone[0])

    # -- a cluster's names -------------------------------------------------------------------
    def cluster_hosts(self, p: Principal, name) -> tuple[str, str]:
        """``(hosts, mpi)``: the cluster's ``/etc/hosts`` lines (``IP FQDN NAME`` per member,
        as its guests have them) and an MPI hostfile (``FQDN slots=VCPUS`` per running
        member). Same permission as seeing the cluster."""
        from vmwebd.net.seed import cluster_hosts_text, mpi_hostfile
        c = self._owned(p, name)
        return cluster_hosts_text(self.dom, c), mpi_hostfile(self.dom, c)


instrument(Access)

#: The longest ``ssh-keys`` attribute schema.rng allows.
_SSH_KEYS_ATTR_MAX = 65536
