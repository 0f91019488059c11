"""The one host-id rule (vmwebd.ids) and the places that must agree with it."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from vmwebd.ids import HOST_ID_PATTERN, check_host_id, is_host_id

GOOD = ["h", "host1", "0", "a-b", "h" * 63, "1-2-3"]
BAD = ["", "Host1", "-host", "host_1", "h" * 64, "host 1", "hôst", "host.1", None, 7, b"host1"]


@pytest.mark.parametrize("value", GOOD)
def test_good_host_ids(value):
    """A lower-case DNS label of 1 to 63 characters is a host id."""
    assert is_host_id(value) and check_host_id(value) == value


@pytest.mark.parametrize("value", BAD)
def test_bad_host_ids(value):
    """Anything else is refused, and the message names what was checked and the value."""
    assert not is_host_id(value)
    with pytest.raises(ValueError, match=re.escape(f"peer: {value!r}")):
        check_host_id(value, "peer")


def test_schema_pattern_agrees():
    """dom/schema.rng's version pattern uses the same host-id rule."""
    text = resources.files("vmwebd.dom").joinpath("schema.rng").read_text()
    assert "@" + HOST_ID_PATTERN.replace("-]", r"\-]") in text


def test_versions_and_certificates_use_it():
    """DOM versions, the GC's entries, the config and the PKI accept and refuse the same ids."""
    from vmwebd.dom.hlc import Version
    from vmwebd.errors import InvalidArgument
    from vmwebd.gossip.pki import check_host_id as pki_check

    assert Version.parse("1.2@" + "h" * 63).origin == "h" * 63
    with pytest.raises(ValueError):
        Version.parse("1.2@" + "h" * 64)
    with pytest.raises(InvalidArgument):
        pki_check("Host1")
