"""A host at rest writes nothing: its heartbeat rewrites its record only when something in it
moved on in substance (or the refresh time passed), so a grid at rest spreads no rumors."""

import pytest_twisted

from vmwebd.dom.gc import parse_cvv
from vmwebd.dom.records import HostRec, SettingRec


@pytest_twisted.inlineCallbacks
def test_heartbeat_writes_the_host_record_only_when_it_moved_on(start_node):
    """Heartbeats at rest leave the record's version alone; a change elsewhere in the DOM (its
    vector moves) or the refresh time passing makes the next one write, covering that change."""
    h = yield start_node()
    node, dom = h.node, h.node.domsvc.dom
    yield node.heartbeat()
    yield node.heartbeat()
    v = dom.version_of("host", node.host_id)
    yield node.heartbeat()
    yield node.heartbeat()
    assert dom.version_of("host", node.host_id) == v

    yield node.domsvc.put(SettingRec(id="placement", value="pack"))
    setting = dom.version_of("setting", "placement")
    yield node.heartbeat()
    assert dom.version_of("host", node.host_id) > v
    published = parse_cvv(dom.get(HostRec, node.host_id).cvv)
    assert published[node.host_id] >= setting.stamp
    v = dom.version_of("host", node.host_id)
    yield node.heartbeat()
    assert dom.version_of("host", node.host_id) == v

    node.REFRESH_SECONDS = 0.0
    yield node.heartbeat()
    assert dom.version_of("host", node.host_id) > v
