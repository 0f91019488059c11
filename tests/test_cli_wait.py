"""`vmweb cluster create/scale` wait for the VMs, never silently: the waiting logic driven by a
scripted user API (what GetCluster and ListHosts answer, poll by poll) and a virtual clock."""

from __future__ import annotations

import io

from vmwebd.cli import EXIT_STUCK, EXIT_TIMEOUT, STUCK_GRACE, build_parser, wait_for_boot


def vm(name, host, state, desired="running", detail=""):
    return {"name": name, "host": host, "state": state, "desired": desired, "detail": detail}


def cluster(*vms, state="creating"):
    return {"name": "c", "state": state, "vms": list(vms)}


class ScriptedApi:
    """Answers GetCluster with the next step of the script (the last one repeats), and
    ListHosts with that step's liveness; counts the polls."""

    def __init__(self, *steps):
        self.steps = steps
        self.i = -1
        self.polls = 0

    def call(self, op, *args):
        if op == "GetCluster":
            self.polls += 1
            self.i = min(self.i + 1, len(self.steps) - 1)
            return self.steps[self.i][0]
        if op == "ListHosts":
            return [{"id": h, "liveness": s} for h, s in self.steps[self.i][1].items()]
        raise AssertionError(op)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def wait(api, timeout=300.0, **kw):
    out, clock = io.StringIO(), Clock()
    c, code = wait_for_boot(api, "c", timeout, quiet=False, out=out, clock=clock, sleep=clock.sleep, **kw)
    return c, code, out.getvalue(), clock.now


ALIVE = {"host1": "alive", "host2": "alive", "host3": "alive"}
H3_DEAD = {"host1": "alive", "host2": "alive", "host3": "dead"}


def test_every_vm_running_exits_0_at_once():
    """All VMs up: exit 0 after one poll, with the progress line."""
    api = ScriptedApi(
        (cluster(vm("pc0", "host1", "pending")), ALIVE),
        (cluster(vm("pc0", "host1", "running"), state="active"), ALIVE),
    )
    _, code, out, _ = wait(api)
    assert code == 0 and api.polls == 2
    assert out.splitlines() == ["c: 0/1 VMs running", "c: 1/1 VMs running"]


def test_vms_pending_on_a_dead_host_stop_the_wait_with_a_line_each_and_exit_3():
    """Every VM still pending is on a dead host: after the grace (for the grid's own re-placement)
    the wait stops, long before --timeout, naming the host, why and what to do."""
    api = ScriptedApi(
        (
            cluster(
                vm("pc0", "host1", "running"), vm("pc1", "host3", "pending"), vm("pc2", "host3", "pending")
            ),
            H3_DEAD,
        )
    )
    _, code, out, elapsed = wait(api)
    assert code == EXIT_STUCK
    assert STUCK_GRACE <= elapsed < STUCK_GRACE + 1
    lines = out.splitlines()
    assert lines[1].startswith("vmweb: 2 VMs wait for host(s) host3, not alive; waiting up to 60 s")
    assert lines[-2:] == [
        "vmweb: c/pc1: pending on host host3, which is dead (not answering): wait for host host3 "
        "to come back, or an admin can run: vmweb host evacuate host3",
        "vmweb: c/pc2: pending on host host3, which is dead (not answering): wait for host host3 "
        "to come back, or an admin can run: vmweb host evacuate host3",
    ]


def test_a_vm_re_placed_by_the_grid_within_the_grace_ends_the_wait_well():
    """A VM pending on a dead host that the grid places elsewhere meanwhile: exit 0."""
    stuck = (cluster(vm("pc0", "host1", "running"), vm("pc1", "host3", "pending")), H3_DEAD)
    moved = (cluster(vm("pc0", "host1", "running"), vm("pc1", "host2", "pending")), H3_DEAD)
    up = (cluster(vm("pc0", "host1", "running"), vm("pc1", "host2", "running"), state="active"), H3_DEAD)
    api = ScriptedApi(*([stuck] * 20 + [moved] * 3 + [up]))
    _, code, out, elapsed = wait(api)
    assert code == 0 and elapsed < STUCK_GRACE
    assert "pending on host" not in out


def test_a_suspect_host_counts_as_not_alive_and_a_vm_on_a_live_one_keeps_the_wait_going():
    """While one pending VM is on a live host the wait goes on (to --timeout: exit 4, saying so);
    the line names the VMs waiting on hosts that are not alive."""
    api = ScriptedApi(
        (
            cluster(vm("pc0", "host1", "pending"), vm("pc1", "host3", "pending")),
            {"host1": "alive", "host3": "suspect"},
        )
    )
    _, code, out, elapsed = wait(api, timeout=120.0)
    assert code == EXIT_TIMEOUT and 120.0 < elapsed < 121.0
    lines = out.splitlines()
    assert lines[-2].startswith("vmweb: gave up waiting after 120 s with 2 VMs still coming up")
    assert lines[-1].startswith("vmweb: c/pc1: pending on host host3, which is suspect")


def test_a_vm_in_error_exits_3_at_once_with_its_hosts_words():
    """No VM pending, one in error on a live host: exit 3 at once with the hypervisor's detail."""
    api = ScriptedApi(
        (
            cluster(
                vm("pc0", "host1", "running"), vm("pc1", "host2", "error", detail="libvirt: no space left")
            ),
            ALIVE,
        )
    )
    _, code, out, elapsed = wait(api)
    assert code == EXIT_STUCK and elapsed == 0
    assert out.splitlines()[-1] == (
        "vmweb: c/pc1: failed on host host2: libvirt: no space left; "
        "host host2 tries again at its next pass (vmweb cluster show c)"
    )


def test_removals_waiting_on_a_dead_host_do_not_hold_a_scale_forever():
    """A scale down whose surplus VM sits on a dead host: after the grace, exit 3 naming it."""
    api = ScriptedApi(
        (
            cluster(
                vm("pc0", "host1", "running"),
                vm("pc1", "host3", "running", desired="absent"),
                state="scaling",
            ),
            H3_DEAD,
        )
    )
    _, code, out, _ = wait(api)
    assert code == EXIT_STUCK
    assert out.splitlines()[-1] == (
        "vmweb: c/pc1: being removed by host host3, which is dead: "
        "wait for it to come back, or an admin can run: vmweb host evacuate host3"
    )


def test_help_documents_the_exit_codes():
    """`vmweb --help` lists the exit statuses, 3 and 4 included."""
    text = build_parser().format_help()
    assert "exit status:" in text
    assert f"  {EXIT_STUCK}  cluster create/scale: some VMs cannot come up now" in text
    assert f"  {EXIT_TIMEOUT}  cluster create/scale: --timeout passed" in text
