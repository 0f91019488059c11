"""Where VMs go: pure placement strategies over the hosts' capacities.

A host's capacity is its memory and its vCPUs times an overcommit ratio; its use is the sum of the
VMs the DOM assigns to it. ``spread`` puts each VM where the utilisation after placing it is lowest
(normalised per host, so a host with twice the capacity gets about twice the VMs); ``pack`` fills
the most used host that still fits, leaving whole hosts free.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmwebd.errors import InvalidArgument, NoCapacity

STRATEGIES = ("spread", "pack")


@dataclass
class HostLoad:
    host: str
    cpus: int
    memory_mib: int
    used_vcpus: int = 0
    used_memory_mib: int = 0

    def utilisation(self, overcommit: float, add_vcpus: int = 0, add_mem: int = 0) -> float:
        cpu_cap = max(self.cpus * overcommit, 1e-9)
        mem_cap = max(self.memory_mib, 1e-9)
        return max((self.used_vcpus + add_vcpus) / cpu_cap, (self.used_memory_mib + add_mem) / mem_cap)

    def fits(self, overcommit: float, vcpus: int, mem: int) -> bool:
        return (
            self.used_vcpus + vcpus <= self.cpus * overcommit
            and self.used_memory_mib + mem <= self.memory_mib
        )


def place(
    hosts: list[HostLoad], vms: list[tuple[str, int, int]], strategy: str = "spread", overcommit: float = 4.0
) -> dict[str, str]:
    """Assigns each ``(vm_id, vcpus, memory_mib)`` a host; raises NoCapacity if one does not fit.

    ``hosts`` is not modified. Ties are broken by host id, so the result is deterministic.
    """
    if strategy not in STRATEGIES:
        raise InvalidArgument("placement", f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    loads = {h.host: HostLoad(h.host, h.cpus, h.memory_mib, h.used_vcpus, h.used_memory_mib) for h in hosts}
    out = {}
    # Biggest VMs first: fewer dead ends when sizes differ.
    for vm_id, vcpus, mem in sorted(vms, key=lambda v: (-v[2], -v[1], v[0])):
        fitting = [h for h in loads.values() if h.fits(overcommit, vcpus, mem)]
        if not fitting:
            free = (
                ", ".join(
                    f"{h.host}: {h.memory_mib - h.used_memory_mib} MiB free"
                    for h in sorted(loads.values(), key=lambda h: h.host)
                )
                or "no live hosts"
            )
            raise NoCapacity(f"no host can take VM {vm_id!r} ({vcpus} vCPUs, {mem} MiB): {free}")
        if strategy == "spread":
            best = min(fitting, key=lambda h: (h.utilisation(overcommit, vcpus, mem), h.host))
        else:
            best = min(fitting, key=lambda h: (-h.utilisation(overcommit), h.host))
        best.used_vcpus += vcpus
        best.used_memory_mib += mem
        out[vm_id] = best.host
    return out
