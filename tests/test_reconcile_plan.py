"""The reconciler's rules (vmwebd/reconcile_plan.py), without daemons, libvirt or a clock.

A table gives, for each desired state of a VM, the state its domain is found in, the status
recorded before, a graceful stop under way (and how far along it is), the settings and the cases
where the VM is not this host's to touch, the action :func:`decide_vm` must answer, with the
status it records. Smaller tables cover the rest of a pass (orphan domains, old networks,
finished destroys, leases whose holder is gone); hypothesis properties check that the decision
is total and never starts, powers off or touches what it must not.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwebd.dom.hlc import Version
from vmwebd.dom.records import LeaseRec, MigrationRec, VClusterRec, VmRec, VmStatus
from vmwebd.hv.driver import DOMAIN_STATES
from vmwebd.hv.naming import PREFIX, domain_name, network_name
from vmwebd.migrate.state import STALE_MS
from vmwebd.reconcile_plan import (
    NOT_RESTARTED,
    STOP_POLL,
    AwaitStop,
    Fail,
    GuestStop,
    Keep,
    LeaveOff,
    Nothing,
    PowerOff,
    Remove,
    Settings,
    Start,
    Status,
    Stopping,
    after_look,
    asked_after,
    assigned_here,
    decide_vm,
    failed,
    finished_destroys,
    lease_batch,
    lease_orphaned,
    look_delay,
    orphan_domains,
    stale_networks,
    status_record,
    stop_still_wanted,
)

HOST, OTHER = "host1", "host2"
T0 = 5000.0  # stop_clock seconds when a row decides (unless it says otherwise)
CLUSTER = VClusterRec(id="lab", owner="alice", vni=100, token="ct1")
SEG = "network segment vmbr100: network devices not made: boom"

ON = Settings(stop_timeout_s=60, restart_stopped=True)
OFF = Settings(stop_timeout_s=60, restart_stopped=False)
NO_WAIT = Settings(stop_timeout_s=0, restart_stopped=True)

LEFT = f"found shutoff behind vmweb's back; {NOT_RESTARTED}"
ASKED60 = "asked its guest to shut down; powered off if still running after 60 s"
ASKED40 = "asked its guest to shut down; powered off if still running after 40 s"
LATE60 = "did not shut down within 60 s of being asked; powered off"


def vm(desired: str = "running", force: bool | None = None, host: str = HOST, token: str = "t1") -> VmRec:
    return VmRec(id="lab/n1", cluster="lab", name="n1", host=host, desired=desired, token=token, force=force)


def was(state: str, detail: str = "", restarts: int = 0, host: str = HOST) -> VmStatus:
    return VmStatus(id="lab/n1", host=host, state=state, detail=detail, restarts=restarts, token="t1")


#: A graceful stop asked at T0 - ``ago`` with a 60 s timeout (``timeout`` s when given).
def asked(ago: float, timeout: int = 60, token: str = "t1", last: float | None = None) -> Stopping:
    at = T0 - ago
    return Stopping(token, timeout, at + timeout, at if last is None else T0 - last)


def stopping(restarts: int = 0, detail: str = ASKED60) -> Status:
    return Status("stopping", detail, restarts)


FRESH = Stopping("t1", 60, T0 + 60, T0)

# (row id, vm, observed, prev, stop under way, settings, extra keywords, expected action)
ROWS = [
    # -- desired running ------------------------------------------------------------------
    ("run/running/new", vm(), "running", None, None, ON, {}, Keep(Status("running", "", 0))),
    (
        "run/running/keeps detail and restarts",
        vm(),
        "running",
        was("running", "found shutoff behind our back; restarted", 2),
        None,
        ON,
        {},
        Keep(Status("running", "found shutoff behind our back; restarted", 2)),
    ),
    (
        "run/running/stop under way (changed mind)",
        vm(),
        "running",
        was("stopping", ASKED60),
        asked(5),
        ON,
        {},
        Keep(Status("running", ASKED60, 0)),
    ),
    ("run/missing/new", vm(), "missing", None, None, ON, {}, Start(Status("running", "", 0), create=True)),
    (
        "run/missing/new, cluster gone",
        vm(),
        "missing",
        None,
        None,
        ON,
        {"cluster": None},
        Fail(Status("error", "VM lab/n1: its cluster 'lab' is not in the DOM", 0)),
    ),
    (
        "run/shutoff/new, no cluster needed to start a defined domain",
        vm(),
        "shutoff",
        None,
        None,
        OFF,
        {"cluster": None},
        Start(Status("running", "", 0)),
    ),
    (
        "run/shutoff/status from another host (evacuated here)",
        vm(),
        "shutoff",
        was("running", "x", 3, host=OTHER),
        None,
        OFF,
        {},
        Start(Status("running", "", 3)),
    ),
    (
        "run/shutoff/stopped by a user, now asked to run",
        vm(),
        "shutoff",
        was("shutoff", "powered off at once (forced)", 1),
        None,
        OFF,
        {},
        Start(Status("running", "", 1)),
    ),
    (
        "run/shutoff/stopping when asked to run again",
        vm(),
        "shutoff",
        was("stopping", ASKED60),
        asked(5),
        OFF,
        {},
        Start(Status("running", "", 0)),
    ),
    (
        "run/shutoff/behind our back, restart_stopped true",
        vm(),
        "shutoff",
        was("running"),
        None,
        ON,
        {},
        Start(Status("running", "found shutoff behind our back; restarted", 1)),
    ),
    (
        "run/missing/behind our back, restart_stopped true",
        vm(),
        "missing",
        was("running", "", 3),
        None,
        ON,
        {},
        Start(Status("running", "found missing behind our back; restarted", 4), create=True),
    ),
    (
        "run/missing/behind our back, cluster gone: the restart still counts",
        vm(),
        "missing",
        was("running", "", 3),
        None,
        ON,
        {"cluster": None},
        Fail(Status("error", "VM lab/n1: its cluster 'lab' is not in the DOM", 4)),
    ),
    (
        "run/paused/behind our back, restart_stopped true",
        vm(),
        "paused",
        was("running"),
        None,
        ON,
        {},
        Start(Status("running", "found paused behind our back; restarted", 1)),
    ),
    (
        "run/shutoff/behind our back, restart_stopped false",
        vm(),
        "shutoff",
        was("running", "", 2),
        None,
        OFF,
        {},
        LeaveOff(Status("shutoff", LEFT, 2), notice=f"found shutoff; {NOT_RESTARTED}"),
    ),
    (
        "run/crashed/behind our back, restart_stopped false",
        vm(),
        "crashed",
        was("running"),
        None,
        OFF,
        {},
        LeaveOff(
            Status("crashed", f"found crashed behind vmweb's back; {NOT_RESTARTED}", 0),
            notice=f"found crashed; {NOT_RESTARTED}",
        ),
    ),
    (
        "run/shutoff/left off stays off",
        vm(),
        "shutoff",
        was("shutoff", LEFT, 2),
        None,
        OFF,
        {},
        LeaveOff(Status("shutoff", LEFT, 2)),
    ),
    (
        "run/missing/left off stays off, its detail kept",
        vm(),
        "missing",
        was("shutoff", LEFT),
        None,
        OFF,
        {},
        LeaveOff(Status("missing", LEFT, 0)),
    ),
    (
        "run/shutoff/left off, a user asked again",
        vm(),
        "shutoff",
        was("shutoff", LEFT, 2),
        None,
        OFF,
        {"asked_after_status": True},
        Start(Status("running", "", 2)),
    ),
    (
        "run/shutoff/left off, restart_stopped true again",
        vm(),
        "shutoff",
        was("shutoff", LEFT, 2),
        None,
        ON,
        {},
        Start(Status("running", "found shutoff behind our back; restarted", 3)),
    ),
    (
        "run/running/a user asking again changes nothing for one never left off",
        vm(),
        "shutoff",
        was("running"),
        None,
        OFF,
        {"asked_after_status": True},
        LeaveOff(Status("shutoff", LEFT, 0), notice=f"found shutoff; {NOT_RESTARTED}"),
    ),
    (
        "run/shutoff/segment not made",
        vm(),
        "shutoff",
        was("running", "", 1),
        None,
        ON,
        {"segment_error": SEG},
        Fail(Status("error", SEG, 1)),
    ),
    (
        "run/missing/segment not made",
        vm(),
        "missing",
        None,
        None,
        ON,
        {"segment_error": SEG},
        Fail(Status("error", SEG, 0)),
    ),
    (
        "run/running/segment not made: a running guest is left running",
        vm(),
        "running",
        was("running"),
        None,
        ON,
        {"segment_error": SEG},
        Keep(Status("running", "", 0)),
    ),
    # -- desired stopped ------------------------------------------------------------------
    (
        "stop/running/first look: the guest is asked",
        vm("stopped"),
        "running",
        was("running", "", 1),
        None,
        ON,
        {},
        GuestStop(FRESH, ask=True, fresh=True, status=stopping(1), off=LeaveOff(Status("shutoff", "", 1))),
    ),
    (
        "stop/running/5 s after asking: looked at, not asked again",
        vm("stopped"),
        "running",
        was("stopping", ASKED60),
        asked(5),
        ON,
        {},
        GuestStop(
            asked(5), ask=False, fresh=False, status=stopping(), off=LeaveOff(Status("shutoff", "", 0))
        ),
    ),
    (
        "stop/running/10 s after the last request: asked again, same deadline",
        vm("stopped"),
        "running",
        was("stopping", ASKED60),
        asked(30, last=10),
        ON,
        {},
        GuestStop(
            Stopping("t1", 60, T0 + 30, T0),
            ask=True,
            fresh=False,
            status=stopping(),
            off=LeaveOff(Status("shutoff", "", 0)),
        ),
    ),
    (
        "stop/running/deadline reached",
        vm("stopped"),
        "running",
        was("stopping", ASKED60, 2),
        asked(60),
        ON,
        {},
        PowerOff(Status("shutoff", LATE60, 2)),
    ),
    (
        "stop/running/timeout read when first asked (setting changed since)",
        vm("stopped"),
        "running",
        was("stopping", ASKED40),
        asked(20, timeout=40, last=5),
        Settings(stop_timeout_s=600),
        {},
        GuestStop(
            asked(20, timeout=40, last=5),
            ask=False,
            fresh=False,
            status=stopping(0, ASKED40),
            off=LeaveOff(Status("shutoff")),
        ),
    ),
    (
        "stop/running/40 s timeout passed",
        vm("stopped"),
        "running",
        was("stopping", ASKED40),
        asked(41, timeout=40),
        Settings(stop_timeout_s=600),
        {},
        PowerOff(Status("shutoff", "did not shut down within 40 s of being asked; powered off", 0)),
    ),
    (
        "stop/running/a stop asked of an earlier creation: asked anew",
        vm("stopped"),
        "running",
        was("running"),
        asked(59, token="t0"),
        ON,
        {},
        GuestStop(FRESH, ask=True, fresh=True, status=stopping(), off=LeaveOff(Status("shutoff", "", 0))),
    ),
    (
        "stop/running/forced",
        vm("stopped", force=True),
        "running",
        was("running"),
        None,
        ON,
        {},
        PowerOff(Status("shutoff", "powered off at once (forced)", 0)),
    ),
    (
        "stop/running/forced while a graceful stop waits",
        vm("stopped", force=True),
        "running",
        was("stopping", ASKED60),
        asked(5),
        ON,
        {},
        PowerOff(Status("shutoff", "powered off at once (forced)", 0)),
    ),
    (
        "stop/running/stop_timeout_s 0",
        vm("stopped"),
        "running",
        was("running"),
        None,
        NO_WAIT,
        {},
        PowerOff(Status("shutoff", "powered off at once (stop_timeout_s is 0)", 0)),
    ),
    (
        "stop/paused/cannot hear the request",
        vm("stopped"),
        "paused",
        was("paused"),
        None,
        ON,
        {},
        PowerOff(Status("shutoff", "powered off at once (it was paused)", 0)),
    ),
    (
        "stop/shutoff/went off",
        vm("stopped"),
        "shutoff",
        was("running", "x", 1),
        None,
        ON,
        {},
        LeaveOff(Status("shutoff", "", 1)),
    ),
    (
        "stop/shutoff/went off when asked",
        vm("stopped"),
        "shutoff",
        was("stopping", ASKED60),
        asked(5),
        ON,
        {},
        LeaveOff(Status("shutoff", "", 0)),
    ),
    (
        "stop/shutoff/how it was powered off stays",
        vm("stopped"),
        "shutoff",
        was("shutoff", "powered off at once (forced)"),
        None,
        ON,
        {},
        LeaveOff(Status("shutoff", "powered off at once (forced)", 0)),
    ),
    (
        "stop/shutoff/left off, then stopped by a user: the note goes",
        vm("stopped"),
        "shutoff",
        was("shutoff", LEFT),
        None,
        OFF,
        {},
        LeaveOff(Status("shutoff", "", 0)),
    ),
    ("stop/missing/new", vm("stopped"), "missing", None, None, ON, {}, LeaveOff(Status("missing", "", 0))),
    (
        "stop/shutoff/never started, whatever restart_stopped says",
        vm("stopped"),
        "shutoff",
        was("running"),
        None,
        ON,
        {"asked_after_status": True},
        LeaveOff(Status("shutoff", "", 0)),
    ),
    # -- desired absent -------------------------------------------------------------------
    ("gone/missing", vm("absent"), "missing", was("shutoff"), None, ON, {}, Remove()),
    ("gone/shutoff", vm("absent"), "shutoff", None, None, ON, {}, Remove()),
    ("gone/crashed", vm("absent"), "crashed", None, None, ON, {}, Remove()),
    (
        "gone/shutoff/after its stop",
        vm("absent"),
        "shutoff",
        was("stopping", ASKED60),
        asked(5),
        ON,
        {},
        Remove(),
    ),
    (
        "gone/running/first look: the guest is asked",
        vm("absent"),
        "running",
        was("running"),
        None,
        ON,
        {},
        GuestStop(FRESH, ask=True, fresh=True, status=stopping(), off=Remove()),
    ),
    (
        "gone/running/waiting",
        vm("absent"),
        "running",
        was("stopping", ASKED60),
        asked(30, last=1),
        ON,
        {},
        GuestStop(asked(30, last=1), ask=False, fresh=False, status=stopping(), off=Remove()),
    ),
    (
        "gone/running/deadline reached",
        vm("absent"),
        "running",
        was("stopping", ASKED60),
        asked(61),
        ON,
        {},
        Remove(power_off=LATE60),
    ),
    (
        "gone/running/forced",
        vm("absent", force=True),
        "running",
        was("running"),
        None,
        ON,
        {},
        Remove(power_off="powered off at once (forced)"),
    ),
    (
        "gone/paused",
        vm("absent"),
        "paused",
        None,
        None,
        ON,
        {},
        Remove(power_off="powered off at once (it was paused)"),
    ),
    (
        "gone/running/stop_timeout_s 0",
        vm("absent"),
        "running",
        None,
        None,
        NO_WAIT,
        {},
        Remove(power_off="powered off at once (stop_timeout_s is 0)"),
    ),
    # -- not this host's to touch ---------------------------------------------------------
    ("elsewhere/running", vm(host=OTHER), "missing", None, None, ON, {}, Nothing()),
    ("elsewhere/absent", vm("absent", host=OTHER), "running", None, None, ON, {}, Nothing()),
    ("moving/running", vm(), "missing", was("running"), None, ON, {"migrating": True}, Nothing()),
    ("moving/stopped", vm("stopped"), "running", None, asked(70), ON, {"migrating": True}, Nothing()),
    ("moving/absent", vm("absent", force=True), "running", None, None, ON, {"migrating": True}, Nothing()),
]


@pytest.mark.parametrize(
    "vmrec, observed, prev, stop, conf, extra, expected", [pytest.param(*r[1:], id=r[0]) for r in ROWS]
)
def test_decide_vm(vmrec, observed, prev, stop, conf, extra, expected):
    extra = dict(extra)
    cluster = extra.pop("cluster", CLUSTER)
    got = decide_vm(vmrec, cluster, observed, prev, stop, T0, conf, host_id=HOST, **extra)
    assert got == expected


def test_the_table_covers_every_action_and_desired_state():
    actions = {type(r[-1]) for r in ROWS}
    assert actions == {Nothing, Keep, Start, LeaveOff, PowerOff, Remove, GuestStop, Fail}
    assert {r[1].desired for r in ROWS} == {"running", "stopped", "absent"}
    # AwaitStop is what follows a GuestStop: test_after_look.


# -- after a graceful stop's look ------------------------------------------------------------
GS_STOPPED = GuestStop(
    FRESH, ask=True, fresh=True, status=stopping(2), off=LeaveOff(Status("shutoff", "", 2))
)
GS_ABSENT = GuestStop(FRESH, ask=False, fresh=False, status=stopping(), off=Remove())


@pytest.mark.parametrize(
    "action, looked, expected",
    [
        (GS_STOPPED, "running", AwaitStop(stopping(2))),
        (GS_STOPPED, "shutoff", LeaveOff(Status("shutoff", "", 2))),
        (GS_STOPPED, "missing", LeaveOff(Status("shutoff", "", 2))),
        (GS_STOPPED, "paused", LeaveOff(Status("shutoff", "", 2))),
        (GS_ABSENT, "running", AwaitStop(stopping())),
        (GS_ABSENT, "shutoff", Remove()),
        (GS_ABSENT, "crashed", Remove()),
    ],
)
def test_after_look(action, looked, expected):
    assert after_look(action, looked) == expected


@pytest.mark.parametrize(
    "deadline, now, expected",
    [(T0 + 60, T0, STOP_POLL), (T0 + 0.25, T0, 0.25), (T0, T0, 0.0), (T0 - 3, T0, 0.0)],
)
def test_look_delay_is_the_poll_or_the_deadline(deadline, now, expected):
    assert look_delay(Stopping("t1", 60, deadline, T0 - 1), now) == expected


@pytest.mark.parametrize(
    "rec, wanted",
    [(None, False), (vm(host=OTHER), False), (vm(token="t2"), False), (vm("stopped"), True), (vm(), True)],
)
def test_a_stop_is_finished_with_its_vm_gone_moved_or_made_anew(rec, wanted):
    assert stop_still_wanted(rec, HOST, asked(5)) is wanted


@pytest.mark.parametrize(
    "main, status, expected",
    [
        (None, None, False),
        (Version(10, 0, "a"), None, False),
        (None, Version(10, 0, "a"), False),
        (Version(10, 0, "a"), Version(10, 0, "a"), False),
        (Version(9, 5, "b"), Version(10, 0, "a"), False),
        (Version(10, 1, "a"), Version(10, 0, "b"), True),
    ],
)
def test_asked_after(main, status, expected):
    assert asked_after(main, status) is expected


def test_a_status_saying_what_is_recorded_is_not_written():
    assert status_record(vm(), HOST, was("running", "d", 1), Status("running", "d", 1), 7) is None
    got = status_record(vm(), HOST, was("running", "d", 1), Status("shutoff", "d", 1), 7)
    assert got == VmStatus(
        id="lab/n1", host=HOST, state="shutoff", detail="d", restarts=1, observed_at=7, token="t1"
    )
    assert status_record(vm(), HOST, None, Status("running"), 7).state == "running"


def test_a_failed_action_keeps_the_restart_it_decided():
    prev = was("running", "", 3)
    assert failed(Start(Status("running", "r", 4), create=True), prev, "e") == Status("error", "e", 4)
    assert failed(Remove(), prev, "e") == Status("error", "e", 3)
    assert failed(Remove(), None, "e") == Status("error", "e", 0)


# -- the rest of a pass ----------------------------------------------------------------------
def test_assigned_here_leaves_out_other_hosts_and_moving_vms():
    a = VmRec(id="lab/a", cluster="lab", host=HOST)
    b = VmRec(id="lab/b", cluster="lab", host=OTHER)
    c = VmRec(id="lab/c", cluster="lab", host=HOST)
    assert assigned_here([a, None, b, c], HOST, {"lab/c": object()}) == [a]


def test_orphan_domains():
    mine = [VmRec(id="lab/n1", cluster="lab", host=HOST)]
    found = {"vmweb-lab-n1", "vmweb-lab-n2", "vmweb-lab-n3", "vmweb-old-x", "someone-elses", "vmweb"}
    assert orphan_domains(found, mine, {"lab/n3"}, domain_of=domain_name, prefix=PREFIX) == [
        "vmweb-lab-n2",
        "vmweb-old-x",
    ]
    assert (
        orphan_domains(
            found,
            mine + [VmRec(id="old/x", host=HOST)],
            ["lab/n3", "lab/n2"],
            domain_of=domain_name,
            prefix=PREFIX,
        )
        == []
    )
    assert orphan_domains([], mine, (), domain_of=domain_name, prefix=PREFIX) == []


def test_stale_networks_go_with_the_last_vm_of_their_cluster_here():
    mine = [
        VmRec(id="lab/n1", cluster="lab", host=HOST),
        VmRec(id="gone/n1", cluster="gone", host=HOST, desired="absent"),
        VmRec(id="off/n1", cluster="off", host=HOST, desired="stopped"),
    ]
    found = {"vmweb-lab", "vmweb-gone", "vmweb-off", "vmweb-old", "default"}
    assert stale_networks(found, mine, network_of=network_name, prefix=PREFIX) == ["vmweb-gone", "vmweb-old"]


def test_finished_destroys():
    clusters = {
        "d": VClusterRec(id="d", state="destroying"),
        "a": VClusterRec(id="a", state="destroying"),
        "b": VClusterRec(id="b", state="destroying"),
        "c": VClusterRec(id="c", state="active"),
        "e": VClusterRec(id="e", state="creating"),
    }
    got = finished_destroys(clusters, {"a": 0, "b": 1, "c": 0, "e": 0})
    assert [c.id for c in got] == ["a", "d"]


@pytest.mark.parametrize(
    "ids, cursor, size, batch, after",
    [
        ([], 7, 2, [], 7),
        (["a", "b", "c"], 0, 2, ["a", "b"], 2),
        (["a", "b", "c"], 2, 2, ["c"], 3),
        (["a", "b", "c"], 3, 2, ["a", "b"], 2),
        (["a", "b", "c"], 10, 5, ["b", "c"], 3),
    ],
)
def test_lease_batch(ids, cursor, size, batch, after):
    assert lease_batch(ids, cursor, size) == (batch, after)


class _Records:
    def __init__(self, *recs):
        self._recs = {(type(r), r.id): r for r in recs}

    def get(self, cls, id_):
        return self._recs.get((cls, id_))


NOW_MS = 10_000_000
GRACE_MS = 300_000
LIVE = _Records(
    VClusterRec(id="lab", token="ct1"),
    VmRec(id="lab/n1", cluster="lab"),
    VmRec(id="lost/n1", cluster="lost"),
    MigrationRec(id="m-run", vm="lab/n1", phase="migrating", started_at=NOW_MS - 1000),
    MigrationRec(id="m-done", vm="lab/n1", phase="done", started_at=NOW_MS - 1000),
    MigrationRec(id="m-failed", vm="lab/n1", phase="failed", started_at=NOW_MS - 1000),
    MigrationRec(id="m-stale", vm="lab/n1", phase="migrating", started_at=NOW_MS - STALE_MS),
)


@pytest.mark.parametrize(
    "holder, granted_ago, orphaned",
    [
        (("vm", "lab/n1", "ct1"), GRACE_MS, False),
        (("vm", "lab/n1", "ct0"), GRACE_MS, True),  # the cluster was made anew
        (("vm", "lab/n9", "ct1"), GRACE_MS, True),  # no such VM
        (("vm", "lost/n1", "ct1"), GRACE_MS, True),  # its cluster is gone
        (("vm", "lab/n9", "ct1"), GRACE_MS - 1, False),  # too young to judge
        (("vcluster", "lab", "ct1"), GRACE_MS, False),
        (("vcluster", "lab", "ct0"), GRACE_MS, True),
        (("vcluster", "nope", "ct1"), GRACE_MS, True),
        (("migration", "lab/n1", "m-run"), GRACE_MS, False),
        (("migration", "lab/n1", "m-done"), GRACE_MS, True),
        (("migration", "lab/n1", "m-failed"), GRACE_MS, True),
        (("migration", "lab/n1", "m-stale"), GRACE_MS, True),
        (("migration", "lab/n1", "m-none"), GRACE_MS, True),
        # A cold move's hand-over is kept as long as its migration is recorded, ended or not.
        (("handover", "fail", "m-failed"), GRACE_MS, False),
        (("handover", "restore", "m-stale"), GRACE_MS, False),
        (("handover", "restore", "m-none"), GRACE_MS, True),
        (("handover", "restore", "m-none"), GRACE_MS - 1, False),
        (("capacity", "host1", ""), GRACE_MS * 10, False),  # not a kind this looks at
    ],
)
def test_lease_orphaned(holder, granted_ago, orphaned):
    lease = LeaseRec(id="ip/lab/10.0.0.5", holder="-", granted_at=NOW_MS - granted_ago)
    assert lease_orphaned(lease, holder, LIVE, NOW_MS, GRACE_MS) is orphaned


# -- properties ------------------------------------------------------------------------------
DETAILS = ["", LEFT, ASKED60, "powered off at once (forced)", "found shutoff behind our back; restarted"]
vms = st.builds(
    vm,
    desired=st.sampled_from(["running", "stopped", "absent"]),
    force=st.sampled_from([None, True]),
    host=st.sampled_from([HOST, OTHER]),
    token=st.sampled_from(["t1", "t2"]),
)
prevs = st.none() | st.builds(
    was,
    state=st.sampled_from(["pending", "running", "shutoff", "paused", "stopping", "error", "missing"]),
    detail=st.sampled_from(DETAILS),
    restarts=st.integers(0, 5),
    host=st.sampled_from([HOST, OTHER]),
)
times = st.floats(0, 10_000, allow_nan=False)
stops = st.none() | st.builds(
    lambda token, timeout, at, last: Stopping(token, timeout, at + timeout, at + last),
    token=st.sampled_from(["t1", "t2"]),
    timeout=st.integers(1, 3600),
    at=times,
    last=st.floats(0, 100, allow_nan=False),
)
confs = st.builds(Settings, stop_timeout_s=st.integers(0, 3600), restart_stopped=st.booleans())
inputs = st.fixed_dictionaries(
    {
        "vm": vms,
        "cluster": st.sampled_from([CLUSTER, None]),
        "observed": st.sampled_from(sorted(DOMAIN_STATES)),
        "prev": prevs,
        "stopping": stops,
        "now": times,
        "settings": confs,
        "migrating": st.booleans(),
        "segment_error": st.sampled_from([None, SEG]),
        "asked_after_status": st.booleans(),
    }
)


def _decide(i: dict):
    return decide_vm(
        i["vm"],
        i["cluster"],
        i["observed"],
        i["prev"],
        i["stopping"],
        i["now"],
        i["settings"],
        host_id=HOST,
        migrating=i["migrating"],
        segment_error=i["segment_error"],
        asked_after_status=i["asked_after_status"],
    )


@settings(max_examples=500, deadline=None)
@given(i=inputs)
def test_the_decision_is_total_and_touches_only_what_it_may(i):
    action = _decide(i)
    rec, prev = i["vm"], i["prev"]
    assert isinstance(action, (Nothing, Keep, Start, LeaveOff, PowerOff, Remove, GuestStop, Fail))
    if rec.host != HOST or i["migrating"]:
        assert action == Nothing()
        return
    assert not isinstance(action, Nothing)
    # Start only what should run; stop only what should not; remove only what should go.
    if isinstance(action, Start):
        assert rec.desired == "running" and i["observed"] != "running"
    if isinstance(action, PowerOff):
        assert rec.desired == "stopped" and i["observed"] in ("running", "paused")
    if isinstance(action, GuestStop):
        assert rec.desired in ("stopped", "absent") and i["observed"] == "running"
        assert isinstance(action.off, Remove if rec.desired == "absent" else LeaveOff)
    if isinstance(action, Remove):
        assert rec.desired == "absent"
        assert bool(action.power_off) == (i["observed"] in ("running", "paused"))
    if rec.desired == "absent":
        assert isinstance(action, (Remove, GuestStop))
    if isinstance(action, GuestStop):
        if action.fresh:
            timeout = i["settings"].stop_timeout_s
            assert action.ask and action.stop == Stopping(rec.token, timeout, i["now"] + timeout, i["now"])
        assert after_look(action, "shutoff") == action.off
    # Restarts: kept, or one more for a restart of a VM stopped behind our back.
    if action.status is not None:
        before = prev.restarts if prev else 0
        if isinstance(action, (Start, Fail)) and action.status.restarts == before + 1:
            assert i["settings"].restart_stopped and prev is not None and prev.host == HOST
        else:
            assert action.status.restarts == before


@settings(max_examples=300, deadline=None)
@given(i=inputs, later=st.floats(0, 10_000, allow_nan=False))
def test_a_stop_powers_off_from_its_deadline_on_and_never_before(i, later):
    """For one stop under way, what is decided depends on the time only through its deadline
    and the retry period: powered off from the deadline on (whatever comes later), never
    before; asked again only once the retry period has passed."""
    rec = i["vm"]
    stop = i["stopping"]
    if rec.host != HOST or i["migrating"] or rec.force or rec.desired == "running" or stop is None:
        return
    if i["observed"] != "running" or i["settings"].stop_timeout_s == 0 or stop.token != rec.token:
        return
    early, late = _decide(i), _decide({**i, "now": i["now"] + later})
    off = (PowerOff, Remove)
    assert isinstance(early, off) == (i["now"] >= stop.deadline)
    if isinstance(early, off):
        assert isinstance(late, off)
    if isinstance(early, GuestStop):
        assert early.stop.deadline == stop.deadline and not early.fresh
        assert early.ask == (i["now"] - stop.asked_at >= i["settings"].stop_retry_s)
