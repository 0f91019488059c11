"""Points in time as people type them: an ISO 8601 time or a span back from now (``90s``, ``30m``,
``1h``, ``2d``, ``1w``). No server code: the CLI checks ``--since`` with it before sending.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone, tzinfo

_SPAN = re.compile(r"^(\d{1,9}(?:\.\d{1,6})?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now_s: float, naive: tzinfo = timezone.utc) -> float:
    """Seconds since the epoch for ``text``: ``NUMBER`` + ``s|m|h|d|w`` back from ``now_s``, or
    an ISO 8601 time (``2026-12-01``, ``2026-12-01T10:00``, ``…Z``, ``…+01:00``) read in
    ``naive``'s zone when it gives none. ValueError saying what is accepted otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a time is required")
    t = text.strip()
    m = _SPAN.match(t.lower())
    if m:
        return max(0.0, now_s - float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in "zZ" else t)
    except ValueError:
        raise ValueError(
            f"{t[:40]!r} is neither an ISO 8601 time (2026-12-01T10:00, with an "
            "optional zone) nor a span back from now (90s, 30m, 1h, 2d, 1w)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=naive)
    return max(0.0, when.timestamp())
