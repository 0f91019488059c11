"""Shared fixtures: real daemons' parts on libvirt's test driver, one test:/// file per host."""
from __future__ import annotations

import itertools
import random

import pytest
import pytest_twisted
from twisted.internet import threads

from vmwebd.client import ApiClient
from vmwebd.config import load_config
from vmwebd.demo import write_host_config

_ports = itertools.count(0)


class RunningNode:
    """A Node started in-process on the real reactor, with a zeep client on its user API."""

    def __init__(self, node):
        self.node = node
        self._client = None

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(self.node.api_address)
        return self._client

    def call(self, op, *args):
        """Calls the user API from a thread (zeep blocks), returning a Deferred."""
        return threads.deferToThread(lambda: self.client.call(op, *args))


@pytest.fixture
def start_node(tmp_path):
    from twisted.internet import reactor
    from vmwebd.node import Node

    started = []

    def start(host_id="host1", cpus=8, memory_mib=16384, **kw):
        cfg_path = write_host_config(tmp_path / host_id, host_id, 0, 0, cpus, memory_mib, **kw)
        node = Node(load_config(cfg_path), reactor, fsync=False, rng=random.Random(7))
        started.append(node)
        return node.start().addCallback(lambda _: RunningNode(node))

    yield start
    for node in started:
        pytest_twisted.blockon(node.stop())
