"""Shared fixtures: real daemons' parts on libvirt's test driver, one test:/// file per host."""
from __future__ import annotations

import itertools
import random

import pytest
import pytest_twisted
from twisted.internet import threads

from procs import ADMIN, TEST_USERS, bootstrap_admin, password_hash, password_of
from vmwebd.client import ApiClient
from vmwebd.dom.records import UserRec
from vmwebd.config import load_config
from vmwebd.demo import write_host_config

_ports = itertools.count(0)


class RunningNode:
    """A Node started in-process on the real reactor, with a zeep client on its user API
    (logged in as the test admin; :meth:`as_user` gives one for another account)."""

    def __init__(self, node):
        self.node = node
        self._client = None

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(self.node.api_address, user=ADMIN[0], password=ADMIN[1])
        return self._client

    def call(self, op, *args):
        """Calls the user API from a thread (zeep blocks), returning a Deferred."""
        return threads.deferToThread(lambda: self.client.call(op, *args))

    def as_user(self, name: str, password: str | None = None) -> "_UserCalls":
        """Calls as another account (password: the test one for ``name`` unless given)."""
        return _UserCalls(self.node.api_address, name, password_of(name) if password is None else password)


class _UserCalls:
    def __init__(self, address: str, user: str, password: str):
        self.address, self.user, self.password = address, user, password
        self._client = None

    def _call(self, op, *args):
        if self._client is None:    # zeep fetches the WSDL: never on the reactor thread
            self._client = ApiClient(self.address, user=self.user, password=self.password)
        return self._client.call(op, *args)

    def call(self, op, *args):
        return threads.deferToThread(self._call, op, *args)


def seed_users(node, names=TEST_USERS, quota: int = 256):
    """Puts the test accounts straight into the node's DOM (quicker than CreateUser each time)."""
    return node.domsvc.put(*[UserRec(id=n, role="user", password_hash=password_hash(password_of(n)),
                                     quota_vms=quota) for n in names])


@pytest.fixture
def start_node(tmp_path):
    from twisted.internet import reactor
    from vmwebd.node import Node

    started = []

    def start(host_id="host1", cpus=8, memory_mib=16384, net=None, **kw):
        cfg_path = write_host_config(tmp_path / host_id, host_id, 0, 0, cpus, memory_mib, **kw)
        bootstrap_admin(tmp_path / host_id / "state")
        node = Node(load_config(cfg_path), reactor, fsync=False, rng=random.Random(7), net=net)
        started.append(node)
        return node.start().addCallback(lambda _: seed_users(node)).addCallback(lambda _: RunningNode(node))

    yield start
    for node in started:
        pytest_twisted.blockon(node.stop())
