"""System settings: grid-wide knobs kept in the DOM as ``setting`` entities.

Each known key has a default, a validator and a description; SetSetting refuses unknown keys and
bad values with an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vmwebd.dom.records import SettingRec
from vmwebd.errors import InvalidArgument, NoSuchSetting


def _choice(*options):
    def check(v: str) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v

    return check


def _float_range(lo, hi):
    def check(v: str) -> str:
        try:
            f = float(v)
        except ValueError:
            raise ValueError("must be a number") from None
        if not lo <= f <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return repr(f)

    return check


def _int_range(lo, hi, unit=""):
    def check(v: str) -> str:
        try:
            i = int(v)
        except ValueError:
            raise ValueError("must be a whole number" + (f" of {unit}" if unit else "")) from None
        if not lo <= i <= hi:
            raise ValueError(f"must be between {lo} and {hi}" + (f" {unit}" if unit else ""))
        return str(i)

    return check


@dataclass(frozen=True)
class SettingDef:
    key: str
    default: str
    check: Callable[[str], str]
    description: str


#: The longest ``stop_timeout_s`` accepted, in seconds.
STOP_TIMEOUT_MAX_S = 3600


SETTINGS: dict[str, SettingDef] = {
    s.key: s
    for s in [
        SettingDef(
            "placement",
            "spread",
            _choice("spread", "pack"),
            "How new VMs are placed: spread (by free capacity, per host) or pack (fill hosts)",
        ),
        SettingDef(
            "cpu_overcommit", "4.0", _float_range(1.0, 32.0), "vCPUs a host may carry per physical CPU"
        ),
        SettingDef(
            "restart_stopped",
            "true",
            _choice("true", "false"),
            "Start again a VM found stopped behind vmweb's back (false: leave it off, "
            "and say so in its status)",
        ),
        # How long a stop waits for the guest (docs/lifecycle.md). An hour at most: a stop that waits
        # longer is a stop nobody is watching any more.
        SettingDef(
            "stop_timeout_s",
            "60",
            _int_range(0, STOP_TIMEOUT_MAX_S, "seconds"),
            "Seconds a stopped or removed VM's guest has to shut down when asked (ACPI) "
            "before it is powered off (0: at once)",
        ),
        # The load balancer (vmwebd/migrate/balancer.py, docs/balancer.md). Off by default: a move
        # costs bandwidth and a pause, and on a driver without live migration it restarts the VM.
        SettingDef(
            "balancer.enabled",
            "false",
            _choice("true", "false"),
            "Move VMs away from hosts loaded well above the grid's load (live migration)",
        ),
        SettingDef(
            "balancer.threshold",
            "0.2",
            _float_range(0.0, 1.0),
            "How far above the grid's load (0..1, share of capacity) a host must be before it moves a VM",
        ),
        SettingDef(
            "balancer.interval",
            "60.0",
            _float_range(1.0, 86400.0),
            "Seconds between two looks of a host at its load",
        ),
        SettingDef(
            "dom.tombstone-settle",
            "600.0",
            _float_range(0.0, 604800.0),
            "Seconds a deletion's tombstone is kept at least, even once every host holds it",
        ),
        SettingDef(
            "balancer.min-residence",
            "1800.0",
            _float_range(0.0, 604800.0),
            "Seconds a VM stays where the balancer put it before it may move again",
        ),
    ]
}


#: A host being drained for maintenance has a setting entity ``drain/<host>`` = ``true`` (one
#: entity per host, so drains of two hosts asked at two hosts never overwrite each other).
DRAIN_PREFIX = "drain/"


def drained_hosts(dom) -> set[str]:
    """Hosts an admin is draining: no new VMs are placed there, the balancer moves none there."""
    return {
        r.id[len(DRAIN_PREFIX) :]
        for r in dom.all(SettingRec)
        if r.id.startswith(DRAIN_PREFIX) and r.value == "true"
    }


def drain_record(host: str, on: bool) -> SettingRec:
    return SettingRec(id=DRAIN_PREFIX + host, value="true" if on else "false")


def get_setting(dom, key: str) -> str:
    if key not in SETTINGS:
        raise NoSuchSetting(key, SETTINGS)
    rec = dom.get(SettingRec, key)
    return rec.value if rec is not None else SETTINGS[key].default


def all_settings(dom) -> dict[str, str]:
    return {k: get_setting(dom, k) for k in SETTINGS}


def checked_setting(key: str, value: str) -> SettingRec:
    """The record to write for ``key = value``; raises NoSuchSetting / InvalidArgument."""
    if key not in SETTINGS:
        raise NoSuchSetting(key, SETTINGS)
    if not isinstance(value, str):
        raise InvalidArgument(key, "value must be a string")
    try:
        value = SETTINGS[key].check(value.strip())
    except ValueError as e:
        raise InvalidArgument(key, f"{value!r}: {e}") from None
    return SettingRec(id=key, value=value)
