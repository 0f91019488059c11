"""Hypervisor drivers behind one narrow interface; the only package that imports libvirt.

``open_driver(uri)`` picks the driver class for a URI from a registry keyed by URI scheme (the
part before ``:`` and before any ``+transport``), like Ganeti's hypervisor registry.
"""

from __future__ import annotations

from vmwebd.hv.driver import DomainInfo, DomainSpec, Driver, HostFacts

#: scheme -> "module:Class"; None is the fallback for every other scheme. Imported lazily so
#: importing vmwebd.hv does not load libvirt until a driver is opened.
_REGISTRY: dict[str | None, str] = {
    None: "vmwebd.hv.libvirt_driver:LibvirtDriver",
}


def driver_class(uri: str) -> type[Driver]:
    """The Driver subclass that handles ``uri``."""
    import importlib

    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    module, _, name = _REGISTRY.get(scheme, _REGISTRY[None]).partition(":")
    return getattr(importlib.import_module(module), name)


def open_driver(uri: str, **kw) -> Driver:
    """A driver for ``uri``; ``kw`` goes to its constructor (reactor, threadpool, ...)."""
    return driver_class(uri)(uri, **kw)


__all__ = ["DomainInfo", "DomainSpec", "Driver", "HostFacts", "driver_class", "open_driver"]
