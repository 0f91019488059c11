"""The node as a MultiService of its parts (vmwebd/node.py, vmwebd/parts.py): started in order,
stopped in the reverse order, each waited for; a second stop does nothing."""

import pytest_twisted
from twisted.application.service import MultiService
from twisted.internet import defer, task

from vmwebd.parts import Loop, Part


@pytest_twisted.inlineCallbacks
def test_a_started_node_runs_its_parts_and_stops_them_all(start_node):
    h = yield start_node()
    node = h.node
    assert isinstance(node, MultiService) and node.running
    names = [p.name for p in node]
    assert names[0] == "store" and names[-1] == "api"
    assert names.index("leases") < names.index("heartbeat") < names.index("reconciler")
    assert all(p.running for p in node), [p.name for p in node if not p.running]
    yield node.stop()
    assert not node.running and not any(p.running for p in node)
    yield node.stop()  # nothing left to stop


def test_parts_start_in_order_and_stop_in_reverse_each_waited_for():
    """What Node does with its parts: a start or stop returning a Deferred holds the next one."""
    from vmwebd.node import Node

    seen = []
    gate = defer.Deferred()

    def part(name, slow=False):
        def start():
            seen.append(f"start {name}")
            return gate if slow else None

        return Part(name, start=start, stop=lambda: seen.append(f"stop {name}"))

    node = MultiService()
    for p in (part("a"), part("b", slow=True), part("c")):
        node.addService(p)
    d = Node._start_parts(node)
    assert seen == ["start a", "start b"]
    gate.callback(None)
    assert seen == ["start a", "start b", "start c"] and d.called
    Node.stopService(node)
    assert seen[3:] == ["stop c", "stop b", "stop a"]


def test_a_loop_runs_first_when_asked_and_stops_with_its_service():
    clock = task.Clock()
    calls = []
    loop = Loop("beat", lambda: calls.append(clock.seconds()), 10.0, clock, first=True)
    loop.startService()
    assert calls == [0]
    clock.advance(10)
    assert calls == [0, 10]
    loop.stopService()
    clock.advance(30)
    assert calls == [0, 10]
    later = Loop("sweep", lambda: calls.append(clock.seconds()), 5.0, clock)
    later.startService()
    clock.advance(5)
    assert calls[-1] == 45
    later.stopService()


@pytest_twisted.inlineCallbacks
def test_a_start_that_fails_while_composing_closes_what_it_opened(tmp_path):
    """A certificate for another host: the start fails naming it, before any part runs, and the
    store and hypervisor it had opened are closed (a stop afterwards has nothing to do)."""
    import pytest
    from twisted.internet import reactor

    from vmwebd.config import load_config
    from vmwebd.demo import write_host_config
    from vmwebd.errors import ConfigError
    from vmwebd.gossip import pki
    from vmwebd.node import Node

    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.issue_host_cert(ca, "host2", tmp_path / "host2-pki", ["127.0.0.1"])
    cfg = write_host_config(
        tmp_path / "host1",
        "host1",
        0,
        0,
        8,
        16384,
        extra=f'<peers cert-dir="{tmp_path / "host2-pki"}" timing="local"/>',
    )
    node = Node(load_config(cfg), reactor, fsync=False)
    with pytest.raises(ConfigError, match="is for host 'host2'"):
        yield node.start()
    assert not node.running and list(node) == [] and node.peer_port is None
    assert node.driver._closed and node.domsvc.store._fd is None
    yield node.stop()
