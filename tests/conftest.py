"""Shared fixtures: real daemons' parts on libvirt's test driver, one test:/// file per host."""

from __future__ import annotations

import itertools
import random

import pytest
import pytest_twisted
from twisted.internet import threads

from procs import ADMIN, TEST_USERS, bootstrap_admin, password_hash, password_of
from vmwebd.client import ApiClient
from vmwebd.config import load_config
from vmwebd.demo import write_host_config
from vmwebd.dom.records import UserRec

_ports = itertools.count(0)

# -- tiers -------------------------------------------------------------------------------------
# `slow`: real daemons, many hypothesis examples (marked in the test files). `process`: the test
# starts another program (a daemon, the CLI, pip, cloud-init's tools, ssh-keygen, nft…).
# `realhost`: it needs the real-host lab (libvirtd, QEMU, network namespaces). `property`: a
# hypothesis property taking seconds (its examples). `make test-fast` deselects all four. New tests carry their marker themselves; the tests below were written
# before the markers existed and get theirs here.
_REALHOST_WORD = "realhost"  # in the module's name: test_realhosts*.py, …
_PROCESS_MODULES = {"test_console.py"}  # every console test runs /bin/sh on a real pty
_PROCESS_TESTS = {
    "test_audit.py": {"test_vmweb_audit_prints_a_table_or_json_and_refuses_bad_arguments"},
    "test_cli_shell.py": {
        "test_cli_imports_no_server_code",
        "test_version_of_both_commands",
        "test_completion_of_commands_and_options",
        "test_name_completion_is_bounded_and_silent",
    },
    "test_graceful_stop.py": {
        "test_restart_stopped_false_leaves_a_vm_stopped_behind_our_back_off",
        "test_cli_shows_the_timeout_and_takes_force",
    },
    "test_net_devices.py": {"test_ruleset_text_is_accepted_by_nft"},
    "test_packaging.py": {
        "test_wheel_holds_config_templates_web_files_and_schema",
        "test_wheel_metadata",
        "test_installed_wheel_writes_its_example_config",
        "test_the_daemon_without_the_libvirt_binding_says_so_in_one_line",
    },
    "test_sdnotify.py": {"test_unit_passes_systemd_analyze_verify"},
    "test_seed.py": {
        "test_cloud_init_accepts_user_data",
        "test_cloud_init_renders_the_lease_for_networkd",
        "test_cloud_init_renders_the_lease_for_ifupdown",
        "test_blkid_sees_the_label",
    },
    "test_ssh_keys.py": {
        "test_fingerprint_is_the_one_openssh_prints",
        "test_cli_user_key_commands_and_cluster_hosts",
    },
    "test_store.py": {"test_acknowledged_records_survive_sigkill"},
    "test_web_views.py": {
        "test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session",
        "test_cli_user_commands_and_credentials",
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if _REALHOST_WORD in module:
            item.add_marker(pytest.mark.realhost)
        if module in _PROCESS_MODULES or item.originalname in _PROCESS_TESTS.get(module, ()):
            item.add_marker(pytest.mark.process)


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
        if self._client is None:  # zeep fetches the WSDL: never on the reactor thread
            self._client = ApiClient(self.address, user=self.user, password=self.password)
        return self._client.call(op, *args)

    def call(self, op, *args):
        return threads.deferToThread(self._call, op, *args)


def seed_users(node, names=TEST_USERS, quota: int = 256):
    """Puts the test accounts straight into the node's DOM (quicker than CreateUser each time)."""
    return node.domsvc.put(
        *[
            UserRec(id=n, role="user", password_hash=password_hash(password_of(n)), quota_vms=quota)
            for n in names
        ]
    )


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
