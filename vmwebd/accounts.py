"""Accounts' data and its checks, with no server code (the CLI imports this module too).

* **User names** (:data:`OWNER_RE`, :func:`check_user_name`), roles and quotas' bounds.
* **Passwords** are kept only as scrypt hashes with a per-user random salt
  (``scrypt$N$r$p$SALT$HASH``, base64): :func:`hash_password`, :func:`verify_password`,
  :func:`check_new_password`, :func:`generate_password`.
* **The first admin**: :func:`write_bootstrap_admin` writes ``<state dir>/bootstrap-admin``
  (``name:hash``), which the daemon applies at start (:func:`vmwebd.auth.apply_bootstrap_admin`).
* **SSH public keys** (:func:`parse_ssh_key`): a user keeps up to :data:`MAX_SSH_KEYS` OpenSSH
  public keys in their account; every VM of their clusters is given them (the guest's seed, see
  :mod:`vmwebd.net.seed`). A key is checked strictly (a known type, a blob that decodes and whose
  fields match that type, a one-line comment) before it is kept.
* **Who is calling** (:class:`Principal`): an authenticated user, as one request sees it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from vmwebd.atomicfile import write_atomic
from vmwebd.errors import InvalidArgument

#: A user name (a cluster's owner): a-z or _, then up to 31 of a-z 0-9 _ . -
OWNER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")

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
MAX_SSH_KEYS = 32  # per user (a guest's seed carries them all)
MAX_SSH_KEY_CHARS = 4096  # one key line: an RSA key of 16384 bits fits
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
        n = int.from_bytes(blob[pos : pos + 4], "big")
        if pos + 4 + n > len(blob):
            return None
        out = blob[pos + 4 : pos + 4 + n]
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
        raise InvalidArgument(
            field, f"an SSH public key line has at most {MAX_SSH_KEY_CHARS} characters, not {len(text)}"
        )
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise InvalidArgument(field, "holds a line break or a control character (give one key per line)")
    parts = text.split(None, 2)
    kind = parts[0]
    if kind not in SSH_KEY_TYPES:
        raise InvalidArgument(
            field,
            f"{kind[:40]!r} is not an SSH key type accepted here (one of "
            f"{', '.join(SSH_KEY_TYPES)}); options before the key are "
            "not accepted either",
        )
    if len(parts) < 2:
        raise InvalidArgument(field, f"{kind} key has no base64 blob")
    blob_text = parts[1]
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(field, f"{kind} key: its blob is not base64") from None
    if len(blob) < 4 or blob[4 : 4 + int.from_bytes(blob[:4], "big")] != kind.encode("ascii"):
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
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=_HASH_BYTES
    )
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time compare); False for a malformed hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        n, r, p = int(n), int(r), int(p)
        if n > (1 << 20) or r > 32 or p > 16:  # a hash from the DOM must not make us burn memory
            return False
        salt_b, digest_b = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=salt_b, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=len(digest_b)
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, digest_b)


_DUMMY: list[str] = []


def check_new_password(password, field: str = "password") -> str:
    if not isinstance(password, str) or len(password) < PASSWORD_MIN:
        raise InvalidArgument(field, f"a password needs at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise InvalidArgument(field, f"a password has at most {PASSWORD_MAX} characters")
    return password


def check_user_name(name, field: str = "name") -> str:
    if not isinstance(name, str) or not OWNER_RE.match(name):
        raise InvalidArgument(
            field, f"{name!r} is not a valid user name (a-z or _, then up to 31 of a-z 0-9 _ . -)"
        )
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
