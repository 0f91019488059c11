"""What a host's reconciler does about each VM, domain, network, cluster and lease (no I/O).

:class:`vmwebd.reconcile.Reconciler` gathers what a pass needs (the DOM's records for this host,
the domains and networks the driver reports, the time) and asks this module what to do; it then
carries out the answer (libvirt calls through the driver, seed writes, DOM writes) and nothing
else. The rules of docs/lifecycle.md live here, so they can be tested as a table
(tests/test_reconcile_plan.py):

- :func:`decide_vm`: one VM assigned here, against the state of its domain: start it, leave it
  off, ask its guest to shut down, power it off, remove it, or record what it is;
- :func:`after_look`: a guest asked to shut down, once looked at again;
- :func:`orphan_domains`, :func:`stale_networks`, :func:`finished_destroys`,
  :func:`lease_orphaned`: what a pass removes besides the VMs (domains and old networks of ours
  no VM here needs, clusters whose destroy is done, leases whose holder never came to be).

Time is an argument (``now``: seconds on the reconciler's ``stop_clock``; ``now_ms``: the DOM's
clock), never read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from vmwebd.dom.hlc import Version
from vmwebd.dom.records import LeaseRec, MigrationRec, Record, VClusterRec, VmRec, VmStatus
from vmwebd.migrate.state import TERMINAL, stale

#: What a VM's status detail says when it was found stopped and left so (restart_stopped false).
NOT_RESTARTED = "not restarted (restart_stopped is false)"
#: Seconds between two looks at a guest asked to shut down.
STOP_POLL = 1.0
#: Seconds after which a guest still running is asked again (it may have missed the first
#: request, e.g. while booting).
STOP_RETRY = 10.0
#: The domain states in which a guest is on (a stop has to power it off first).
ON = ("running", "paused")


@dataclass(frozen=True)
class Settings:
    """The system settings a decision reads (docs/lifecycle.md, "Settings"), and the retry
    period of a graceful stop."""

    stop_timeout_s: int = 60
    restart_stopped: bool = True
    stop_retry_s: float = STOP_RETRY


@dataclass(frozen=True)
class Stopping:
    """A guest asked to shut down on this host, as the reconciler remembers it (in memory only:
    a daemon restarted meanwhile asks again). Times are ``stop_clock`` seconds."""

    token: str  # the creation of the VM it was asked for
    timeout: int  # stop_timeout_s when it was first asked (a later change does not move it)
    deadline: float  # powered off if still running at this time
    asked_at: float  # when it was last asked (the request is repeated every stop_retry_s)


@dataclass(frozen=True)
class Status:
    """What a VM's status part is to say: its state, why, and how often it was restarted."""

    state: str
    detail: str = ""
    restarts: int = 0


# -- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nothing:
    """Not this host's business: the VM is placed elsewhere or being migrated."""

    status: None = None


@dataclass(frozen=True)
class Keep:
    """The domain is as the VM's record asks (or the record asks for nothing known): record
    ``status``, drop any graceful stop under way."""

    status: Status


@dataclass(frozen=True)
class Start:
    """Define the domain first (``create``: its overlay, seed and definition), then start it;
    record ``status`` (``running``). Any graceful stop under way is dropped."""

    status: Status
    create: bool = False


@dataclass(frozen=True)
class LeaveOff:
    """The domain is off and stays off: record ``status``; drop any graceful stop under way.
    ``notice``: a line for the log (a VM just found stopped behind our back and left so)."""

    status: Status
    notice: str = ""


@dataclass(frozen=True)
class PowerOff:
    """Desired ``stopped``: destroy the domain now (forced, no timeout, paused, or the guest's
    time is up) and record ``status`` (``shutoff``, saying which)."""

    status: Status


@dataclass(frozen=True)
class Remove:
    """Desired ``absent``, the domain off: (power it off first when ``power_off`` says why,)
    drop any graceful stop, remove the domain, its overlay and seed, give the VM's addresses back
    and delete the VM from the DOM. No status: the VM goes."""

    power_off: str = ""
    status: None = None


@dataclass(frozen=True)
class AwaitStop:
    """The guest asked to shut down still runs: record ``status`` (``stopping``) and look again
    (:func:`look_delay`)."""

    status: Status


@dataclass(frozen=True)
class GuestStop:
    """The guest has time to shut down: remember ``stop`` (``fresh``: a new request, any earlier
    one of this VM and its look dropped), ask the guest when ``ask``, then look at the domain
    and carry out :func:`after_look`: ``off`` if it went off, else record ``status``
    (``stopping``) and look again."""

    stop: Stopping
    ask: bool
    fresh: bool
    status: Status
    off: LeaveOff | Remove


@dataclass(frozen=True)
class Fail:
    """The VM cannot be brought to its desired state here: record ``status`` (``error``). A
    graceful stop under way is left as it is."""

    status: Status


Action = Nothing | Keep | Start | LeaveOff | PowerOff | Remove | AwaitStop | GuestStop | Fail


# -- one VM ----------------------------------------------------------------------------------
def decide_vm(
    vm: VmRec,
    cluster: VClusterRec | None,
    observed: str,
    prev: VmStatus | None,
    stopping: Stopping | None,
    now: float,
    settings: Settings,
    *,
    host_id: str,
    migrating: bool = False,
    segment_error: str | None = None,
    asked_after_status: bool = False,
) -> Action:
    """What this host (``host_id``) does about ``vm``, whose domain it finds ``observed``
    (a libvirt state, or ``missing``).

    ``prev`` is the VM's status part as recorded, ``stopping`` the graceful stop this host has
    under way for it, ``segment_error`` why its cluster's network segment is not here (None when
    it is), ``asked_after_status`` whether its main part was written after its status part (a
    user asked again: see :func:`asked_after`). A VM placed elsewhere or being migrated is left
    to its host or its migration (:class:`Nothing`)."""
    if vm.host != host_id or migrating:
        return Nothing()
    restarts = prev.restarts if prev else 0
    detail = prev.detail if prev else ""
    if vm.desired == "absent":
        if observed in ON:
            return _stop(vm, observed, stopping, now, settings, restarts, Remove(), _removed)
        return Remove()
    if vm.desired == "running":
        if segment_error and observed != "running":
            return Fail(Status("error", segment_error, restarts))
        if observed == "running":
            return Keep(Status("running", detail, restarts))
        return _start_or_not(vm, cluster, observed, prev, settings, host_id, asked_after_status)
    if vm.desired == "stopped":
        if observed in ON:
            off = LeaveOff(Status("shutoff", "", restarts))
            return _stop(vm, observed, stopping, now, settings, restarts, off, _powered_off(restarts))
        if stopping is not None or prev is None or prev.state != "shutoff" or NOT_RESTARTED in prev.detail:
            detail = ""  # e.g. its guest shut down when asked
        # else: off already, and its detail (how it was powered off) stays
        return LeaveOff(Status(observed, detail, restarts))
    return Keep(Status(observed, detail, restarts))


def _start_or_not(
    vm: VmRec,
    cluster: VClusterRec | None,
    observed: str,
    prev: VmStatus | None,
    settings: Settings,
    host_id: str,
    asked_after_status: bool,
) -> Start | LeaveOff | Fail:
    """A VM that should run, found ``observed`` (not running).

    A VM last seen running was stopped behind our back: started again (a restart, counted) only
    when ``restart_stopped`` is true, else left off with a status saying so. A VM left off that
    way stays off until the setting becomes true or a user starts it (its main part written
    after that status). Any other VM (new, placed here from another host, or stopped by a user
    and now asked to run) starts."""
    restarts = prev.restarts if prev else 0
    if prev is None or prev.host != host_id:
        # Never seen running here: new, or placed here from another host (an evacuation).
        return _start(vm, cluster, observed, Status("running", "", restarts))
    left_off = prev.state != "running" and NOT_RESTARTED in prev.detail
    if not left_off and prev.state != "running":
        return _start(vm, cluster, observed, Status("running", "", restarts))
    if settings.restart_stopped:
        status = Status("running", f"found {observed} behind our back; restarted", restarts + 1)
        return _start(vm, cluster, observed, status)
    if left_off and asked_after_status:
        return _start(vm, cluster, observed, Status("running", "", restarts))
    if left_off:
        return LeaveOff(Status(observed, prev.detail, restarts))
    return LeaveOff(
        Status(observed, f"found {observed} behind vmweb's back; {NOT_RESTARTED}", restarts),
        notice=f"found {observed}; {NOT_RESTARTED}",
    )


def _start(vm: VmRec, cluster: VClusterRec | None, observed: str, status: Status) -> Start | Fail:
    create = observed == "missing"
    if create and cluster is None:
        return Fail(
            Status("error", f"VM {vm.id}: its cluster {vm.cluster!r} is not in the DOM", status.restarts)
        )
    return Start(status, create=create)


def _removed(detail: str) -> Remove:
    return Remove(power_off=detail)


def _powered_off(restarts: int) -> Callable[[str], PowerOff]:
    def make(detail: str) -> PowerOff:
        return PowerOff(Status("shutoff", detail, restarts))

    return make


def _stop(
    vm: VmRec,
    observed: str,
    stopping: Stopping | None,
    now: float,
    settings: Settings,
    restarts: int,
    off: LeaveOff | Remove,
    powered_off: Callable[[str], PowerOff | Remove],
) -> PowerOff | Remove | GuestStop:
    """A stop (desired ``stopped`` or ``absent``) of a domain found on (``observed``).

    The guest is asked to shut down (ACPI) and looked at again; once the timeout read when it
    was first asked has passed it is powered off. A forced stop, a timeout of 0 and a paused
    guest (it cannot hear the request) are powered off at once."""
    timeout = settings.stop_timeout_s
    if vm.force or timeout == 0 or observed == "paused":
        why = "forced" if vm.force else "stop_timeout_s is 0" if timeout == 0 else "it was paused"
        return powered_off(f"powered off at once ({why})")
    if stopping is None or stopping.token != vm.token:
        stop = Stopping(vm.token, timeout, now + timeout, now)
        return GuestStop(stop, ask=True, fresh=True, status=_stopping(stop, restarts), off=off)
    if now >= stopping.deadline:
        detail = f"did not shut down within {stopping.timeout} s of being asked; powered off"
        return powered_off(detail)
    if now - stopping.asked_at >= settings.stop_retry_s:
        stop = Stopping(stopping.token, stopping.timeout, stopping.deadline, now)
        return GuestStop(stop, ask=True, fresh=False, status=_stopping(stop, restarts), off=off)
    return GuestStop(stopping, ask=False, fresh=False, status=_stopping(stopping, restarts), off=off)


def _stopping(stop: Stopping, restarts: int) -> Status:
    # The same words at every look: the status is written once, not once a second.
    detail = f"asked its guest to shut down; powered off if still running after {stop.timeout} s"
    return Status("stopping", detail, restarts)


def after_look(action: GuestStop, observed: str) -> LeaveOff | Remove | AwaitStop:
    """What follows a graceful stop once the domain is looked at (a guest may be off already:
    at once on the test driver, a quick guest in a second)."""
    if observed != "running":
        return action.off
    return AwaitStop(action.status)


def look_delay(stop: Stopping, now: float, poll: float = STOP_POLL) -> float:
    """Seconds until the next look at a guest asked to shut down: every ``poll``, and at its
    deadline at the latest."""
    return max(0.0, min(poll, stop.deadline - now))


def stop_still_wanted(vm: VmRec | None, host_id: str, stop: Stopping) -> bool:
    """Is a graceful stop still this host's to finish? Not once its VM is gone, moved elsewhere
    or made anew (another creation token)."""
    return vm is not None and vm.host == host_id and vm.token == stop.token


def asked_after(main: Version | None, status: Version | None) -> bool:
    """Was the VM's main part (version ``main``) written after its status part? Versions are
    hybrid logical clock readings, so a start request made by a host that had seen the status
    orders after it, wherever it was made."""
    return main is not None and status is not None and main > status


def status_record(
    vm: VmRec, host_id: str, prev: VmStatus | None, status: Status, now_ms: int
) -> VmStatus | None:
    """The status part to write for ``vm`` (None when the one recorded says the same)."""
    if prev is not None and (prev.state, prev.detail, prev.restarts) == (
        status.state,
        status.detail,
        status.restarts,
    ):
        return None
    return VmStatus(
        id=vm.id,
        host=host_id,
        state=status.state,
        detail=status.detail,
        restarts=status.restarts,
        observed_at=now_ms,
        token=vm.token,
    )


def failed(action: Action, prev: VmStatus | None, error: str) -> Status:
    """The status of a VM whose action failed with ``error`` (a restart decided is still
    counted)."""
    restarts = action.status.restarts if action.status is not None else prev.restarts if prev else 0
    return Status("error", error, restarts)


# -- the rest of a pass ----------------------------------------------------------------------
def assigned_here(vms: Iterable[VmRec | None], host_id: str, moving: Iterable[str]) -> list[VmRec]:
    """Of ``vms``, those the DOM places on ``host_id`` and that are not being moved (a VM being
    migrated belongs to its migration until it ends)."""
    moving = set(moving)
    return [vm for vm in vms if vm is not None and vm.host == host_id and vm.id not in moving]


def orphan_domains(
    found: Iterable[str],
    mine: Iterable[VmRec],
    moving: Iterable[str],
    *,
    domain_of: Callable[[str], str],
    prefix: str,
) -> list[str]:
    """Of the domains ``found`` here, those to remove: ours (named with ``prefix``), of no VM in
    ``mine`` (the VMs placed here), and of no VM being moved (its domain may be the migration's,
    here as source or destination). ``domain_of`` names a VM's domain (the naming lives with the
    hypervisor interface, which this module does not import). Sorted."""
    known = {domain_of(vm.id) for vm in mine}
    moved = {domain_of(v) for v in moving}
    return sorted(n for n in set(found) if n.startswith(prefix) and n not in known and n not in moved)


def stale_networks(
    found: Iterable[str], mine: Iterable[VmRec], *, network_of: Callable[[str], str], prefix: str
) -> list[str]:
    """Of the libvirt networks ``found`` here, those to destroy: ours (named with ``prefix``),
    of no cluster with a VM in ``mine`` that is to stay (``network_of`` names a cluster's).
    libvirt networks are from before segments: each goes with the last VM of its cluster here;
    domains defined on one still use it until they are made again. Sorted."""
    still = {network_of(vm.cluster) for vm in mine if vm.desired != "absent"}
    return sorted(n for n in set(found) - still if n.startswith(prefix))


def finished_destroys(clusters: Mapping[str, VClusterRec], vm_counts: Mapping[str, int]) -> list[VClusterRec]:
    """Of ``clusters``, those being destroyed that have no VM left anywhere (``vm_counts``: a
    cluster's VMs in the DOM; a cluster not in it has none): their leases go, then they do.
    In order of id."""
    return [
        clusters[c] for c in sorted(clusters) if clusters[c].state == "destroying" and not vm_counts.get(c, 0)
    ]


R = TypeVar("R", bound=Record)


class Records(Protocol):
    """Where :func:`lease_orphaned` looks holders up (the DOM)."""

    def get(self, cls: type[R], id_: str) -> R | None: ...


def lease_batch(ids: list[str], cursor: int, size: int) -> tuple[list[str], int]:
    """The next at most ``size`` of ``ids`` from ``cursor`` (wrapped), and the cursor after them:
    a full pass checks a bounded slice of the leases, and the next pass the slice after it."""
    if not ids:
        return [], cursor
    start = cursor % len(ids)
    batch = ids[start : start + size]
    return batch, start + len(batch)


def lease_orphaned(
    lease: LeaseRec, holder: tuple[str, str, str], dom: Records, now_ms: int, grace_ms: float
) -> bool:
    """Is ``lease`` (its holder parsed as (kind, id, token)) held by something that is gone or
    never came to be? A VM's or a cluster's lease whose cluster is missing or of another
    creation; a migration's whose migration ended or was abandoned; a cold move's hand-over
    whose migration is deleted. Leases younger than
    ``grace_ms`` are left: their request may still be recording what they are for."""
    if now_ms - lease.granted_at < grace_ms:
        return False
    kind, ref, token = holder
    if kind == "vm":
        vm = dom.get(VmRec, ref)
        c = dom.get(VClusterRec, vm.cluster) if vm else None
        return c is None or c.token != token
    if kind == "vcluster":
        c = dom.get(VClusterRec, ref)
        return c is None or c.token != token
    if kind == "migration":
        m = dom.get(MigrationRec, token)
        return m is None or m.phase in TERMINAL or stale(m, now_ms, dom)
    if kind == "handover":  # a cold move's hand-over: kept while its migration is recorded
        return dom.get(MigrationRec, token) is None
    return False
