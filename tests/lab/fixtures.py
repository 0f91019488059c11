"""pytest fixtures of the real-host tier. Import them into a test module:

    from lab.fixtures import guest_artifacts, lab2  # noqa: F401

They skip (with the reason from :func:`lab.hosts.lab_available`) where this machine cannot run
real hosts: not root, no network namespaces, no libvirtd/QEMU, or ``VMWEB_REALHOSTS=0``.
"""
from __future__ import annotations

import pytest

from .guest import build_guest
from .hosts import Lab, lab_available


@pytest.fixture(scope="session")
def guest_artifacts():
    """The guest's kernel and initramfs (built once, cached in <repo>/.cache/guest)."""
    ok, why = lab_available()
    if not ok:
        pytest.skip(why)
    return build_guest()


@pytest.fixture(scope="module")
def lab2(tmp_path_factory):
    """Two real libvirt hosts (h1, h2), up for the tests of one module (stopped after it, so
    later modules do not share the machine with two idle libvirtd)."""
    ok, why = lab_available()
    if not ok:
        pytest.skip(why)
    lab = Lab(2, tmp_path_factory.mktemp("lab2"))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
