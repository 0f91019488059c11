"""The linear entity validator agrees with libxml2's RelaxNG on schema.rng.

RelaxNG (libxml2) is the reference; it is exponential in the number of optional attributes present,
so the generated entities carry at most a handful of them. Entities of every kind are generated,
valid and broken in the ways a peer could break them: a missing or malformed id or version, an
unknown attribute, a value of the wrong type or out of range, text, a stray child element.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from vmwebd.dom.document import Dom, relaxng_valid
from vmwebd.dom.hlc import HybridClock
from vmwebd.dom.records import CONTAINERS, NS, HostRec, MigrationRec, VmRec
from vmwebd.dom.validate import _SPECS, document_error, entity_error

Q = "{%s}" % NS


VALUES = st.sampled_from(
    [
        "",
        "0",
        "-3",
        "12",
        "+7",
        "1.5",
        "1e3",
        "x",
        "running",
        "stopped",
        "absent",
        "alive",
        "dead",
        "admin",
        "user",
        "true",
        "false",
        "active",
        "creating",
        "a" * 4097,
        " 5 ",
        "NaN",
    ]
)
VERSIONS = st.sampled_from(
    ["1000.0@h1", "1795750805482.3@host-2", "1.1@H", "x", "", "1000.0@", "12345678901234567.0@h1"]
)
IDS = st.sampled_from(["c/pc0", "h1", "", "x" * 201, "ip/lab/10.0.0.1"])


@st.composite
def entities(draw):
    kind = draw(st.sampled_from(sorted(_SPECS)))
    spec = _SPECS[kind]
    el = etree.Element(Q + kind, nsmap={None: NS})
    if draw(st.integers(0, 9)) > 0:
        el.set("id", draw(IDS))
    if draw(st.integers(0, 9)) > 0:
        el.set("v", draw(VERSIONS))
    optional = sorted(a for a in spec.attrs if a not in ("id", "v"))
    for name in draw(st.lists(st.sampled_from(optional), max_size=4, unique=True)):
        el.set(name, draw(VALUES))
    if draw(st.integers(0, 9)) == 0:
        el.set("bogus", "1")
    if draw(st.integers(0, 9)) == 0:
        el.text = draw(st.sampled_from(["  ", "text"]))
    child = draw(st.integers(0, 6))
    if child == 1:
        st_el = etree.SubElement(el, Q + "status")
        st_el.set("v", draw(VERSIONS))
        if draw(st.booleans()):
            st_el.set("state", draw(VALUES))
        if draw(st.booleans()):
            st_el.set("restarts", draw(VALUES))
    elif child == 2:
        body = etree.SubElement(el, "{urn:vmweb:template:1}template", name="t")
        etree.SubElement(body, "{urn:vmweb:template:1}role", name="r", count="rest")
    elif child == 3:
        etree.SubElement(el, "template", name="old-style")  # no namespace: RelaxNG allows it
    elif child == 4:
        etree.SubElement(el, Q + "status")  # without its version
    elif child == 5:
        etree.SubElement(el, Q + "bogus")
    return el


@pytest.mark.property
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entities())
def test_fast_validator_agrees_with_relaxng(el):
    assert (entity_error(el) is None) == relaxng_valid(el), (etree.tostring(el)[:300], entity_error(el))


def test_records_as_written_are_valid_and_a_misplaced_entity_is_refused():
    dom = Dom(HybridClock("h1", lambda: 1000))
    recs = [
        MigrationRec(
            id="m1",
            vm="c/pc0",
            source="h1",
            dest="h2",
            phase="done",
            mode="live",
            requested_by="alice",
            started_at=1,
            finished_at=2,
            bytes=3,
            disk_bytes=4,
            total_ms=5,
            downtime_ms=6,
            dest_disk="/x",
            dest_console="/y",
        ),
        HostRec(id="h1", api="a", peer="p", cpus=2, memory_mib=3, images="a b"),
        VmRec(id="c/pc0", cluster="c", name="pc0", host="h1"),
    ]
    for rec in recs:
        el = dom.put(rec)
        assert entity_error(el) is None  # (how fast: bench/validate.py, not a test)
    doc = etree.fromstring(dom.to_xml())
    assert document_error(doc, CONTAINERS) is None
    bad = copy.deepcopy(doc)
    bad.find(Q + "hosts").append(etree.Element(Q + "vm", id="x", v="1.0@h1"))
    assert "extra content" in document_error(bad, CONTAINERS)
