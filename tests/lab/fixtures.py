"""pytest fixtures of the real-host tier. Import them into a test module:

    from lab.fixtures import guest_artifacts, lab2  # noqa: F401

(``lab3`` gives three hosts, for tests that need a host beyond a pair.)

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


def _lab(n, tmp_path_factory, **kw):
    ok, why = lab_available()
    if not ok:
        pytest.skip(why)
    lab = Lab(n, tmp_path_factory.mktemp(f"lab{n}"), **kw)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def lab2(tmp_path_factory):
    """Two real libvirt hosts (h1, h2), up for the tests of one module (stopped after it, so
    later modules do not share the machine with two idle libvirtd)."""
    yield from _lab(2, tmp_path_factory)


@pytest.fixture(scope="module")
def lab3(tmp_path_factory):
    """Three real libvirt hosts (h1, h2, h3), up for the tests of one module."""
    yield from _lab(3, tmp_path_factory)


@pytest.fixture(scope="module")
def lab1_unprivileged(tmp_path_factory):
    """One real libvirt host whose libvirtd runs QEMU as ``libvirt-qemu`` under the distribution's
    DAC rules, as a stock Debian host does (skipped where that account does not exist)."""
    import pwd

    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip(
            "no libvirt-qemu account here (libvirt-daemon-system creates it, and so does "
            "scripts/bootstrap.sh)"
        )
    yield from _lab(1, tmp_path_factory, qemu_user="libvirt-qemu")
