"""The boundary between a host's network plan and its kernel.

An executor makes a host's devices match a :class:`~vmwebd.net.plan.HostPlan` and removes devices
of ours the plan does not list (after a crash, a destroy, a migration away). Two exist:

* :class:`vmwebd.net.netlink.NetlinkDevices` creates bridges, VXLAN devices, forwarding entries and
  addresses through netlink (pyroute2) and the NAT and isolation rules through nftables;
* :class:`RecordedDevices`, where no real host is there (libvirt's test driver: the demo and most
  tests), keeps the plan it was given, so what would be made is visible and checked, and makes
  nothing.

Both run their work off the reactor thread and answer with an :class:`Applied`: a segment that
could not be made is reported by network id (the reconciler puts the reason in its VMs' status)
while the others are made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Protocol

from twisted.internet import defer, threads

from vmwebd.atomicfile import write_atomic
from vmwebd.net.plan import HostPlan


@dataclass(frozen=True)
class Applied:
    """What one apply did: segments that failed (network id -> reason) and device names removed."""

    failed: dict[int, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    changed: bool = False


class NetworkDevices(Protocol):
    #: Whether devices are really made (False: planned and recorded only).
    real: bool

    def apply(self, plan: HostPlan) -> defer.Deferred:
        """Make this host's devices match ``plan``; fires with an :class:`Applied`."""

    def current(self) -> HostPlan | None:
        """The plan last applied (None before the first)."""


class RecordedDevices:
    """Makes nothing; records the plan (in memory, and as JSON in ``path`` when given)."""

    real = False

    def __init__(self, path: str | None = None, reactor=None):
        self.path = path
        self.reactor = reactor
        self._plan: HostPlan | None = None
        self.applies = 0

    def current(self) -> HostPlan | None:
        return self._plan

    def apply(self, plan: HostPlan) -> defer.Deferred:
        before = self._plan
        self._plan = plan
        self.applies += 1
        if before == plan:
            return defer.succeed(Applied())
        gone = set()
        if before is not None:
            keep = {s.vni for s in plan.segments}
            for s in before.segments:
                if s.vni not in keep:
                    gone.update((s.bridge, s.vxlan))
        result = Applied(removed=tuple(sorted(gone)), changed=True)
        if not self.path:
            return defer.succeed(result)
        text = json.dumps(asdict(plan), indent=1, sort_keys=True)
        d = (
            threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _write_atomic, self.path, text
            )
            if self.reactor
            else defer.maybeDeferred(_write_atomic, self.path, text)
        )
        return d.addCallback(lambda _: result)


def _write_atomic(path: str, text: str) -> None:
    write_atomic(path, text, mode=None)
