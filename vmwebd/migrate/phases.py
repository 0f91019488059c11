"""The migration phase machine: what one host does next about one migration (no I/O).

A migration entity in the DOM *is* the protocol (docs/migration.md): each host reacts to it as
gossip delivers it, and only the host named for the current phase acts. :func:`decide` says what
that is, from the entity, the VM's record, this host's id, the time and a few observations (what
woke us, whether the other host is alive, what the driver can do). It answers with a small
immutable action; :class:`vmwebd.migrate.manager.MigrationManager` carries it out (libvirt calls,
file copies, DOM writes) and asks again when the entity changes.

The machine must survive a crash in every phase; the rules for a host restarted with the
entity in its DOM, for a sweep that finds the other host gone or silent, and for an executor that
failed are all here, so they can be tested as a table (tests/test_migration_phases.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vmwebd.dom.records import MigrationRec, VmRec
from vmwebd.migrate.state import STALE_MS


class Phase(str, enum.Enum):
    """A migration's phase, as written in the entity's ``phase`` attribute."""

    PREPARE = "prepare"  # asked; the destination makes room (image, network, empty overlay)
    READY = "ready"  # the destination is ready; the source moves the VM
    MIGRATING = "migrating"  # live: libvirt copies the overlay, then the memory
    SAVED = "saved"  # cold: the source saved the memory; the destination pulls it
    RESTORED = "restored"  # cold: the destination runs the VM; the source records it
    DONE = "done"  # the VM's host is the destination
    FAILED = "failed"  # given up; the VM stays at (or goes back to) the source

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({Phase.DONE, Phase.FAILED})
#: Phases in which the destination acts, and the source waits on it (the sweep watches it).
DEST_ACTS = frozenset({Phase.PREPARE, Phase.SAVED})
#: Phases in which the source acts.
SOURCE_ACTS = frozenset({Phase.READY, Phase.RESTORED})
#: Phases a restarted source cannot resume as they were: its saved state is not to be trusted,
#: so it fails the migration; of libvirt's live job it asks libvirt (see ``source_domain``).
SOURCE_LOST_ON_RESTART = frozenset({Phase.MIGRATING, Phase.SAVED})
#: What a restarted source's libvirt says of the domain it was moving live
#: (:attr:`Observations.source_domain`).
DOMAIN_GONE, DOMAIN_MIGRATING, DOMAIN_HERE = "gone", "migrating", "here"
#: Asked, but libvirt did not answer (or the domain changed between two of its calls: it was
#: undefined by the move ending just then).
DOMAIN_UNKNOWN = "unknown"


class Role(enum.Enum):
    """What this host is to a migration."""

    SOURCE = "source"
    DEST = "dest"
    BYSTANDER = "bystander"


class Trigger(enum.Enum):
    """Why the machine is asked."""

    CHANGED = "changed"  # the entity changed here (gossip, our own write, a kick)
    RESTARTED = "restarted"  # this host just started, with the entity in its DOM
    SWEEP = "sweep"  # the periodic sweep (timeouts)


@dataclass(frozen=True)
class Limits:
    """When a migration is given up (the defaults are the daemon's)."""

    #: How long a migration may stay in ``prepare`` (the destination silent) before it is failed.
    prepare_timeout_s: float = 180.0
    #: How long the other host must stay out of the failure detector's live set before a
    #: migration waiting on it is failed: a loaded host flaps to "dead" and comes back.
    host_down_grace_s: float = 60.0
    #: A migration not finished after this long is abandoned by everyone (its hosts crashed).
    stale_ms: int = STALE_MS


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Observations:
    """What this host knows besides the DOM records, when it asks."""

    trigger: Trigger = Trigger.CHANGED
    #: When the host this one waits on (see :func:`watched_peer`) was first seen out of the live
    #: set, in ms; None while it is live. Read by the sweep only.
    peer_down_since: int | None = None
    #: The ``migrate-uri`` the destination publishes ("" if none): live moves need it.
    dest_migrate_uri: str = ""
    #: The driver keeps volumes as files (a cold move then copies the overlay).
    volumes_on_disk: bool = False
    #: At a source restarted in ``migrating``, what its libvirt says of the VM's domain: the
    #: daemon died, not libvirtd, whose peer-to-peer job goes on without it. DOMAIN_GONE: no
    #: longer defined here (libvirt finished the move and undefined its source); DOMAIN_MIGRATING:
    #: its outgoing job still runs; DOMAIN_HERE: defined, no job (nothing moved); DOMAIN_UNKNOWN:
    #: asked, no answer (looked at again: failing the move could remove a guest that arrived);
    #: "": not asked.
    source_domain: str = ""
    #: The destination of this cold move holds its hand-over (``state.held_by_dest``): the move
    #: is never abandoned, and its source no longer times it out (it cannot fail it).
    held_by_dest: bool = False


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nothing:
    """Not this host's business: a bystander, an ended or abandoned migration."""


@dataclass(frozen=True)
class Wait:
    """This host takes part, but the other host (or libvirt's job) acts now."""

    on: str = ""  # who or what is awaited, for logs and tests


@dataclass(frozen=True)
class PrepareDest:
    """Destination, ``prepare``: base image, network, a fresh empty overlay; write ``ready``.
    ``check_balancer``: the balancer asked, so first judge the move with our own load."""

    check_balancer: bool = False


@dataclass(frozen=True)
class MigrateMemory:
    """Source, ``ready``, live: write ``migrating``, let libvirt copy the overlay and the
    memory to ``uri`` (the destination's), then record the VM's new host and ``done``."""

    uri: str


@dataclass(frozen=True)
class SaveMemory:
    """Source, ``ready``, cold: save the memory (if the VM runs) to a file; write ``saved``.
    ``measure_overlay``: the overlay is a file the destination will pull."""

    measure_overlay: bool = False


@dataclass(frozen=True)
class RestoreDest:
    """Destination, ``saved``: pull the overlay and/or the memory state from the source,
    define and restore the domain; write ``restored``."""

    fetch_disk: bool = False
    fetch_state: bool = False


@dataclass(frozen=True)
class Finish:
    """Source, ``restored``: record the VM's new host and ``done``, remove our copy."""


@dataclass(frozen=True)
class FinishForSource:
    """Destination, ``restored``, its source out of the live set for the grace: the VM runs
    here and the source cannot fail the move any more (the destination holds the hand-over), so
    the destination records the VM's new host and ``done`` in its stead. The source's copy (its
    stopped domain, overlay and memory state) is removed by the source itself if it comes back:
    its reconciler removes what the DOM does not put there."""


@dataclass(frozen=True)
class Moved:
    """Source, ``migrating``, after a restart: libvirt finished the live move while this host's
    daemon was down (the domain left this host); record the VM's new host and ``done``."""


@dataclass(frozen=True)
class Abort:
    """Write ``failed`` with ``phase {phase}: {reason}`` (unless the move ended meanwhile:
    :func:`may_fail`) and give the lease back."""

    phase: str
    reason: str

    @property
    def error(self) -> str:
        return f"phase {self.phase}: {self.reason}"


@dataclass(frozen=True)
class CleanUp:
    """``failed``: the destination removes its copy (``remove_dest_copy``); the source removes
    its saved state (``source_side``), restoring the VM from it first if it is still ours
    (``restore_saved``, when such a state exists)."""

    remove_dest_copy: bool = False
    source_side: bool = False
    restore_saved: bool = False


Action = (
    Nothing
    | Wait
    | PrepareDest
    | MigrateMemory
    | SaveMemory
    | RestoreDest
    | Finish
    | FinishForSource
    | Moved
    | Abort
    | CleanUp
)
#: The actions that do work on this host (the others only log, or not even that).
ACTING = (PrepareDest, MigrateMemory, SaveMemory, RestoreDest, Finish, FinishForSource, Moved)


# -- the machine -----------------------------------------------------------------------------
def role_of(m: MigrationRec, host: str) -> Role:
    """What ``host`` is to migration ``m``."""
    if m.source == host:
        return Role.SOURCE
    if m.dest == host:
        return Role.DEST
    return Role.BYSTANDER


def phase_of(m: MigrationRec) -> Phase | None:
    """The entity's phase, or None for one this version does not know (left alone)."""
    try:
        return Phase(m.phase)
    except ValueError:
        return None


def abandoned(m: MigrationRec, now: int, limits: Limits = DEFAULT_LIMITS, held_by_dest: bool = False) -> bool:
    """Unfinished after ``stale_ms``: its hosts crashed; everyone leaves it (and the reconciler
    gives its lease back). Never a cold move whose destination holds the hand-over
    (``held_by_dest``): see ``state.held_by_dest``."""
    return phase_of(m) not in TERMINAL and now - m.started_at >= limits.stale_ms and not held_by_dest


def vm_gone(vm: VmRec | None) -> bool:
    """The VM's record is missing or being removed: there is nothing to move."""
    return vm is None or vm.desired == "absent"


def watched_peer(
    m: MigrationRec, host: str, now: int, limits: Limits = DEFAULT_LIMITS, held_by_dest: bool = False
) -> str | None:
    """The host whose liveness ``host``'s sweep tracks for ``m``: the destination, while the
    source waits on it (but not once the destination took the hand-over of a saved cold move,
    ``held_by_dest``: failing it would need that lease); the source, at the destination of a
    cold move in ``restored`` (the VM runs there; only its end is to be recorded); None
    otherwise. Only the source fails a move on a timeout: it alone knows whether libvirt moved
    the VM, and a destination that gave up on a source it wrongly believed dead could destroy a
    guest that had just arrived."""
    if abandoned(m, now, limits, held_by_dest):
        return None
    phase = phase_of(m)
    if m.source == host and phase in DEST_ACTS:
        if held_by_dest and phase is Phase.SAVED:
            return None
        return m.dest
    if m.dest == host and phase is Phase.RESTORED:
        return m.source
    return None


def awaited(
    m: MigrationRec, now: int, limits: Limits = DEFAULT_LIMITS, held_by_dest: bool = False
) -> tuple[str, str] | None:
    """Who a migration under way waits on, and for what, said for people (the CLI and the web
    page show it): (host, what it is to do); None once the move ended or was abandoned."""
    phase = phase_of(m)
    if phase is None or phase in TERMINAL or abandoned(m, now, limits, held_by_dest):
        return None
    if phase is Phase.PREPARE:
        return m.dest, "to prepare (base image, network, an empty overlay)"
    if phase is Phase.READY:
        return m.source, "to move the memory" if m.mode == "live" else "to save the VM"
    if phase is Phase.MIGRATING:
        return m.source, "(its libvirt) to finish the live move"
    if phase is Phase.SAVED:
        return m.dest, "to restore the saved VM, which it holds" if held_by_dest else "to take the saved VM"
    return m.source, "to record the end (the VM runs at the destination)"


def decide(
    m: MigrationRec | None,
    vm: VmRec | None,
    host: str,
    now: int,
    obs: Observations = Observations(),
    limits: Limits = DEFAULT_LIMITS,
) -> Action:
    """What ``host`` does next about migration ``m`` (VM record ``vm``, None if gone) at
    ``now`` (ms), given ``obs``. Pure: the same inputs give the same answer."""
    if m is None:
        return Nothing()
    phase = phase_of(m)
    if phase is None:
        return Nothing()
    role = role_of(m, host)
    if obs.trigger is Trigger.SWEEP:
        return _sweep(m, vm, phase, host, now, obs, limits)
    if phase in TERMINAL:
        if phase is Phase.DONE or obs.trigger is Trigger.RESTARTED:
            # A restarted host does not clean up after failures again (its reconciler
            # removes what is not the DOM's: orphan domains and overlays).
            return Nothing()
        return _clean_up(m, vm, host)
    if abandoned(m, now, limits, obs.held_by_dest):
        return Nothing()
    if obs.trigger is Trigger.RESTARTED and role is Role.SOURCE and phase in SOURCE_LOST_ON_RESTART:
        if phase is Phase.MIGRATING and not vm_gone(vm):
            # Failing a move libvirt finished would have the destination remove the guest that
            # just arrived (and its disk): ask libvirt what became of the job.
            if obs.source_domain == DOMAIN_GONE:
                return Moved()
            if obs.source_domain == DOMAIN_MIGRATING:
                return Wait("libvirt")
            if obs.source_domain == DOMAIN_UNKNOWN:
                return Wait("libvirt (no answer yet)")
        return Abort(phase.value, f"host {host} restarted during phase {phase.value!r}")
    if role is Role.DEST:
        if phase not in DEST_ACTS:
            return Wait("source")
    elif role is Role.SOURCE:
        if phase not in SOURCE_ACTS:
            return Wait("libvirt" if phase is Phase.MIGRATING else "destination")
    else:
        return Nothing()
    if vm_gone(vm):
        return Abort(phase.value, f"on host {host}: VM {m.vm!r} is gone")
    if phase is Phase.PREPARE:
        return PrepareDest(check_balancer=m.requested_by == "balancer")
    if phase is Phase.SAVED:
        return RestoreDest(
            fetch_disk=bool(m.disk_bytes) and obs.volumes_on_disk, fetch_state=m.bytes > m.disk_bytes
        )
    if phase is Phase.READY:
        if m.mode != "live":
            return SaveMemory(measure_overlay=obs.volumes_on_disk)
        if not obs.dest_migrate_uri:
            return Abort(phase.value, f"on host {host}: host {m.dest!r} publishes no migration URI")
        return MigrateMemory(uri=obs.dest_migrate_uri)
    return Finish()  # RESTORED, at the source


def _sweep(
    m: MigrationRec, vm: VmRec | None, phase: Phase, host: str, now: int, obs: Observations, limits: Limits
) -> Action:
    """The source's periodic look at a migration waiting on its destination, and the
    destination's at a cold move it restored, waiting on its source to record the end."""
    peer = watched_peer(m, host, now, limits, obs.held_by_dest)
    if peer is None:
        if (
            role_of(m, host) is Role.BYSTANDER
            or phase in TERMINAL
            or abandoned(m, now, limits, obs.held_by_dest)
        ):
            return Nothing()
        if obs.held_by_dest and phase is Phase.SAVED:
            return Wait("destination (it holds the saved VM)")
        return Wait()  # nothing times out here but at the source, waiting on the destination
    waits_on = "source" if peer == m.source else "destination"
    if obs.peer_down_since is not None:
        down_ms = now - obs.peer_down_since
        if down_ms < limits.host_down_grace_s * 1000:
            return Wait(f"{waits_on} (not alive)")
        gone = f"host {peer} has not been alive for {down_ms / 1000:.0f} s"
        if peer == m.dest:
            return Abort(phase.value, gone)
        if vm_gone(vm):
            # Removed meanwhile: the source would have failed the move (the copy here goes).
            return Abort(phase.value, f"{gone}; on host {host}: VM {m.vm!r} is gone")
        return FinishForSource()
    if peer == m.source:
        return Wait("source")
    if phase is Phase.PREPARE and now - m.started_at > limits.prepare_timeout_s * 1000:
        return Abort(phase.value, f"host {m.dest} did not prepare within {limits.prepare_timeout_s:.0f} s")
    return Wait("destination")


def _clean_up(m: MigrationRec, vm: VmRec | None, host: str) -> Action:
    """``failed``: each side removes what the move left (see :class:`CleanUp`)."""
    remove_dest = m.dest == host and (vm is None or vm.host != host)
    source_side = m.source == host
    if not (remove_dest or source_side):
        return Nothing()
    return CleanUp(
        remove_dest_copy=remove_dest,
        source_side=source_side,
        restore_saved=source_side and vm is not None and vm.host == host,
    )


def after_error(m_then: MigrationRec, m_now: MigrationRec | None, host: str, error: str) -> Action:
    """An action ``host`` took on ``m_then`` failed with ``error``; ``m_now`` is the entity as
    it is now. Fail the migration in the phase the action was for, unless it ended meanwhile."""
    if m_now is None or phase_of(m_now) in TERMINAL:
        return Nothing()
    return Abort(m_then.phase, f"on host {host}: {error}")


def may_fail(m: MigrationRec, m_now: MigrationRec | None, vm: VmRec | None) -> bool:
    """May migration ``m`` (as it is now: ``m_now``, None if gone) be written ``failed``? Not
    once it ended: the source records the VM's new host before ``done``, so a VM already on the
    destination means it finished, and a ``failed`` must never override a move that did."""
    if vm is not None and vm.host == m.dest:
        return False
    return m_now is None or phase_of(m_now) not in TERMINAL


def still_ready(m_now: MigrationRec | None) -> bool:
    """The source looked at its domain (off the reactor) before a live move: may it still start
    libvirt's job? Not if the migration failed or was abandoned meanwhile."""
    return m_now is not None and phase_of(m_now) is Phase.READY


def choose_mode(running: bool, source_uri: str, dest_uri: str) -> str:
    """Live when the VM runs and both hosts publish a migration URI; cold otherwise."""
    return "live" if running and source_uri and dest_uri else "cold"


def serves_file(m: MigrationRec | None, host: str, peer: str) -> bool:
    """May ``host`` hand the files of cold move ``m`` (its memory state, its overlay) to
    ``peer``? Only the source, only to the destination, only while ``saved``."""
    return m is not None and m.source == host and m.dest == peer and phase_of(m) is Phase.SAVED
