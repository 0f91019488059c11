"""The real-host test tier: several real libvirt hosts on this machine and a tiny real guest.

* :mod:`lab.guest` builds the guest (a Debian kernel, unpacked, never installed, and a busybox
  initramfs, cached under ``<repo>/.cache/guest``) and its libvirt domain XML.
* :mod:`lab.hosts` runs N libvirt hosts, each in its own network and mount namespaces with its
  own libvirtd, joined by one bridge in the root namespace.
* :mod:`lab.vmweb` runs a vmwebd beside each libvirtd of a lab and the ``vmweb`` CLI on its hosts.
* :mod:`lab.fixtures` gives pytest fixtures that skip with a clear reason where the machine cannot
  run them (not root, no network namespaces, no libvirtd/QEMU, or ``VMWEB_REALHOSTS=0``).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Polls ``predicate()`` until it returns something truthy, and returns that; after ``timeout``
    seconds raises TimeoutError naming ``what`` (the deadline is the assertion, never a sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(interval)
