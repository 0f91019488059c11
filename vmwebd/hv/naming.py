"""The names vmweb gives its libvirt objects (domains, volumes, seeds, old networks).

Pure functions of a VM's or a cluster's id, shared by the reconciler (which makes these objects)
and the migration manager (which moves them); kept here so neither imports the other.
"""

from __future__ import annotations

#: Every libvirt object vmweb makes starts with this (objects without it are never touched).
PREFIX = "vmweb-"


def domain_name(vm_id: str) -> str:
    """The libvirt domain of VM ``cluster/name``."""
    cluster, _, name = vm_id.partition("/")
    return f"{PREFIX}{cluster}-{name}"


def volume_name(vm_id: str) -> str:
    """The VM's copy-on-write overlay in the storage pool."""
    return domain_name(vm_id) + ".qcow2"


def network_name(cluster: str) -> str:
    """The libvirt network clusters had before segments (removed where found)."""
    return f"{PREFIX}{cluster}"


def seed_name(vm_id: str) -> str:
    """The VM's cloud-init seed image."""
    return domain_name(vm_id) + ".seed.iso"
