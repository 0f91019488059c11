"""The migration phase machine (vmwebd/migrate/phases.py), without daemons, libvirt or a clock.

A table gives, for every phase, every role a host may have (source, destination, bystander) and
every failure (none, the other host dead, a driver error, a timeout passed, the VM missing, this
host restarted), the action :func:`decide` must answer; a hypothesis model then runs the machine
on three hosts through random faults and checks where the VM ends up.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwebd.dom.records import MigrationRec, VmRec
from vmwebd.migrate import phases
from vmwebd.migrate.phases import (
    ACTING,
    Abort,
    CleanUp,
    Finish,
    FinishForSource,
    Limits,
    MigrateMemory,
    Moved,
    Nothing,
    Observations,
    Phase,
    PrepareDest,
    RestoreDest,
    Role,
    SaveMemory,
    Trigger,
    Wait,
    decide,
)
from vmwebd.migrate.state import STALE_MS

SRC, DST, OTHER = "host1", "host2", "host3"
ROLE_HOST = {"source": SRC, "dest": DST, "bystander": OTHER}
VM = "lab/n1"
T0 = 1_000_000_000
URI = "qemu+tls://host2/system"


def mig(phase: str, mode: str = "live", **kw) -> MigrationRec:
    return MigrationRec(id="m1", vm=VM, source=SRC, dest=DST, phase=phase, mode=mode, started_at=T0, **kw)


def vmrec(host: str = SRC, desired: str = "running") -> VmRec:
    return VmRec(id=VM, cluster="lab", name="n1", host=host, desired=desired, token="t1")


#: The phases as the table names them: a cold move's memory was saved (10 bytes of overlay,
#: 20 of memory), so the destination pulls both; its failure leaves a state to restore.
CASES = {
    "prepare": mig("prepare"),
    "ready/live": mig("ready"),
    "ready/cold": mig("ready", mode="cold"),
    "migrating": mig("migrating", disk_bytes=10),
    "saved": mig("saved", mode="cold", disk_bytes=10, bytes=30),
    "restored": mig("restored", mode="cold", disk_bytes=10, bytes=30),
    "done": mig("done"),
    "failed": mig("failed", mode="cold", disk_bytes=10, bytes=30),
}
FAILURES = ("none", "peer_dead", "driver_error", "timeout", "vm_missing", "restart")


def run(case: str, role: str, failure: str):
    """What the host of ``role`` does about ``case`` under ``failure``."""
    m, host, vm = CASES[case], ROLE_HOST[role], vmrec()
    # In "done" the VM's new host was recorded with it.
    if m.phase == "done":
        vm = vmrec(DST)
    now = T0 + 5_000
    obs = Observations(dest_migrate_uri=URI, volumes_on_disk=True)
    if failure == "peer_dead":
        # The sweep, the other host out of the live set for 61 s (grace: 60 s).
        now = T0 + 100_000
        obs = dataclasses.replace(obs, trigger=Trigger.SWEEP, peer_down_since=now - 61_000)
    elif failure == "timeout":
        # The sweep, 181 s after the request (prepare timeout: 180 s), the other host alive.
        now = T0 + 181_000
        obs = dataclasses.replace(obs, trigger=Trigger.SWEEP)
    elif failure == "vm_missing":
        vm = None
    elif failure == "restart":
        obs = dataclasses.replace(obs, trigger=Trigger.RESTARTED)
    action = decide(m, vm, host, now, obs)
    if failure == "driver_error" and isinstance(action, (*ACTING, CleanUp)):
        # The action's libvirt call failed; the entity is as it was.
        action = phases.after_error(m, m, host, "libvirt: boom")
    return action


GONE = "VM 'lab/n1' is gone"
# phase        role       failure       expected action
TABLE = """
prepare      source     none          Wait("destination")
prepare      source     peer_dead     Abort("prepare", "host host2 has not been alive for 61 s")
prepare      source     driver_error  Wait("destination")
prepare      source     timeout       Abort("prepare", "host host2 did not prepare within 180 s")
prepare      source     vm_missing    Wait("destination")
prepare      source     restart       Wait("destination")
prepare      dest       none          PrepareDest(check_balancer=False)
prepare      dest       peer_dead     Wait()
prepare      dest       driver_error  Abort("prepare", "on host host2: libvirt: boom")
prepare      dest       timeout       Wait()
prepare      dest       vm_missing    Abort("prepare", "on host host2: " + GONE)
prepare      dest       restart       PrepareDest(check_balancer=False)
prepare      bystander  none          Nothing()
prepare      bystander  peer_dead     Nothing()
prepare      bystander  driver_error  Nothing()
prepare      bystander  timeout       Nothing()
prepare      bystander  vm_missing    Nothing()
prepare      bystander  restart       Nothing()
ready/live   source     none          MigrateMemory(uri=URI)
ready/live   source     peer_dead     Wait()
ready/live   source     driver_error  Abort("ready", "on host host1: libvirt: boom")
ready/live   source     timeout       Wait()
ready/live   source     vm_missing    Abort("ready", "on host host1: " + GONE)
ready/live   source     restart       MigrateMemory(uri=URI)
ready/live   dest       none          Wait("source")
ready/live   dest       peer_dead     Wait()
ready/live   dest       driver_error  Wait("source")
ready/live   dest       timeout       Wait()
ready/live   dest       vm_missing    Wait("source")
ready/live   dest       restart       Wait("source")
ready/live   bystander  none          Nothing()
ready/live   bystander  peer_dead     Nothing()
ready/live   bystander  driver_error  Nothing()
ready/live   bystander  timeout       Nothing()
ready/live   bystander  vm_missing    Nothing()
ready/live   bystander  restart       Nothing()
ready/cold   source     none          SaveMemory(measure_overlay=True)
ready/cold   source     peer_dead     Wait()
ready/cold   source     driver_error  Abort("ready", "on host host1: libvirt: boom")
ready/cold   source     timeout       Wait()
ready/cold   source     vm_missing    Abort("ready", "on host host1: " + GONE)
ready/cold   source     restart       SaveMemory(measure_overlay=True)
ready/cold   dest       none          Wait("source")
ready/cold   dest       peer_dead     Wait()
ready/cold   dest       driver_error  Wait("source")
ready/cold   dest       timeout       Wait()
ready/cold   dest       vm_missing    Wait("source")
ready/cold   dest       restart       Wait("source")
ready/cold   bystander  none          Nothing()
ready/cold   bystander  peer_dead     Nothing()
ready/cold   bystander  driver_error  Nothing()
ready/cold   bystander  timeout       Nothing()
ready/cold   bystander  vm_missing    Nothing()
ready/cold   bystander  restart       Nothing()
migrating    source     none          Wait("libvirt")
migrating    source     peer_dead     Wait()
migrating    source     driver_error  Wait("libvirt")
migrating    source     timeout       Wait()
migrating    source     vm_missing    Wait("libvirt")
migrating    source     restart       Abort("migrating", "host host1 restarted during phase 'migrating'")
migrating    dest       none          Wait("source")
migrating    dest       peer_dead     Wait()
migrating    dest       driver_error  Wait("source")
migrating    dest       timeout       Wait()
migrating    dest       vm_missing    Wait("source")
migrating    dest       restart       Wait("source")
migrating    bystander  none          Nothing()
migrating    bystander  peer_dead     Nothing()
migrating    bystander  driver_error  Nothing()
migrating    bystander  timeout       Nothing()
migrating    bystander  vm_missing    Nothing()
migrating    bystander  restart       Nothing()
saved        source     none          Wait("destination")
saved        source     peer_dead     Abort("saved", "host host2 has not been alive for 61 s")
saved        source     driver_error  Wait("destination")
saved        source     timeout       Wait("destination")
saved        source     vm_missing    Wait("destination")
saved        source     restart       Abort("saved", "host host1 restarted during phase 'saved'")
saved        dest       none          RestoreDest(fetch_disk=True, fetch_state=True)
saved        dest       peer_dead     Wait()
saved        dest       driver_error  Abort("saved", "on host host2: libvirt: boom")
saved        dest       timeout       Wait()
saved        dest       vm_missing    Abort("saved", "on host host2: " + GONE)
saved        dest       restart       RestoreDest(fetch_disk=True, fetch_state=True)
saved        bystander  none          Nothing()
saved        bystander  peer_dead     Nothing()
saved        bystander  driver_error  Nothing()
saved        bystander  timeout       Nothing()
saved        bystander  vm_missing    Nothing()
saved        bystander  restart       Nothing()
restored     source     none          Finish()
restored     source     peer_dead     Wait()
restored     source     driver_error  Abort("restored", "on host host1: libvirt: boom")
restored     source     timeout       Wait()
restored     source     vm_missing    Abort("restored", "on host host1: " + GONE)
restored     source     restart       Finish()
restored     dest       none          Wait("source")
restored     dest       peer_dead     FinishForSource()
restored     dest       driver_error  Wait("source")
restored     dest       timeout       Wait("source")
restored     dest       vm_missing    Wait("source")
restored     dest       restart       Wait("source")
restored     bystander  none          Nothing()
restored     bystander  peer_dead     Nothing()
restored     bystander  driver_error  Nothing()
restored     bystander  timeout       Nothing()
restored     bystander  vm_missing    Nothing()
restored     bystander  restart       Nothing()
done         source     none          Nothing()
done         source     peer_dead     Nothing()
done         source     driver_error  Nothing()
done         source     timeout       Nothing()
done         source     vm_missing    Nothing()
done         source     restart       Nothing()
done         dest       none          Nothing()
done         dest       peer_dead     Nothing()
done         dest       driver_error  Nothing()
done         dest       timeout       Nothing()
done         dest       vm_missing    Nothing()
done         dest       restart       Nothing()
done         bystander  none          Nothing()
done         bystander  peer_dead     Nothing()
done         bystander  driver_error  Nothing()
done         bystander  timeout       Nothing()
done         bystander  vm_missing    Nothing()
done         bystander  restart       Nothing()
failed       source     none          CleanUp(source_side=True, restore_saved=True)
failed       source     peer_dead     Nothing()
failed       source     driver_error  Nothing()
failed       source     timeout       Nothing()
failed       source     vm_missing    CleanUp(source_side=True, restore_saved=False)
failed       source     restart       Nothing()
failed       dest       none          CleanUp(remove_dest_copy=True)
failed       dest       peer_dead     Nothing()
failed       dest       driver_error  Nothing()
failed       dest       timeout       Nothing()
failed       dest       vm_missing    CleanUp(remove_dest_copy=True)
failed       dest       restart       Nothing()
failed       bystander  none          Nothing()
failed       bystander  peer_dead     Nothing()
failed       bystander  driver_error  Nothing()
failed       bystander  timeout       Nothing()
failed       bystander  vm_missing    Nothing()
failed       bystander  restart       Nothing()
"""
_NAMES = {
    c.__name__: c
    for c in (
        Abort,
        CleanUp,
        Finish,
        FinishForSource,
        MigrateMemory,
        Nothing,
        PrepareDest,
        RestoreDest,
        SaveMemory,
        Wait,
    )
}
_NAMES.update(URI=URI, GONE=GONE)


def _rows():
    rows = []
    for line in TABLE.strip().splitlines():
        case, role, failure, expected = re.match(r"(\S+)\s+(\S+)\s+(\S+)\s+(.+)$", line).groups()
        rows.append((case, role, failure, eval(expected, dict(_NAMES))))
    return rows


ROWS = _rows()


def test_the_table_covers_every_phase_role_and_failure_once():
    """Every phase (live and cold ``ready``), role and failure has exactly one row."""
    keys = [(c, r, f) for c, r, f, _ in ROWS]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(c, r, f) for c in CASES for r in ROLE_HOST for f in FAILURES}
    assert {p.value for p in Phase} == {c.split("/")[0] for c in CASES}


@pytest.mark.parametrize("case,role,failure,expected", ROWS, ids=[f"{c}-{r}-{f}" for c, r, f, _ in ROWS])
def test_decision_table(case, role, failure, expected):
    """The host of each role answers each phase under each failure as the table says."""
    assert run(case, role, failure) == expected


def test_the_docs_draw_and_tabulate_the_phases_of_the_enum():
    """docs/migration.md's phase diagram boxes, and its who-does-what table lists, exactly the
    phases of the enum."""
    doc = (Path(__file__).parent.parent / "docs" / "migration.md").read_text()
    section = doc[doc.index("## The phase machine") :]
    diagram = section[section.index("```") : section.index("```", section.index("```") + 3)]
    boxed = set(re.findall(r"\| +([a-z]+) +\|", diagram))
    rows = set(re.findall(r"^\| `([a-z]+)` \|", section, re.M))
    assert boxed == rows == {p.value for p in Phase}


# -- rules beside the table ----------------------------------------------------------------
def test_a_destination_down_within_its_grace_is_waited_for_and_the_grace_is_a_limit():
    """Down for 59 s is waited on; the grace and the prepare timeout come from Limits."""
    m = mig("prepare")
    now = T0 + 100_000
    sweep = Observations(trigger=Trigger.SWEEP, peer_down_since=now - 59_000)
    assert decide(m, vmrec(), SRC, now, sweep) == Wait("destination (not alive)")
    short = Limits(host_down_grace_s=30.0, prepare_timeout_s=10.0)
    assert decide(m, vmrec(), SRC, now, sweep, short) == Abort(
        "prepare", "host host2 has not been alive for 59 s"
    )
    assert decide(m, vmrec(), SRC, T0 + 11_000, Observations(trigger=Trigger.SWEEP), short) == Abort(
        "prepare", "host host2 did not prepare within 10 s"
    )
    assert decide(m, vmrec(), SRC, T0 + 10_000, Observations(trigger=Trigger.SWEEP), short) == Wait(
        "destination"
    )


@pytest.mark.parametrize("trigger", list(Trigger))
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("done", "failed")])
@pytest.mark.parametrize("role", list(ROLE_HOST))
def test_an_abandoned_migration_is_left_alone_by_everyone(trigger, case, role):
    """Unfinished after STALE_MS (its hosts crashed): nobody acts, waits or times it out."""
    obs = Observations(trigger=trigger, peer_down_since=T0, dest_migrate_uri=URI)
    assert decide(CASES[case], vmrec(), ROLE_HOST[role], T0 + STALE_MS, obs) == Nothing()
    assert (
        decide(CASES[case], vmrec(), ROLE_HOST[role], T0 + STALE_MS - 1, obs) != Nothing()
        or role == "bystander"
    )


def test_a_saved_move_its_destination_holds_is_neither_timed_out_by_its_source_nor_abandoned():
    """The destination took the hand-over of a saved cold move: its source cannot fail the move
    (the lease is the destination's), so its sweep neither watches the destination nor aborts,
    however long that host is down, and the move is never abandoned: the destination restores it
    whenever it acts again, and the source then finishes it."""
    m = CASES["saved"]
    held = Observations(trigger=Trigger.SWEEP, peer_down_since=T0, held_by_dest=True)
    for now in (T0 + 100_000, T0 + STALE_MS, T0 + 10 * STALE_MS):
        assert phases.watched_peer(m, SRC, now, held_by_dest=True) is None
        assert decide(m, vmrec(), SRC, now, held) == Wait("destination (it holds the saved VM)")
        assert not phases.abandoned(m, now, held_by_dest=True)
        assert decide(
            m, vmrec(), DST, now, Observations(held_by_dest=True, volumes_on_disk=True)
        ) == RestoreDest(fetch_disk=True, fetch_state=True)
        assert decide(CASES["restored"], vmrec(), SRC, now, Observations(held_by_dest=True)) == Finish()
    # Not held (the table's rows): watched, aborted after the grace, abandoned after STALE_MS.
    assert phases.watched_peer(m, SRC, T0 + 100_000) == DST
    assert decide(m, vmrec(), SRC, T0 + STALE_MS, Observations(trigger=Trigger.SWEEP)) == Nothing()


def test_what_a_move_waits_on_is_said_by_phase_and_hold():
    """People are told which host a move waits on and for what; nothing once it ended or was
    abandoned (a held saved move never is)."""
    now = T0 + 5_000
    said = {case: phases.awaited(m, now) for case, m in CASES.items()}
    assert said == {
        "prepare": (DST, "to prepare (base image, network, an empty overlay)"),
        "ready/live": (SRC, "to move the memory"),
        "ready/cold": (SRC, "to save the VM"),
        "migrating": (SRC, "(its libvirt) to finish the live move"),
        "saved": (DST, "to take the saved VM"),
        "restored": (SRC, "to record the end (the VM runs at the destination)"),
        "done": None,
        "failed": None,
    }
    saved = CASES["saved"]
    assert phases.awaited(saved, now, held_by_dest=True) == (DST, "to restore the saved VM, which it holds")
    assert phases.awaited(saved, T0 + STALE_MS) is None
    assert phases.awaited(saved, T0 + STALE_MS, held_by_dest=True) is not None


def test_a_failed_migration_is_cleaned_up_however_old():
    """``failed`` is terminal, not abandoned: its cleanup happens whenever the change arrives."""
    assert decide(CASES["failed"], vmrec(), DST, T0 + 10 * STALE_MS) == CleanUp(remove_dest_copy=True)


def test_actions_carry_what_the_driver_and_the_entity_say():
    """Capabilities and the entity's counters shape the actions: overlay files, pulled files,
    the balancer's consent, a live move without a destination URI, a VM being removed."""
    files = Observations(volumes_on_disk=True, dest_migrate_uri=URI)
    memory = Observations(volumes_on_disk=False)
    assert decide(mig("ready", mode="cold"), vmrec(), SRC, T0, memory) == SaveMemory(False)
    assert decide(mig("saved", mode="cold", disk_bytes=5, bytes=5), vmrec(), DST, T0, files) == RestoreDest(
        fetch_disk=True, fetch_state=False
    )
    assert decide(mig("saved", mode="cold", disk_bytes=5, bytes=9), vmrec(), DST, T0, memory) == RestoreDest(
        fetch_disk=False, fetch_state=True
    )
    assert decide(mig("saved", mode="cold"), vmrec(), DST, T0, files) == RestoreDest(False, False)
    assert decide(mig("prepare", requested_by="balancer"), vmrec(), DST, T0) == PrepareDest(True)
    assert decide(mig("ready"), vmrec(), SRC, T0, memory) == Abort(
        "ready", "on host host1: host 'host2' publishes no migration URI"
    )
    assert decide(mig("prepare"), vmrec(desired="absent"), DST, T0) == Abort(
        "prepare", "on host host2: " + GONE
    )
    assert decide(mig("sideways"), vmrec(), DST, T0) == Nothing()  # a phase unknown here


def test_cleanup_leaves_a_copy_the_vm_now_runs_on():
    """A destination the VM's record already names keeps its domain; a source the VM left does
    not restore its saved state."""
    assert decide(CASES["failed"], vmrec(DST), DST, T0) == Nothing()
    assert decide(CASES["failed"], vmrec(DST), SRC, T0) == CleanUp(source_side=True)


def test_a_failure_never_overrides_a_move_that_ended():
    """``failed`` is not written once the VM's new host is recorded or the entity ended; an
    executor's error after the end (removing the source's copy) fails nothing."""
    m = mig("ready")
    assert phases.may_fail(m, m, vmrec())
    assert phases.may_fail(m, None, vmrec())
    assert not phases.may_fail(m, m, vmrec(DST))
    assert not phases.may_fail(m, mig("done"), vmrec())
    assert not phases.may_fail(m, mig("failed"), vmrec())
    assert phases.after_error(m, mig("done"), SRC, "x") == Nothing()
    assert phases.after_error(m, None, SRC, "x") == Nothing()
    assert phases.after_error(m, mig("migrating"), SRC, "x") == Abort("ready", "on host host1: x")
    assert Abort("ready", "x").error == "phase ready: x"


def test_the_machine_agrees_with_what_every_host_reads_about_migrations():
    """migrate/state.py's terminal phases and abandonment (read by the reconciler and the
    views) are the machine's."""
    from vmwebd.migrate import state

    assert set(state.TERMINAL) == phases.TERMINAL
    assert phases.DEFAULT_LIMITS.stale_ms == state.STALE_MS


def test_small_rules():
    """Who is watched, live or cold, who serves a cold move's files, when a live move starts."""
    assert phases.watched_peer(mig("prepare"), SRC, T0) == DST
    assert phases.watched_peer(mig("saved"), SRC, T0) == DST
    assert phases.watched_peer(mig("ready"), SRC, T0) is None
    assert phases.watched_peer(mig("prepare"), DST, T0) is None
    assert phases.watched_peer(mig("prepare"), SRC, T0 + STALE_MS) is None
    assert phases.choose_mode(True, "a", "b") == "live"
    assert phases.choose_mode(False, "a", "b") == "cold"
    assert phases.choose_mode(True, "", "b") == phases.choose_mode(True, "a", "") == "cold"
    assert phases.serves_file(mig("saved"), SRC, DST)
    assert not phases.serves_file(mig("saved"), SRC, OTHER)
    assert not phases.serves_file(mig("restored"), SRC, DST)
    assert not phases.serves_file(mig("saved"), DST, SRC)
    assert not phases.serves_file(None, SRC, DST)
    assert phases.still_ready(mig("ready"))
    assert not phases.still_ready(mig("failed")) and not phases.still_ready(None)
    assert phases.role_of(mig("ready"), OTHER) is Role.BYSTANDER
    assert str(Phase.SAVED) == "saved"


# -- a model of three hosts --------------------------------------------------------------------
#: The edges of the diagram in docs/migration.md (a phase may also be written again unchanged).
EDGES = {
    ("prepare", "ready"),
    ("ready", "migrating"),
    ("migrating", "done"),
    ("ready", "saved"),
    ("saved", "restored"),
    ("restored", "done"),
} | {(p.value, "failed") for p in Phase if p not in phases.TERMINAL}
HOSTS = (SRC, DST, OTHER)


class World:
    """One migration of one VM between host1 and host2 (host3 looks on), with one shared DOM
    (every host reads the latest entity when it acts, in any order), each host's hypervisor (who
    runs the VM), the source's saved memory file, libvirt's live job, and faults: crashes (the
    host's guests die with it), freezes (cut off; guests keep running), driver errors, time."""

    def __init__(self, mode: str):
        self.m = mig("prepare", mode=mode)
        self.vm = vmrec()
        self.now = T0
        self.crashed: set[str] = set()
        self.frozen: set[str] = set()
        self.running = {SRC}
        self.saved_state = False
        self.job = False
        self.down_since = {h: {} for h in HOSTS}
        self.history = ["prepare"]
        self.recovering = False
        # The source's daemon alone died (libvirtd and its job go on); libvirt finished the
        # move meanwhile and undefined the source's domain; the restarted source looks again.
        self.daemon_down = False
        self.job_orphaned = False  # its caller (the daemon's executor) died
        self.moved_by_libvirt = False
        self.looking_again = False
        self.destroyed_arrived = False

    # -- the DOM --
    def up(self, h):
        return h not in self.crashed and h not in self.frozen and not (h == SRC and self.daemon_down)

    def write(self, **kw):
        self.m = dataclasses.replace(self.m, **kw)
        self.history.append(self.m.phase)

    def obs(self, trigger=Trigger.CHANGED, since=None):
        return Observations(
            trigger=trigger, peer_down_since=since, dest_migrate_uri=URI, volumes_on_disk=True
        )

    def fail(self, a: Abort):
        if phases.may_fail(self.m, self.m, self.vm):
            self.write(phase="failed", error=a.error)

    # -- a host acting --
    def act(self, h, action, error=False):
        """Carries out ``action`` at ``h`` as the manager would (its libvirt call failing if
        ``error``)."""
        if isinstance(action, Abort):
            return self.fail(action)
        then = self.m
        try:
            self._effect(h, action, error)
        except RuntimeError as e:
            after = phases.after_error(then, self.m, h, str(e))
            if isinstance(after, Abort):
                self.fail(after)

    def _effect(self, h, a, error):
        if isinstance(a, PrepareDest):
            if error:
                raise RuntimeError("no room")
            self.write(phase="ready")
        elif isinstance(a, MigrateMemory):
            self.write(phase="migrating")
            if error or SRC not in self.running or DST in self.crashed:
                raise RuntimeError("migration failed")  # the VM stays where it ran
            self.job = True
        elif isinstance(a, SaveMemory):
            if error:
                raise RuntimeError("save failed")  # the VM keeps running
            if SRC in self.running:
                self.running.discard(SRC)
                self.saved_state = True
            self.write(phase="saved")
        elif isinstance(a, RestoreDest):
            if error or not self.up(SRC):  # the files come from the source
                raise RuntimeError("restore failed")
            if self.saved_state:
                self.running.add(DST)
            self.write(phase="restored")
        elif isinstance(a, Finish):
            self.vm = dataclasses.replace(self.vm, host=DST) if self.vm else None
            self.write(phase="done")
            self.saved_state = False
            if error:
                raise RuntimeError("undefine failed")  # after the end: fails nothing
        elif isinstance(a, CleanUp):
            if a.remove_dest_copy:
                if DST in self.running and self.moved_by_libvirt and not phases.vm_gone(self.vm):
                    # The guest libvirt moved, and its disk (of a VM being deleted, it goes anyway).
                    self.destroyed_arrived = True
                self.running.discard(DST)
            if a.source_side:
                if self.saved_state and a.restore_saved and not error:
                    self.running.add(SRC)
                self.saved_state = False

    # -- events --
    def kick(self, h, error=False):
        if self.up(h):
            self.act(h, decide(self.m, self.vm, h, self.now, self.obs()), error)

    def sweep(self, h):
        if not self.up(h):
            return
        mem = self.down_since[h]
        for other in [o for o in mem if self.up(o)]:
            del mem[other]
        peer = phases.watched_peer(self.m, h, self.now)
        if peer is None:
            return
        since = mem.setdefault(peer, self.now) if not self.up(peer) else None
        a = decide(self.m, self.vm, h, self.now, self.obs(Trigger.SWEEP, since))
        if isinstance(a, Abort):
            self.fail(a)
        elif isinstance(a, FinishForSource):
            self.vm = dataclasses.replace(self.vm, host=DST) if self.vm else None
            self.write(phase="done")

    def crash(self, h):
        if h in self.crashed:
            return
        self.crashed.add(h)
        self.frozen.discard(h)
        self.running.discard(h)
        self.down_since[h] = {}
        if h == SRC:
            self.job = False  # libvirt's job dies with its host (the VM did too)
            self.job_orphaned = self.daemon_down = False

    def restart(self, h):
        if h not in self.crashed:
            return
        self.crashed.discard(h)
        self.take_up(h)

    def take_up(self, h):
        """A restarted host takes the move up as the manager does (asking libvirt, at the source
        of a live move, what became of its job)."""
        obs = self.obs(Trigger.RESTARTED)
        if h == SRC and self.m.phase == "migrating":
            if self.job:
                domain = phases.DOMAIN_MIGRATING
            elif self.moved_by_libvirt:
                domain = phases.DOMAIN_GONE
            else:
                domain = phases.DOMAIN_HERE
            obs = dataclasses.replace(obs, source_domain=domain)
        a = decide(self.m, self.vm, h, self.now, obs)
        if h == SRC:
            self.looking_again = a == Wait("libvirt")
        if isinstance(a, Abort):
            self.fail(a)
        elif isinstance(a, Moved):
            self.vm = dataclasses.replace(self.vm, host=DST) if self.vm else None
            self.write(phase="done")
        elif not isinstance(a, Nothing):
            self.kick(h)

    def daemon_stop(self):
        """The source's daemon dies alone (kill -9): libvirtd, its job and the guest go on."""
        if SRC not in self.crashed:
            self.daemon_down = True
            self.job_orphaned = self.job_orphaned or self.job

    def daemon_start(self):
        if self.daemon_down and SRC not in self.crashed:
            self.daemon_down = False
            self.take_up(SRC)

    def job_ends(self, ok=True):
        """libvirt's live job at the source ends (the source's daemon records it, if it runs);
        it cannot succeed towards a crashed destination."""
        if not self.job or SRC in self.crashed or SRC in self.frozen:
            return
        self.job = False
        if self.job_orphaned:
            # Nobody records it: libvirt moved the guest (undefining the source's domain), or
            # left it running at the source.
            self.job_orphaned = False
            if ok and DST not in self.crashed:
                self.running.discard(SRC)
                self.running.add(DST)
                self.moved_by_libvirt = True
            return
        if ok and DST not in self.crashed:
            self.running.discard(SRC)
            self.running.add(DST)
            self.vm = dataclasses.replace(self.vm, host=DST) if self.vm else None
            self.write(phase="done")
        else:
            # Nothing moved; the executor that started the job fails the move.
            after = phases.after_error(dataclasses.replace(self.m, phase="ready"), self.m, SRC, "job failed")
            if isinstance(after, Abort):
                self.fail(after)

    def reconcile(self, h):
        """The host's reconciler: leaves the VM alone while its move is in flight, else boots
        it where the DOM puts it and removes it elsewhere."""
        if not self.up(h):
            return
        m = self.m
        if m.phase not in phases.TERMINAL and not phases.abandoned(m, self.now):
            return
        if self.vm is not None and self.vm.host == h:
            self.running.add(h)
        else:
            self.running.discard(h)

    def step(self, event):
        kind, h = event
        if kind == "kick":
            self.kick(h)
        elif kind == "error":
            self.kick(h, error=True)
        elif kind == "sweep":
            self.sweep(h)
        elif kind == "crash":
            self.crash(h)
        elif kind == "restart":
            self.restart(h)
        elif kind == "daemon_stop":
            self.daemon_stop()
        elif kind == "daemon_start":
            self.daemon_start()
        elif kind == "freeze":
            if h not in self.crashed:
                self.frozen.add(h)
        elif kind == "thaw":
            self.frozen.discard(h)
        elif kind == "job_done":
            self.job_ends(ok=True)
        elif kind == "job_error":
            self.job_ends(ok=False)
        elif kind == "reconcile":
            self.reconcile(h)
        elif kind == "delete_vm":
            self.vm = None
        elif kind == "tick":
            # Random faults end long before a move is abandoned (that path is in the table);
            # the recovery's 12 minutes at most keep it so.
            if self.now + h * 1000 - T0 < STALE_MS // 2 or self.recovering:
                self.now += h * 1000
        self.check()

    def check(self):
        assert len(self.running) <= 1, f"VM runs on {sorted(self.running)}: {self.history}"
        assert not self.destroyed_arrived, f"the guest libvirt moved was removed: {self.history}"
        for a, b in zip(self.history, self.history[1:]):
            assert a == b or (a, b) in EDGES, f"{a} -> {b} is no edge: {self.history}"
        if self.m.phase == "failed" and self.vm is not None:
            assert self.vm.host == SRC, f"failed with the VM on {self.vm.host}: {self.history}"
        if self.m.phase == "done" and self.vm is not None:
            assert self.vm.host == DST

    def recover(self, rounds=12, dead=()):
        """Faults stop: every host but ``dead`` comes back and hears of every change; the
        sweep runs, and time passes."""
        self.recovering = True
        for h in HOSTS:
            if h in dead:
                self.step(("crash", h))
            else:
                self.step(("thaw", h))
                self.step(("restart", h))
        self.step(("daemon_start", None))
        for _ in range(rounds):
            for h in HOSTS:
                self.step(("kick", h))
                self.step(("sweep", h))
            self.step(("job_done", SRC))
            if self.looking_again:
                self.take_up(SRC)  # the source looks at libvirt's job again (JOB_RECHECK_S)
            for h in HOSTS:
                self.step(("reconcile", h))
            self.step(("tick", 61))


def _weighted(kinds, targets):
    return [(k, t) for k, n in kinds for t in targets for _ in range(n)]


#: Events, repeated for weight: deliveries most often, faults less, the VM's deletion rarely.
EVENTS = (
    _weighted(
        [
            ("kick", 6),
            ("sweep", 2),
            ("error", 1),
            ("crash", 2),
            ("restart", 2),
            ("freeze", 1),
            ("thaw", 1),
            ("reconcile", 1),
        ],
        [SRC, DST],
    )
    + _weighted([("kick", 1), ("crash", 1)], [OTHER])
    + _weighted([("job_done", 2), ("job_error", 1), ("delete_vm", 1)], [None])
    + _weighted([("daemon_stop", 1), ("daemon_start", 1)], [None])
    + _weighted([("tick", 2)], [1, 20, 61, 181])
)
events = st.sampled_from(EVENTS)


@pytest.mark.property
@settings(max_examples=1500, deadline=None)
@given(mode=st.sampled_from(["live", "cold"]), script=st.lists(events, max_size=40))
def test_random_faults_end_in_done_or_failed_with_the_vm_running_once(mode, script):
    """Under any sequence of crashes, freezes, driver errors, lost and repeated deliveries and
    time, the VM never runs on two hosts and a failed move leaves it on its source; once the
    faults stop the move ends (done: the VM runs at the destination; failed, to be retried: it
    runs at its source), unless the VM was deleted (then it runs nowhere)."""
    w = World(mode)
    for event in script:
        w.step(event)
    w.recover()
    assert w.m.phase in ("done", "failed"), w.history
    if w.vm is None:
        assert w.running == set()
    else:
        home = DST if w.m.phase == "done" else SRC
        assert w.vm.host == home and w.running == {home}, (w.history, w.running)


@settings(max_examples=600, deadline=None)
@given(mode=st.sampled_from(["live", "cold"]), script=st.lists(events, max_size=30))
def test_a_destination_that_never_comes_back_is_given_up_by_its_source(mode, script):
    """After any faults, a destination that stays dead does not hold the move forever: its
    source ends it (failed, the VM running there again) unless it had finished."""
    w = World(mode)
    for event in script:
        w.step(event)
    w.recover(dead=(DST,))
    assert w.m.phase in ("done", "failed"), w.history
    if w.m.phase == "failed" and w.vm is not None:
        assert w.running == {SRC}, (w.history, w.running)


@settings(max_examples=600, deadline=None)
@given(script=st.lists(events, max_size=30))
def test_a_source_that_never_comes_back_after_a_restore_leaves_the_vm_at_its_destination(script):
    """After any faults, a cold move whose destination restored the VM ends done although its
    source stays dead: the destination records the end, and the VM runs there alone."""
    w = World("cold")
    for event in script:
        w.step(event)
    w.recover(dead=(SRC,))
    if "restored" in w.history and w.vm is not None:
        assert w.m.phase == "done" and w.vm.host == DST, w.history
        assert w.running == {DST}, (w.history, w.running)


HAPPY = {
    "live": [("kick", DST), ("kick", SRC), ("job_done", None)],
    "cold": [("kick", DST), ("kick", SRC), ("kick", DST), ("kick", SRC)],
}
FAULTS = {
    "crash": [("crash", "H")],
    "freeze": [("freeze", "H"), ("tick", 61), ("sweep", SRC), ("tick", 61), ("sweep", SRC), ("thaw", "H")],
    "error": [("error", "H")],
    "vm deleted": [("delete_vm", None)],
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("host", [SRC, DST])
@pytest.mark.parametrize("mode,steps", [(mode, n) for mode in HAPPY for n in range(len(HAPPY[mode]) + 1)])
def test_a_fault_at_either_host_in_every_phase_ends_the_move(mode, steps, host, fault):
    """The move stopped after each step of its happy path by a crash (and restart), a freeze
    long enough to be called dead, a driver error, or the VM's deletion, at either host, still
    ends once the fault is over, with the VM running where the outcome says."""
    w = World(mode)
    for event in HAPPY[mode][:steps]:
        w.step(event)
    for kind, target in FAULTS[fault]:
        w.step((kind, host if target == "H" else target))
    w.recover()
    assert w.m.phase in ("done", "failed"), w.history
    home = DST if w.m.phase == "done" else SRC
    assert w.running == (set() if w.vm is None else {home}), (w.history, w.running)


#: The source's daemon killed while libvirt moves the VM live, and what libvirt's job does
#: without it: (events while the daemon is down, events after it started again, the end).
DAEMON_KILLED = {
    "job finishes while down": ([("job_done", None)], [], "done"),
    "job fails while down": ([("job_error", None)], [], "failed"),
    "job runs on, then finishes": ([], [("kick", DST), ("job_done", None)], "done"),
    "job runs on, then fails": ([], [("kick", DST), ("job_error", None)], "failed"),
}


@pytest.mark.parametrize("case", list(DAEMON_KILLED))
def test_a_source_daemon_killed_during_a_live_move_asks_libvirt_and_keeps_the_moved_guest(case):
    """libvirtd carries on a peer-to-peer move when the daemon that asked for it dies. The
    restarted source asks libvirt: domain gone, the move is recorded done (failing it would have
    the destination remove the guest that just arrived, with its disk); job still running, it
    looks again; domain here without a job, the move failed and the VM stays."""
    down, after, end = DAEMON_KILLED[case]
    w = World("live")
    w.step(("kick", DST))
    w.step(("kick", SRC))
    assert w.m.phase == "migrating" and w.job
    w.step(("daemon_stop", None))
    for event in down:
        w.step(event)
    w.step(("daemon_start", None))
    for event in after:
        w.step(event)
        if w.looking_again:
            w.take_up(SRC)
    assert w.m.phase == end, w.history
    home = DST if end == "done" else SRC
    w.recover()
    assert w.m.phase == end and w.vm.host == home and w.running == {home}, (w.history, w.running)


def test_a_restarted_source_asks_libvirt_about_a_live_move():
    """The answers libvirt can give a source restarted in ``migrating`` (or not give), and a VM
    that is being removed (nothing to record: the move fails)."""
    m = CASES["migrating"]

    def restarted(domain, gone=False):
        vm = None if gone else vmrec()
        return decide(m, vm, SRC, T0 + 5_000, Observations(trigger=Trigger.RESTARTED, source_domain=domain))

    assert restarted(phases.DOMAIN_GONE) == Moved()
    assert restarted(phases.DOMAIN_MIGRATING) == Wait("libvirt")
    failed = Abort("migrating", "host host1 restarted during phase 'migrating'")
    assert restarted(phases.DOMAIN_HERE) == failed
    # Asked but no answer (libvirtd busy, or the domain undefined between two calls as the move
    # ended): looked at again, never failed on that (the destination would remove the guest).
    assert restarted(phases.DOMAIN_UNKNOWN) == Wait("libvirt (no answer yet)")
    assert restarted("") == failed  # not asked (no live move to ask about)
    assert restarted(phases.DOMAIN_GONE, gone=True) == Abort(
        "migrating", "host host1 restarted during phase 'migrating'"
    )


def test_the_model_reaches_both_ends():
    """The model is not vacuous: a fault-free run ends done; a dead destination fails it."""
    w = World("cold")
    w.recover()
    assert w.m.phase == "done" and w.running == {DST}
    w = World("live")
    w.step(("crash", DST))
    w.step(("sweep", SRC))
    w.step(("tick", 61))
    w.step(("sweep", SRC))
    assert w.m.phase == "failed" and w.running == {SRC}
    assert w.m.error == "phase prepare: host host2 has not been alive for 61 s"
    # A cold move restored at its destination, whose source then died: the destination ends it
    # once the source has been dead for the grace (60 s), not before.
    w = World("cold")
    for event in HAPPY["cold"][:3]:
        w.step(event)
    assert w.m.phase == "restored" and w.running == {DST}
    w.step(("crash", SRC))
    w.step(("sweep", DST))
    w.step(("tick", 20))
    w.step(("sweep", DST))
    assert w.m.phase == "restored"
    w.step(("tick", 61))
    w.step(("sweep", DST))
    assert w.m.phase == "done" and w.vm.host == DST and w.running == {DST}
