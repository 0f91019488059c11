"""Web sessions of one host: random tokens in an HttpOnly, SameSite=Strict cookie, a CSRF token
per session, idle and absolute expiry, and flash messages shown once.

Sessions live in memory on the host that made them (a user logs in on each host they use; the
cookie name carries the host id so hosts on one machine do not overwrite each other's). A session
also remembers a digest of the user's password hash at login: when the password changes or the
account goes (anywhere in the grid: the DOM replicates), the session is over.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

IDLE_SECONDS = 8 * 3600
ABSOLUTE_SECONDS = 24 * 3600
MAX_SESSIONS = 10000
MAX_FLASHES = 8


def hash_digest(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode("utf-8")).hexdigest()


@dataclass
class Session:
    token: str
    user: str
    csrf: str
    hash_digest: str
    created: float
    seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (kind, text): kind ok | error

    def flash(self, kind: str, text: str) -> None:
        self.flashes.append((kind, text))
        del self.flashes[:-MAX_FLASHES]

    def take_flashes(self) -> list[tuple[str, str]]:
        out, self.flashes = self.flashes, []
        return out

    def csrf_ok(self, token) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.csrf.encode())


class SessionStore:
    """The sessions of this host, keyed by token; ``clock`` is an IReactorTime."""

    def __init__(
        self,
        clock,
        idle: float = IDLE_SECONDS,
        absolute: float = ABSOLUTE_SECONDS,
        max_sessions: int = MAX_SESSIONS,
    ):
        self.clock = clock
        self.idle = idle
        self.absolute = absolute
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def create(self, user: str, password_hash: str) -> Session:
        """A fresh session (a fresh token: never one the browser had before login)."""
        now = self.clock.seconds()
        self._expire(now)
        if len(self._sessions) >= self.max_sessions:  # the oldest goes
            oldest = min(self._sessions.values(), key=lambda s: s.seen)
            del self._sessions[oldest.token]
        s = Session(
            secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), hash_digest(password_hash), now, now
        )
        self._sessions[s.token] = s
        return s

    def get(self, token) -> Session | None:
        if not isinstance(token, str):
            return None
        s = self._sessions.get(token)
        if s is None:
            return None
        now = self.clock.seconds()
        if now - s.seen > self.idle or now - s.created > self.absolute:
            del self._sessions[token]
            return None
        s.seen = now
        return s

    def drop(self, token) -> None:
        self._sessions.pop(token, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self, now: float) -> None:
        for token, s in list(self._sessions.items()):
            if now - s.seen > self.idle or now - s.created > self.absolute:
                del self._sessions[token]
