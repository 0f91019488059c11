"""The real-host test tier: several real libvirt hosts on this machine and a tiny real guest.

* :mod:`lab.guest` builds the guest (a Debian kernel, unpacked, never installed, and a busybox
  initramfs, cached under ``<repo>/.cache/guest``) and its libvirt domain XML.
* :mod:`lab.hosts` runs N libvirt hosts, each in its own network and mount namespaces with its
  own libvirtd, joined by one bridge in the root namespace.
* :mod:`lab.fixtures` gives pytest fixtures that skip with a clear reason where the machine cannot
  run them (not root, no network namespaces, no libvirtd/QEMU, or ``VMWEB_REALHOSTS=0``).
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
