"""The audit trail: every change a user asks of the grid, recorded once, where it was asked.

Every writing operation of :class:`vmwebd.app.Application` (the one door of the SOAP API and the web
pages) is listed once, in :data:`AUDITED`, with the name it has in the SOAP API and what it acts
on; :func:`instrument` wraps those methods when the class is defined, so no method carries audit
code of its own. When such a call ends — done, refused, or failed — the host that took it writes
one ``audit`` entity into the DOM (:class:`~vmwebd.dom.records.AuditRec`: time, user, operation,
object, ``ok`` or the faultcode, the host) and logs it (fields USER, REQUEST_ID = the record's
id, FAULTCODE, CLUSTER, VM under journald). The DOM spreads it to every host, so any host
answers ``ListAudit``; the answer to the caller waits until the record is durable here.

Bounded: each host deletes its own records beyond :data:`KEEP_PER_HOST` (oldest first) and
those older than :data:`MAX_AGE_MS` (checked every :data:`EXPIRE_SECONDS`); the tombstones are
then collected like any other (vmwebd/dom/gc.py). Only the host that wrote a record deletes it,
so each record keeps a single writer.

Who reads what: an admin reads every record, a user only their own through ``ListAudit``;
``GetDom`` shows a user none (:meth:`vmwebd.app.Application.dom_xml`): a record names what its user
typed, another user's cluster included.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from vmwebd.dom.records import AuditRec
from vmwebd.errors import InvalidArgument, VmwebError
from vmwebd.timespec import parse_since

log = Logger()

#: Records each host keeps of the requests it took (its oldest go first beyond that).
KEEP_PER_HOST = 2000
#: Records older than this are deleted by the host that wrote them.
MAX_AGE_MS = 30 * 24 * 3600 * 1000
#: How often a host looks for its records past MAX_AGE_MS.
EXPIRE_SECONDS = 3600.0
#: ListAudit answers this many records unless asked for another number from 1 to LIST_MAX.
LIST_DEFAULT = 100
LIST_MAX = 10000
#: A fault's message is kept this long in a record.
DETAIL_MAX = 300
_OBJECT_MAX = 200


@dataclass(frozen=True)
class Audited:
    """How one Application method is recorded: its SOAP operation name (or a function of the call's
    arguments giving it) and the object it acts on (a function of the arguments, which include
    the caller ``p``). ``detail`` says what was asked beyond the object, when that matters;
    it must never hold a secret (passwords are arguments of some of these calls)."""

    op: str | Callable[[dict], str]
    object: Callable[[dict], str]
    detail: Callable[[dict], str] | None = None


def _cluster(a) -> str:
    return f"cluster/{a['name']}"


def _vm(a) -> str:
    return f"vm/{a['cluster']}/{a['vm']}"


def _host(a) -> str:
    return f"host/{a['host']}"


def _user(a) -> str:
    return f"user/{a['name']}"


def _forced(a) -> str:
    return ", forced" if a.get("force") else ""


def _own_user(a) -> str:
    """A user's keys: an empty name is the caller's own account."""
    return f"user/{a['name'] or a['p'].name}"


#: Every Application method that changes the grid, and the opening of a VM's console. tests/test_audit.py checks that each public method
#: of Application is either here or in READS, so a new one cannot be forgotten.
AUDITED: dict[str, Audited] = {
    "create_cluster": Audited(
        "CreateCluster", _cluster, lambda a: f"template {a['template']}, owner {a['owner']}, {a['count']} VMs"
    ),
    "scale_cluster": Audited("ScaleCluster", _cluster, lambda a: f"to {a['count']} VMs" + _forced(a)),
    "destroy_cluster": Audited("DestroyCluster", _cluster, lambda a: _forced(a).lstrip(", ")),
    "set_vm_power": Audited(
        lambda a: "StartVm" if a["desired"] == "running" else "StopVm", _vm, lambda a: _forced(a).lstrip(", ")
    ),
    "migrate_vm": Audited("MigrateVm", _vm, lambda a: f"to {a['dest']}" if a["dest"] else ""),
    "evacuate_host": Audited("EvacuateHost", _host),
    "add_member": Audited("AddHost", _host),
    "remove_member": Audited("RemoveHost", _host),
    "drain_host": Audited("DrainHost", _host),
    "undrain_host": Audited("UndrainHost", _host),
    "add_image": Audited("AddImage", lambda a: f"image/{a['name']}", lambda a: f"from {a['path']}"),
    "set_setting": Audited("SetSetting", lambda a: f"setting/{a['key']}", lambda a: f"= {a['value']}"),
    "create_user": Audited(
        "CreateUser",
        _user,
        lambda a: f"role {a['role'] or 'user'}" + (f", quota {a['quota']}" if a["quota"] is not None else ""),
    ),
    "delete_user": Audited("DeleteUser", _user),
    "set_password": Audited("SetPassword", _user),
    "set_quota": Audited("SetQuota", _user, lambda a: f"quota {a['quota']}"),
    "add_ssh_key": Audited("AddSshKey", _own_user),
    "add_ssh_key_file": Audited("AddSshKey", _own_user),
    "remove_ssh_key": Audited("RemoveSshKey", _own_user),
    # Not a change to the grid, but a console gives its user the guest: who opened which is kept.
    "open_console": Audited("OpenConsole", _vm),
}
#: Application methods that change nothing (and checks used by the others): not recorded.
READS = frozenset(
    {
        "require_admin",
        "used",
        "cluster",
        "clusters",
        "migration",
        "migrations",
        "migration_waiting",
        "dom_xml",
        "users",
        "user",
        "ssh_keys",
        "cluster_hosts",
        "list_audit",
    }
)


def _short(value, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def faultcode_of(exc: BaseException) -> tuple[str, str]:
    """(faultcode, message) a caller is told for ``exc`` (a bug is Server.Internal, unexplained,
    as the SOAP stack answers it)."""
    if isinstance(exc, VmwebError):
        return exc.faultcode, exc.message
    return "Server.Internal", "internal error"


class AuditLog:
    """This host's side of the audit trail: writes a record per audited call, keeps this host's
    records within ``keep`` and ``max_age_ms``, and answers queries from the replica."""

    def __init__(
        self,
        host_id: str,
        domsvc,
        now_ms: Callable[[], int],
        clock=None,
        keep: int = KEEP_PER_HOST,
        max_age_ms: int = MAX_AGE_MS,
    ):
        self.host_id = host_id
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.now_ms = now_ms
        self.clock = clock
        self.keep = keep
        self.max_age_ms = max_age_ms
        self._expiry = None

    # -- timers ------------------------------------------------------------------------------
    def start(self) -> None:
        """Deletes this host's records past ``max_age_ms`` now and every EXPIRE_SECONDS."""
        if self.clock is None or self._expiry is not None:
            return
        self._expiry = task.LoopingCall(self.expire)
        self._expiry.clock = self.clock
        self._expiry.start(EXPIRE_SECONDS, now=True).addErrback(
            lambda f: log.failure("audit expiry on {host} stopped", failure=f, host=self.host_id)
        )

    def stop(self) -> None:
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._expiry = None

    # -- writing -----------------------------------------------------------------------------
    def record(
        self, user: str, op: str, obj: str, started_ms: int, error: BaseException | None, detail: str = ""
    ) -> defer.Deferred:
        """Writes (and logs) the record of one call; fires once it is durable, never with an
        error (an audit record that cannot be written is logged, and the call's answer stands)."""
        try:
            outcome, message = ("ok", "") if error is None else faultcode_of(error)
            v = self.dom.clock.tick()
            rec = AuditRec(
                id=f"{self.host_id}/{v.wall_ms}.{v.counter}",
                at=started_ms,
                host=self.host_id,
                user=_short(user, _OBJECT_MAX),
                op=op,
                object=_short(obj, _OBJECT_MAX),
                outcome=outcome,
                detail=_short(message or detail, DETAIL_MAX),
                ms=max(0, int(self.now_ms()) - started_ms),
            )
            self._log(rec)
            entities = [self.dom.put(rec)] + [self.dom.delete("audit", i) for i in self._overflow()]
            # Durable here before the answer; peers learn it from the push that follows.
            d = self.domsvc.commit_local(entities, wait_push=False)
        except Exception:
            log.failure(
                "audit record of {op} by {user} on {host} not written", op=op, user=user, host=self.host_id
            )
            return defer.succeed(None)
        return d.addErrback(
            lambda f: log.failure(
                "audit record of {op} by {user} on {host} not written",
                failure=f,
                op=op,
                user=user,
                host=self.host_id,
            )
        )

    def _log(self, rec: AuditRec) -> None:
        kind, _, rest = rec.object.partition("/")
        where = (
            {"cluster": rest}
            if kind == "cluster"
            else {"cluster": rest.partition("/")[0], "vm": rest}
            if kind == "vm"
            else {}
        )
        level = log.warn if rec.outcome.startswith("Server") else log.info
        if rec.outcome == "ok":
            level(
                "audit {request_id}: {user} {op} {object}: ok",
                request_id=rec.id,
                user=rec.user,
                op=rec.op,
                object=rec.object,
                host=rec.host,
                **where,
            )
        else:
            level(
                "audit {request_id}: {user} {op} {object}: {faultcode}: {detail}",
                request_id=rec.id,
                user=rec.user,
                op=rec.op,
                object=rec.object,
                host=rec.host,
                faultcode=rec.outcome,
                detail=rec.detail,
                **where,
            )

    def own(self) -> list[AuditRec]:
        """This host's records, oldest first."""
        return sorted(self.dom.select(AuditRec, "host", self.host_id), key=_order)

    def _overflow(self) -> list[str]:
        """Ids of this host's oldest records to delete so it keeps at most ``keep``, counting
        the one just written. A tenth more go at once, so the sort is paid every keep/10 writes."""
        n = self.dom.count("audit", "host", self.host_id)
        if n <= self.keep:
            return []
        target = max(0, self.keep - max(1, self.keep // 10))
        return [r.id for r in self.own()[: n - target]]

    def expire(self) -> defer.Deferred:
        """Deletes this host's records older than ``max_age_ms`` (a bounded batch per call)."""
        cutoff = int(self.now_ms()) - self.max_age_ms
        old = [r.id for r in self.own() if r.at < cutoff][:1000]
        if not old:
            return defer.succeed(0)
        log.info(
            "deleting {n} audit records of {host} older than {days} days",
            n=len(old),
            host=self.host_id,
            days=self.max_age_ms // 86400000,
        )
        return self.domsvc.delete(*(("audit", i) for i in old)).addCallback(lambda _: len(old))

    # -- reading -----------------------------------------------------------------------------
    def query(self, user: str | None, since_ms: int, limit: int) -> list[AuditRec]:
        """Records of ``user`` (everyone's for None) taken at ``since_ms`` or later, newest first,
        at most ``limit``."""
        recs = self.dom.select(AuditRec, "user", user) if user is not None else self.dom.all(AuditRec)
        recs = [r for r in recs if r.at >= since_ms]
        recs.sort(key=_order, reverse=True)
        return recs[:limit]


def _order(rec: AuditRec):
    """Time order: when taken, then the writer's clock reading in the id, then the id."""
    _, _, stamp = rec.id.rpartition("/")
    wall, _, counter = stamp.partition(".")
    try:
        return (rec.at, int(wall), int(counter), rec.id)
    except ValueError:
        return (rec.at, 0, 0, rec.id)


def check_query(since, limit, now_ms: int) -> tuple[int, int]:
    """(since in ms, limit) of a ListAudit call; InvalidArgument naming ``since`` or ``limit``."""
    since_ms = 0
    if since not in (None, ""):
        try:
            since_ms = int(parse_since(since, now_ms / 1000.0) * 1000)
        except ValueError as e:
            raise InvalidArgument("since", str(e)) from None
    if limit in (None, 0):
        limit = LIST_DEFAULT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_MAX:
        raise InvalidArgument("limit", f"{limit!r} is not a number of records from 1 to {LIST_MAX}")
    return since_ms, limit


# -- wrapping Access ---------------------------------------------------------------------------
def instrument(cls, table: dict[str, Audited] = AUDITED):
    """Wraps each method of ``cls`` named in ``table`` so that its end is recorded by
    ``self.audit`` (an :class:`AuditLog`); returns ``cls``."""
    for name, spec in table.items():
        setattr(cls, name, _audited(getattr(cls, name), spec))
    return cls


def _audited(method, spec: Audited):
    sig = inspect.signature(method)

    @functools.wraps(method)
    def call(self, p, *args, **kwargs):
        audit: AuditLog = self.audit
        started = int(audit.now_ms())
        try:
            bound = sig.bind(self, p, *args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            op = spec.op(a) if callable(spec.op) else spec.op
            obj = spec.object(a)
            detail = spec.detail(a) if spec.detail is not None else ""
        except Exception:  # arguments the method itself will refuse: record it as is
            op = spec.op if isinstance(spec.op, str) else method.__name__
            obj, detail = "?", ""
        user = getattr(p, "name", "?")
        try:
            result = method(self, p, *args, **kwargs)
        except Exception as e:
            audit.record(user, op, obj, started, e, detail)
            raise
        if not isinstance(result, defer.Deferred):
            audit.record(user, op, obj, started, None, detail)
            return result

        def ended(outcome):
            error = outcome.value if isinstance(outcome, Failure) else None
            # The answer waits for the record to be durable (and the record never fails it).
            return audit.record(user, op, obj, started, error, detail).addCallback(lambda _: outcome)

        return result.addBoth(ended)

    call.audited = spec
    return call
