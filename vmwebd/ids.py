"""The one host-id rule: ``[a-z0-9][a-z0-9-]{0,62}`` (a DNS label, lower case).

A host id names a host in the config, the DOM (versions carry their origin's id), certificates'
common names, peer envelopes and lease holders, so every one of those checks it with this
module. The pattern is also written once in ``dom/schema.rng`` (RelaxNG cannot import it);
``tests/test_ids.py`` checks the two agree.
"""

from __future__ import annotations

import re
from typing import Final

#: The pattern, without anchors, for embedding in larger expressions (``rf"@({HOST_ID_PATTERN})$"``).
HOST_ID_PATTERN: Final = r"[a-z0-9][a-z0-9-]{0,62}"
#: The pattern compiled; use ``fullmatch``.
HOST_ID_RE: Final = re.compile(HOST_ID_PATTERN)
#: How a message describes the rule.
HOST_ID_RULE: Final = f"host id ({HOST_ID_PATTERN})"


def is_host_id(value: object) -> bool:
    """Is ``value`` a string that is a valid host id?"""
    return isinstance(value, str) and HOST_ID_RE.fullmatch(value) is not None


def check_host_id(value: object, what: str = "host id") -> str:
    """``value`` if it is a valid host id, else :class:`ValueError` naming ``what`` and the value."""
    if not is_host_id(value):
        raise ValueError(f"{what}: {value!r} is not a {HOST_ID_RULE}")
    assert isinstance(value, str)
    return value


__all__ = ["HOST_ID_PATTERN", "HOST_ID_RE", "HOST_ID_RULE", "check_host_id", "is_host_id"]
