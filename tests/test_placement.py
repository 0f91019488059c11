"""Placement strategies: spread in proportion to capacity, pack onto few hosts, clear errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwebd.errors import InvalidArgument, NoCapacity
from vmwebd.placement import HostLoad, place


def test_spread_is_proportional_to_capacity():
    """A host with twice the memory and cpus gets twice the VMs under spread."""
    hosts = [HostLoad("big", 16, 32768), HostLoad("small", 8, 16384)]
    out = place(hosts, [(f"v{i}", 1, 1024) for i in range(12)], "spread")
    counts = {h: list(out.values()).count(h) for h in ("big", "small")}
    assert counts == {"big": 8, "small": 4}


def test_pack_fills_one_host_first():
    """Pack puts every VM on one host while it fits."""
    hosts = [HostLoad("a", 8, 16384), HostLoad("b", 8, 16384)]
    out = place(hosts, [(f"v{i}", 1, 1024) for i in range(6)], "pack")
    assert len(set(out.values())) == 1


def test_no_capacity_names_the_vm():
    """A VM bigger than every host fails with NoCapacity naming the VM."""
    with pytest.raises(NoCapacity, match="'huge'"):
        place([HostLoad("a", 2, 1024)], [("huge", 1, 4096)])


def test_unknown_strategy_is_invalid_argument():
    """An unknown strategy name is refused, naming the setting."""
    with pytest.raises(InvalidArgument, match="placement"):
        place([HostLoad("a", 2, 1024)], [("v", 1, 10)], "random")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 32), st.integers(512, 65536)), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(1, 4), st.integers(128, 4096)), min_size=1, max_size=40),
    st.sampled_from(["spread", "pack"]),
)
def test_placement_never_overcommits(hostspecs, vmspecs, strategy):
    """Whatever the sizes, a placement never puts more on a host than its capacity allows."""
    hosts = [HostLoad(f"h{i}", c, m) for i, (c, m) in enumerate(hostspecs)]
    vms = [(f"v{i}", c, m) for i, (c, m) in enumerate(vmspecs)]
    try:
        out = place(hosts, vms, strategy)
    except NoCapacity:
        return
    for h in hosts:
        mine = [v for v in vms if out[v[0]] == h.host]
        assert sum(v[2] for v in mine) <= h.memory_mib
        assert sum(v[1] for v in mine) <= h.cpus * 4
    assert set(out) == {v[0] for v in vms}
