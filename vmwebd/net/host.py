"""Which network executor a host uses, and the checks made before the daemon starts."""

from __future__ import annotations

from vmwebd.config import Config
from vmwebd.errors import ConfigError
from vmwebd.net.devices import NetworkDevices, RecordedDevices
from vmwebd.net.netlink import NetlinkDevices, check_underlay


def underlay_address(cfg: Config) -> str:
    """The address other hosts send this host's VXLAN traffic to: ``network/@underlay``, else the
    address of ``listen/@peer`` (empty when that is a wildcard)."""
    if cfg.network.underlay:
        return cfg.network.underlay
    host = cfg.listen.peer.host
    return "" if host in ("0.0.0.0", "::", "") else host


def devices_mode(cfg: Config) -> str:
    """``kernel`` (devices are made) or ``record`` (planned and recorded only): ``auto`` makes
    them unless the hypervisor is libvirt's test driver."""
    mode = cfg.network.devices
    if mode == "auto":
        mode = "record" if cfg.libvirt_uri.startswith("test:") else "kernel"
    return mode


def check_network(cfg: Config) -> None:
    """Where devices are made, the underlay address must be one of this host's: a ConfigError
    naming the field otherwise (checked before the daemon starts anything)."""
    if devices_mode(cfg) != "kernel":
        return
    addr = underlay_address(cfg)
    field = "network/@underlay" if cfg.network.underlay else "listen/@peer"
    source = str(cfg.source) if cfg.source else "vmwebd.xml"
    if not addr:
        raise ConfigError(
            source,
            None,
            "network/@underlay",
            f"listen/@peer is {cfg.listen.peer.host}: set the address other hosts "
            "reach this host's VXLAN segments at",
        )
    check_underlay(addr, source=source, field=field)


def make_devices(cfg: Config, reactor) -> NetworkDevices:
    """This host's executor: netlink and nftables where devices are made, else the recorder
    (its plan kept in ``<state dir>/network.json``)."""
    if devices_mode(cfg) == "record":
        return RecordedDevices(str(cfg.state_dir / "network.json"), reactor)
    check_network(cfg)
    return NetlinkDevices(reactor)
