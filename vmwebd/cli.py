# PYTHON_ARGCOMPLETE_OK  (argcomplete looks for this line near the top of the module)
"""``vmweb``: the command line for users and scripts, talking SOAP to any host's user API.

Readable tables by default, ``--json`` for scripts (before or after the command). Exit statuses
are listed once, in EXIT_CODES, and shown by ``vmweb --help``: a fault prints one line
(``vmweb: Client.NoSuchCluster: no virtual cluster named 'x'``) and exits 1; a bad command line
or an unreachable host exits 2; ``cluster create`` and ``cluster scale`` wait for the VMs (unless
``--no-wait``) and exit 3 when some cannot come up now (one line each: which host, why, what to
do); commands that follow something exit 4 when their ``--timeout`` passes first.

Credentials (HTTP Basic), first found wins: ``--user``/``--password``; ``$VMWEB_USER`` and
``$VMWEB_PASSWORD``; a file of one line ``user:password`` named by ``--credentials`` or
``$VMWEB_CREDENTIALS``; with only a user name on a terminal, the password is asked for.

TLS: ``--host https://HOST:PORT`` (a bare ``HOST:PORT`` is plain HTTP) checks the host's
certificate against ``--ca FILE`` or ``$VMWEB_CA`` (the grid's ``ca.crt`` for ``api-tls="grid"``),
else the system's trust store; a certificate that does not verify exits 2 with one line naming
the host.

Shell completion comes from argcomplete (``eval "$(register-python-argcomplete vmweb)"``):
commands and options always, and the names of clusters, templates, hosts, users and settings
when the host at ``--host`` answers within COMPLETION_TIMEOUT with the credentials from the
environment (never a password prompt; nothing is offered on any error).

This module and :mod:`vmwebd.client` import no server code: ``import vmwebd.cli`` loads neither
spyne, Twisted nor libvirt (``tests/test_cli_shell.py`` checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vmwebd import version

DEFAULT_HOST = "127.0.0.1:8470"
#: A request the grid refused (a fault: the line names its code and the object), an argument
#: refused before anything was sent, or a move that failed.
EXIT_REFUSED = 1
#: The command line does not parse, or no vmwebd was reached at --host (or its certificate did
#: not verify): nothing was asked of the grid.
EXIT_USAGE = 2
#: ``cluster create`` / ``scale`` (waiting): some VMs cannot come up now (an error on their host,
#: or pending on a host that is not alive, or being removed by one).
EXIT_STUCK = 3
#: ``cluster create`` / ``scale`` (waiting): ``--timeout`` passed with VMs still coming up;
#: ``vm migrate`` / ``host drain`` (following): ``--timeout`` passed with moves not finished.
EXIT_TIMEOUT = 4
#: Interrupted by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: Once every VM still pending is on a host that is not alive, the wait goes on this long (s)
#: before giving up on them: a host declared dead has the VMs that never ran on it re-placed on
#: live hosts by the grid itself (docs/migration.md) well within it.
STUCK_GRACE = 60.0
#: Seconds a completion may spend asking the grid for names (all of it, connection included).
COMPLETION_TIMEOUT = 2.0
EXIT_CODES = f"""exit status:
  0  done (cluster create/scale: every VM runs)
  {EXIT_REFUSED}  the grid refused the request, or an argument's value was refused before sending
     (the line names the fault code and the object or argument); a migration or a drain move
     that failed
  {EXIT_USAGE}  the command line is wrong (usage), or no vmwebd reached at --host, or its
     certificate did not verify: nothing was asked of the grid
  {EXIT_STUCK}  cluster create/scale: some VMs cannot come up now (in error, or on a host that is
     not alive); one line per VM names its host, why and what to do (wait for the host, or an
     admin's vmweb host evacuate HOST)
  {EXIT_TIMEOUT}  cluster create/scale: --timeout passed with VMs still coming up (they go on);
     vm migrate, host drain: --timeout passed before the moves finished (they go on)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

--json (before or after the command) prints what the grid answered as JSON on standard output:
the same records as the tables, with every field. Shell completion (bash, zsh):
  eval "$(register-python-argcomplete vmweb)\""""


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """Formats rows as an aligned text table with the given (key, heading) columns."""
    cells = [[h for _, h in cols]] + [
        ["" if r.get(k) is None else str(r.get(k)) for k, _ in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


VM_COLS = [
    ("name", "VM"),
    ("role", "ROLE"),
    ("host", "HOST"),
    ("state", "STATE"),
    ("ip", "IP"),
    ("mac", "MAC"),
    ("vcpus", "VCPUS"),
    ("memory_mib", "MEM(MiB)"),
    ("detail", "DETAIL"),
]
CLUSTER_COLS = [
    ("name", "CLUSTER"),
    ("owner", "OWNER"),
    ("template", "TEMPLATE"),
    ("count", "VMS"),
    ("state", "STATE"),
    ("network", "NETWORK"),
    ("bridge", "BRIDGE"),
]
HOST_COLS = [
    ("id", "HOST"),
    ("liveness", "LIVENESS"),
    ("cpus", "CPUS"),
    ("memory_mib", "MEM(MiB)"),
    ("used_vcpus", "USED VCPUS"),
    ("used_memory_mib", "USED MEM"),
    ("load1", "LOAD"),
    ("vms", "VMS"),
    ("member", "MEMBER"),
    ("draining", "DRAINING"),
    ("api", "API"),
]


def show_cluster(c: dict) -> str:
    head = (
        f"cluster {c['name']}  owner {c['owner']}  template {c['template']}  "
        f"{c['count']} VMs  state {c['state']}  network {c['network']} ({c['bridge']}, id {c['vni']})"
    )
    return head + "\n" + table(c.get("vms") or [], VM_COLS)


# -- argument types: a bad value is a usage error naming the argument (argparse adds the name) --


def count_arg(text: str) -> int:
    """A number of VMs: an integer, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return n


def seconds_arg(text: str) -> float:
    """A timeout: a number of seconds, more than 0."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not s > 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds above 0")
    return s


#: The most records one ``vmweb audit`` asks for (the grid's ListAudit limit).
AUDIT_LIMIT_MAX = 10000


def since_arg(text: str) -> str:
    """A point in time (ISO 8601, local unless zoned; or 90s, 30m, 1h, 2d, 1w back from now),
    sent as an ISO 8601 UTC time."""
    from datetime import datetime, timezone

    from vmwebd.timespec import parse_since

    try:
        when = parse_since(text, time.time(), naive=datetime.now().astimezone().tzinfo)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")


def audit_limit_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= AUDIT_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: must be from 1 to {AUDIT_LIMIT_MAX}")
    return n


# -- completion ----------------------------------------------------------------------------------


def remote_names(operation: str, key: str):
    """An argcomplete completer offering field ``key`` of what ``operation`` lists at the host the
    command line names. It asks with the credentials of the environment or of a credentials file
    (never a prompt), gives up after COMPLETION_TIMEOUT in all, and offers nothing on any error:
    a completion must never hang a shell or print into it."""

    def complete(prefix: str, parsed_args=None, **_) -> list[str]:
        import signal

        class _Late(Exception):
            pass

        def late(*_):
            raise _Late()

        old = None
        try:
            old = signal.signal(signal.SIGALRM, late)
            signal.setitimer(signal.ITIMER_REAL, COMPLETION_TIMEOUT)
            from vmwebd.client import ApiClient

            args = parsed_args or argparse.Namespace()
            host = getattr(args, "host", None) or os.environ.get("VMWEB_HOST", DEFAULT_HOST)
            probe = argparse.Namespace(
                user=getattr(args, "user", None),
                password=getattr(args, "password", None),
                credentials=getattr(args, "credentials", None),
            )
            user, password = credentials(probe, stdin_tty=False)
            ca = getattr(args, "ca", None) or os.environ.get("VMWEB_CA") or None
            client = ApiClient(
                host,
                timeout=COMPLETION_TIMEOUT,
                user=user,
                password=password,
                ca=ca,
                connect_timeout=COMPLETION_TIMEOUT,
            )
            rows = client.call(operation) or []
            return sorted(
                {
                    str(r.get(key))
                    for r in rows
                    if isinstance(r, dict) and r.get(key) and str(r.get(key)).startswith(prefix)
                }
            )
        except BaseException:  # _Late, no host, refused, TLS, anything: offer nothing
            return []
        finally:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if old is not None:
                    signal.signal(signal.SIGALRM, old)
            except (ValueError, OSError):
                pass

    return complete


CLUSTER_NAMES = remote_names("ListClusters", "name")
TEMPLATE_NAMES = remote_names("ListTemplates", "name")
HOST_IDS = remote_names("ListHosts", "id")
USER_NAMES = remote_names("ListUsers", "name")
SETTING_KEYS = remote_names("GetSettings", "key")


def _complete_with(action: argparse.Action, completer) -> argparse.Action:
    action.completer = completer  # read by argcomplete; ignored by argparse
    return action


#: Commands that work on local files only: they print text and take no --json.
LOCAL_ONLY = {("init",), ("user", "bootstrap")}


def _leaf_parsers(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every command that takes no further subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for sub in subs:
        for name, p in sub.choices.items():
            yield from _leaf_parsers(p, path + (name,))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vmweb",
        description="Manage virtual clusters on a vmweb grid.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--version", action="version", version=f"vmweb {version()}", help="print vmweb's version and exit"
    )
    ap.add_argument(
        "--host",
        default=os.environ.get("VMWEB_HOST", DEFAULT_HOST),
        help=f"any vmweb host's user API: https://HOST:PORT, or HOST:PORT for plain HTTP "
        f"(default $VMWEB_HOST or {DEFAULT_HOST})",
    )
    ap.add_argument(
        "--ca",
        metavar="FILE",
        default=os.environ.get("VMWEB_CA"),
        help="CA certificate(s) to check an https host against, e.g. the grid's ca.crt "
        "(default $VMWEB_CA, else the system's trust store)",
    )
    ap.add_argument(
        "--json", action="store_true", help="print JSON for scripts (also accepted after the command)"
    )
    ap.add_argument("--user", help="user name (default $VMWEB_USER, or from --credentials)")
    ap.add_argument(
        "--password",
        help="password (visible to other local users in the process "
        "list: prefer $VMWEB_PASSWORD or --credentials)",
    )
    ap.add_argument(
        "--credentials", metavar="FILE", help="a file of one line user:password (default $VMWEB_CREDENTIALS)"
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("templates", help="list scenario templates")

    cl = sub.add_parser("cluster", help="create, scale, destroy, show or list clusters")
    csub = cl.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("create", help="create a cluster from a template")
    c.add_argument("name", help="the new cluster's name (unique in the grid)")
    _complete_with(
        c.add_argument(
            "--template", required=True, help="the scenario template (vmweb templates lists them)"
        ),
        TEMPLATE_NAMES,
    )
    _complete_with(
        c.add_argument("--owner", required=True, help="the account that owns the cluster"), USER_NAMES
    )
    c.add_argument(
        "--count",
        required=True,
        type=count_arg,
        metavar="N",
        help="how many VMs (at least the template's minimum)",
    )
    c.add_argument("--no-wait", action="store_true", help="return once recorded, without waiting for boot")
    c.add_argument(
        "--timeout",
        type=seconds_arg,
        default=300.0,
        metavar="SECONDS",
        help="seconds to wait for the VMs (default 300); exit 4 when they pass",
    )
    s = csub.add_parser("scale", help="grow or shrink a running cluster")
    _complete_with(s.add_argument("name", help="the cluster"), CLUSTER_NAMES)
    s.add_argument("count", type=count_arg, metavar="N", help="its new number of VMs")
    s.add_argument("--no-wait", action="store_true", help="return once recorded, without waiting for boot")
    s.add_argument(
        "--timeout",
        type=seconds_arg,
        default=300.0,
        metavar="SECONDS",
        help="seconds to wait for the VMs (default 300); exit 4 when they pass",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="power removed VMs off at once (default: ask their guests to shut down, "
        "powered off after the setting stop_timeout_s)",
    )
    d = csub.add_parser("destroy", help="destroy a cluster and give everything back")
    _complete_with(d.add_argument("name", help="the cluster"), CLUSTER_NAMES)
    d.add_argument(
        "--force",
        action="store_true",
        help="power its VMs off at once (default: ask their guests to shut down, "
        "powered off after the setting stop_timeout_s)",
    )
    sh = csub.add_parser("show", help="show a cluster and its VMs")
    _complete_with(sh.add_argument("name", help="the cluster"), CLUSTER_NAMES)
    chs = csub.add_parser(
        "hosts",
        help="print the cluster's hosts file lines (IP FQDN NAME per VM, as its guests' /etc/hosts has them)",
    )
    _complete_with(chs.add_argument("name", help="the cluster"), CLUSTER_NAMES)
    chs.add_argument(
        "--mpi", action="store_true", help="print an MPI hostfile instead: FQDN slots=VCPUS per running VM"
    )
    cll = csub.add_parser("list", help="list clusters (the same as vmweb clusters)")
    _complete_with(cll.add_argument("--owner", help="only this user's clusters"), USER_NAMES)
    ls = sub.add_parser("clusters", help="list clusters")
    _complete_with(ls.add_argument("--owner", help="only this user's clusters"), USER_NAMES)

    sub.add_parser("hosts", help="list physical hosts")
    sub.add_parser("dom", help="print the cluster DOM (XML)")
    sub.add_parser("settings", help="list system settings")
    st = sub.add_parser("set", help="change a system setting (admins)")
    _complete_with(st.add_argument("key", help="the setting (vmweb settings lists them)"), SETTING_KEYS)
    st.add_argument("value", help="its new value")

    ini = sub.add_parser("init", help="create the grid's CA and the first host's certificate (local files)")
    ini.add_argument("--ca-dir", required=True, help="where the CA key and certificate go (keep it safe)")
    ini.add_argument("--host-id", required=True, help="the first host's id, as in its vmwebd.xml")
    ini.add_argument(
        "--cert-dir", required=True, help="the host's certificate directory (its peers/@cert-dir)"
    )
    ini.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="IP",
        help="an IP address of the host, put in its certificate (repeatable)",
    )
    ini.add_argument(
        "--grid-name", default="vmweb", help="the grid's name, in its CA's certificate (default vmweb)"
    )
    ini.add_argument(
        "--admin",
        metavar="NAME",
        help="also make NAME the grid's first admin (with --state-dir; prints a generated password)",
    )
    ini.add_argument("--state-dir", metavar="DIR", help="the first host's state directory (for --admin)")

    host = sub.add_parser("host", help="hosts: add, remove, drain, undrain, evacuate, list")
    hsub = host.add_subparsers(dest="action", required=True, metavar="ACTION")
    ha = hsub.add_parser(
        "add",
        help="issue a new host's certificate (with --ca-dir) and/or make it a "
        "consensus member (with --member)",
    )
    ha.add_argument("host_id", metavar="HOST", help="the new host's id, as in its vmwebd.xml")
    ha.add_argument("--ca-dir", help="the grid CA (from `vmweb init`): issue the host's certificate")
    ha.add_argument("--cert-dir", help="where the new host's certificate goes")
    ha.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="IP",
        help="an IP address of the host, put in its certificate (repeatable)",
    )
    ha.add_argument(
        "--member", action="store_true", help="ask the grid (at --host) to add it to the consensus members"
    )
    hr = hsub.add_parser("remove", help="remove a host from the consensus members")
    _complete_with(hr.add_argument("host_id", metavar="HOST", help="the host"), HOST_IDS)
    hd = hsub.add_parser(
        "drain", help="move every VM off a live host and place no new ones there (admins; for maintenance)"
    )
    _complete_with(hd.add_argument("host_id", metavar="HOST", help="the host"), HOST_IDS)
    hd.add_argument("--no-wait", action="store_true", help="return once the moves are reserved")
    hd.add_argument(
        "--timeout",
        type=seconds_arg,
        default=600.0,
        metavar="SECONDS",
        help="seconds to follow each move (default 600); exit 4 when they pass",
    )
    hu = hsub.add_parser("undrain", help="let a drained host take new VMs again (admins)")
    _complete_with(hu.add_argument("host_id", metavar="HOST", help="the host"), HOST_IDS)
    he = hsub.add_parser(
        "evacuate",
        help="re-place a dead host's VMs on live hosts (admins): they "
        "boot afresh from their base image, same addresses",
    )
    _complete_with(he.add_argument("host_id", metavar="HOST", help="the dead host"), HOST_IDS)
    hsub.add_parser("list", help="list physical hosts (the same as vmweb hosts)")

    us = sub.add_parser("user", help="user accounts: list, create, delete, passwd, quota, key, bootstrap")
    usub = us.add_subparsers(dest="action", required=True, metavar="ACTION")
    usub.add_parser("list", help="accounts (an admin sees all, a user their own)")
    uc = usub.add_parser("create", help="create an account (admins); prints the password if generated")
    uc.add_argument("name", help="the new account's name")
    uc.add_argument(
        "--role",
        choices=["user", "admin"],
        default="user",
        help="user (default: acts on their own clusters) or admin (acts on everything)",
    )
    uc.add_argument(
        "--quota",
        type=count_arg,
        default=16,
        metavar="N",
        help="VMs the user's clusters may hold (default 16)",
    )
    uc.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the new password from standard input (default: generate one)",
    )
    ud = usub.add_parser("delete", help="delete an account that owns no cluster (admins)")
    _complete_with(ud.add_argument("name", help="the account"), USER_NAMES)
    up = usub.add_parser("passwd", help="set a password (one's own, or anyone's for an admin)")
    _complete_with(up.add_argument("name", help="the account"), USER_NAMES)
    up.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the new password from standard input (default: generate one)",
    )
    uk = usub.add_parser("key", help="SSH public keys given to the VMs of one's clusters: add, list, remove")
    uksub = uk.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    who = dict(
        dest="key_user", metavar="U", help="whose keys (default: the user logged in; admins may name anyone)"
    )
    uka = uksub.add_parser("add", help="add the keys of an OpenSSH public key file (one per line)")
    _complete_with(uka.add_argument("--user", **who), USER_NAMES)
    uka.add_argument(
        "file",
        metavar="FILE|-",
        help="a public key file such as ~/.ssh/id_ed25519.pub, or - for standard input",
    )
    ukl = uksub.add_parser("list", help="the keys, with their SHA256 fingerprints")
    _complete_with(ukl.add_argument("--user", **who), USER_NAMES)
    ukr = uksub.add_parser("remove", help="remove a key")
    _complete_with(ukr.add_argument("--user", **who), USER_NAMES)
    ukr.add_argument(
        "key",
        metavar="KEY_OR_FINGERPRINT",
        help="the key's fingerprint (SHA256:..., as `vmweb user key list` shows it) "
        "or its whole OpenSSH line",
    )
    uq = usub.add_parser("quota", help="change a user's quota of VMs (admins)")
    _complete_with(uq.add_argument("name", help="the account"), USER_NAMES)
    uq.add_argument("quota", type=count_arg, metavar="N", help="VMs the user's clusters may hold")
    ub = usub.add_parser(
        "bootstrap",
        help="local: make NAME an admin at the daemon's next start (creates it or resets its password)",
    )
    ub.add_argument("name", help="the admin's account name")
    ub.add_argument(
        "--state-dir", required=True, metavar="DIR", help="the daemon's state directory (state/@dir)"
    )
    ub.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (default: generate one)",
    )

    vm = sub.add_parser("vm", help="start, stop or migrate a VM")
    vsub = vm.add_subparsers(dest="action", required=True, metavar="ACTION")
    for verb, what in (("start", "power a VM on"), ("stop", "power a VM off")):
        v = vsub.add_parser(verb, help=what)
        _complete_with(v.add_argument("cluster", help="the VM's cluster"), CLUSTER_NAMES)
        v.add_argument("vm", help="the VM's name in its cluster (vmweb cluster show lists them)")
        if verb == "stop":
            v.add_argument(
                "--force",
                action="store_true",
                help="power it off at once (default: ask its guest to shut down, "
                "powered off after the setting stop_timeout_s)",
            )
    vmig = vsub.add_parser("migrate", help="move a VM to another host (live where the hosts can)")
    _complete_with(vmig.add_argument("cluster", help="the VM's cluster"), CLUSTER_NAMES)
    vmig.add_argument("vm", help="the VM's name in its cluster (vmweb cluster show lists them)")
    _complete_with(
        vmig.add_argument(
            "--to",
            dest="to",
            default="",
            metavar="HOST",
            help="destination host (default: the least loaded host that fits)",
        ),
        HOST_IDS,
    )
    vmig.add_argument("--no-wait", action="store_true", help="answer once the move is reserved")
    vmig.add_argument(
        "--timeout",
        type=seconds_arg,
        default=600.0,
        metavar="SECONDS",
        help="seconds to follow it (default 600); exit 4 when they pass",
    )
    vcon = vsub.add_parser(
        "console",
        help="the VM's serial console, through whichever host --host names (raw terminal; Ctrl-] leaves)",
    )
    _complete_with(vcon.add_argument("cluster", help="the VM's cluster"), CLUSTER_NAMES)
    vcon.add_argument("vm", help="the VM's name in its cluster (vmweb cluster show lists them)")
    vcon.add_argument(
        "--escape",
        default="^]",
        metavar="KEY",
        help="the key that leaves the console, as ^X (default ^], i.e. Ctrl-])",
    )
    sub.add_parser("migrations", help="list migrations (phase, bytes moved, time, downtime)")
    au = sub.add_parser(
        "audit", help="changes asked of the grid, newest first (an admin sees everyone's, a user their own)"
    )
    _complete_with(
        au.add_argument(
            "--user", dest="audit_user", metavar="USER", help="only this user's records (admins)"
        ),
        USER_NAMES,
    )
    au.add_argument(
        "--since",
        type=since_arg,
        metavar="TIME",
        help="only records from TIME on: an ISO 8601 time (local time unless it names "
        "a zone) or a span back from now: 90s, 30m, 1h, 2d, 1w",
    )
    au.add_argument(
        "--limit",
        type=audit_limit_arg,
        default=100,
        metavar="N",
        help=f"at most N records (1 to {AUDIT_LIMIT_MAX}, default 100)",
    )

    im = sub.add_parser("image", help="base images: add one by content, list them")
    isub = im.add_subparsers(dest="action", required=True, metavar="ACTION")
    isub.add_parser("list", help="images, their hash and the hosts holding them")
    ia = isub.add_parser(
        "add",
        help="register FILE (a path on the host --host names) as image NAME; "
        "other hosts fetch it from there and check its hash",
    )
    ia.add_argument("name", help="the image's name, as templates refer to it")
    ia.add_argument("file", help="the image file, a path on the host --host names")
    ia.add_argument(
        "--format", default="qcow2", choices=("qcow2", "raw"), help="the file's format (default qcow2)"
    )
    ia.add_argument("--kernel", default="", help="boot guests with this kernel (a path on every host)")
    ia.add_argument("--initrd", default="", help="and this initramfs")
    ia.add_argument("--cmdline", default="", help="and this kernel command line")

    # --json after the command too (`vmweb clusters --json`); SUPPRESS keeps a --json given before
    # the command from being reset by the subcommand's default.
    for path, leaf in _leaf_parsers(ap):
        if path not in LOCAL_ONLY:
            leaf.add_argument(
                "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
            )
    return ap


MIGRATION_COLS = [
    ("id", "ID"),
    ("vm", "VM"),
    ("source", "FROM"),
    ("dest", "TO"),
    ("mode", "MODE"),
    ("phase", "PHASE"),
    ("bytes", "BYTES"),
    ("total_ms", "TIME MS"),
    ("downtime_ms", "DOWNTIME MS"),
    ("error", "ERROR"),
    ("waiting", "WAITING ON"),
]
AUDIT_COLS = [
    ("time", "TIME"),
    ("user", "USER"),
    ("op", "OPERATION"),
    ("object", "OBJECT"),
    ("outcome", "OUTCOME"),
    ("host", "HOST"),
    ("detail", "DETAIL"),
]
IMAGE_COLS = [
    ("name", "IMAGE"),
    ("format", "FORMAT"),
    ("size_mib", "SIZE MIB"),
    ("sha", "SHA256"),
    ("holders", "HOSTS"),
]


def evacuated_line(m: dict) -> str:
    """What an evacuation did to one VM: re-placed it, or ended a move to the dead host."""
    if m["mode"] == "evacuate":
        return f"{m['vm']}: now on {m['dest']}, booting afresh from its base image"
    if m["phase"] == "failed":
        return f"{m['vm']}: its move to {m['dest']} failed; {m['source']} restores it from its saved state"
    return f"{m['vm']}: its move to {m['dest']} recorded done there"


def follow_migration(client, m: dict, timeout: float, quiet: bool, out=sys.stderr) -> dict:
    """Polls a migration until it is done or failed, printing each phase and what it waits on
    (when that changes); bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        waiting = m.get("waiting") or ""
        if not quiet and (m["phase"], waiting) != last:
            note = f" (waiting on {waiting})" if waiting else ""
            out.write(f"{m['vm']}: {m['source']} -> {m['dest']} ({m['mode']}): {m['phase']}{note}\n")
            out.flush()
            last = (m["phase"], waiting)
        if m["phase"] in ("done", "failed"):
            return m
        if time.monotonic() > deadline:
            out.write(
                f"vmweb: stopped following after {timeout:.0f} s; the migration goes on (vmweb migrations)\n"
            )
            return m
        time.sleep(0.2)
        m = client.call("GetMigration", m["id"])


def stop_notice(client, what: str, force: bool, quiet: bool, out=sys.stderr) -> float | None:
    """Says how ``what`` (VMs being stopped or removed) will go off; returns the grid's
    ``stop_timeout_s`` (None when the host does not say: an older one)."""
    timeout = None
    for s in client.call("GetSettings") or []:
        if s["key"] == "stop_timeout_s":
            timeout = float(s["value"])
    if not quiet:
        if force:
            out.write(f"{what}: powering off at once (--force)\n")
        elif timeout is not None:
            out.write(
                f"{what}: asking the guest to shut down; powered off if still running "
                f"after {timeout:.0f} s (stop_timeout_s; --force: at once)\n"
            )
        out.flush()
    return timeout


def wait_for_stop(
    client,
    cluster: str,
    vm: dict,
    timeout: float | None,
    quiet: bool,
    out=sys.stderr,
    clock=time.monotonic,
    sleep=time.sleep,
) -> dict:
    """Follows a VM whose guest is still shutting down until its host reports it off (bounded:
    the stop's timeout, and half a minute more for the host to look); a line every 10 s says how
    long it may still take. Returns the VM's last view."""
    limit = timeout if timeout is not None else 60.0
    start = clock()
    said = None
    while vm["state"] == "stopping" and clock() - start < limit + 30.0:
        left = int(max(0.0, limit - (clock() - start)))
        if not quiet and (said is None or said - left >= 10):
            out.write(f"{cluster}/{vm['name']}: still shutting down; powered off in at most {left} s\n")
            out.flush()
            said = left
        sleep(1.0)
        c = client.call("GetCluster", cluster)
        vm = next((v for v in c["vms"] or [] if v["name"] == vm["name"]), vm)
    return vm


def waiting_on(client, name: str) -> str:
    """What a destroy still waits for: VMs on hosts that are not alive, and how to free them."""
    from vmwebd.client import ApiFault

    try:
        vms = client.call("GetCluster", name)["vms"] or []
    except ApiFault:
        return ""  # gone meanwhile
    liveness = {h["id"]: h["liveness"] for h in client.call("ListHosts") or []}
    stuck: dict[str, list[str]] = {}
    for v in vms:
        if liveness.get(v["host"], "unknown") not in ("alive", "suspect"):
            stuck.setdefault(v["host"], []).append(v["name"])
    if not stuck:
        return " (its hosts are still removing its VMs)"
    return "".join(
        f"\n  waiting for host {h} ({liveness.get(h, 'unknown')}): {', '.join(vs)}; if it is "
        f"gone for good, an admin can run: vmweb host evacuate {h}"
        for h, vs in sorted(stuck.items())
    )


def _stuck_line(name: str, v: dict, state: str) -> str:
    """One line for a VM that cannot come up now: which host, why, what to do."""
    h = v["host"]
    if v["desired"] == "absent":
        return (
            f"vmweb: {name}/{v['name']}: being removed by host {h}, which is {state}: wait for "
            f"it to come back, or an admin can run: vmweb host evacuate {h}"
        )
    if v["state"] == "error":
        return (
            f"vmweb: {name}/{v['name']}: failed on host {h}: {v.get('detail') or 'no detail'}; "
            f"host {h} tries again at its next pass (vmweb cluster show {name})"
        )
    return (
        f"vmweb: {name}/{v['name']}: pending on host {h}, which is {state} (not answering): "
        f"wait for host {h} to come back, or an admin can run: vmweb host evacuate {h}"
    )


def wait_for_boot(
    client,
    name: str,
    timeout: float,
    quiet: bool,
    out=sys.stderr,
    stuck_grace: float = STUCK_GRACE,
    clock=time.monotonic,
    sleep=time.sleep,
) -> tuple[dict, int]:
    """Polls the cluster until no VM is pending, showing progress; fires with the cluster and
    an exit status. Stops early (EXIT_STUCK, a line per VM) when what is left cannot come up
    now: VMs in error, and VMs pending on (or being removed by) hosts that are not alive for
    ``stuck_grace`` seconds; and at ``timeout`` in any case (EXIT_TIMEOUT)."""
    deadline = clock() + timeout
    tty = out.isatty()
    last = None
    stuck_since = None

    def end():
        if not quiet and tty:
            out.write("\n")

    while True:
        c = client.call("GetCluster", name)
        every = c["vms"] or []
        vms = [v for v in every if v["desired"] != "absent"]
        up = sum(1 for v in vms if v["state"] == "running")
        errors = [v for v in vms if v["state"] == "error"]
        line = f"{name}: {up}/{len(vms)} VMs running" + (f", {len(errors)} failed" if errors else "")
        if not quiet and line != last:
            out.write(("\r" + line) if tty else line + "\n")
            out.flush()
            last = line
        # What is still coming (VMs pending) or going (VMs being removed).
        waiting = [v for v in every if v["state"] == "pending" or v["desired"] == "absent"]
        if not waiting:
            end()
            for v in errors:
                out.write(_stuck_line(name, v, "alive") + "\n")
            return c, EXIT_STUCK if errors else 0
        liveness = {h["id"]: h["liveness"] for h in client.call("ListHosts") or []}
        away = [v for v in waiting if liveness.get(v["host"], "unknown") != "alive"]
        now = clock()
        if len(away) == len(waiting):
            if stuck_since is None:
                stuck_since = now
                hosts = sorted({v["host"] for v in away})
                if not quiet and stuck_grace > 0:
                    end()
                    out.write(
                        f"vmweb: {len(away)} VMs wait for host(s) {', '.join(hosts)}, not "
                        f"alive; waiting up to {stuck_grace:.0f} s for them to answer or "
                        f"for the grid to place VMs that never ran there elsewhere\n"
                    )
                    last = None
            if now - stuck_since >= stuck_grace:
                end()
                for v in errors + away:
                    out.write(_stuck_line(name, v, liveness.get(v["host"], "unknown")) + "\n")
                return c, EXIT_STUCK
        else:
            stuck_since = None
        if now > deadline:
            end()
            out.write(
                f"vmweb: gave up waiting after {timeout:.0f} s with {len(waiting)} VMs still "
                f"coming up or going (they go on: vmweb cluster show {name})\n"
            )
            for v in waiting:
                state = liveness.get(v["host"], "unknown")
                if state != "alive":
                    out.write(_stuck_line(name, v, state) + "\n")
            return c, EXIT_TIMEOUT
        sleep(0.3)


LOCAL_COMMANDS = ("init",)


def _is_local(args) -> bool:
    return (
        args.cmd in LOCAL_COMMANDS
        or (args.cmd == "host" and args.action == "add" and not args.member)
        or (args.cmd == "user" and args.action == "bootstrap")
    )


def new_password(from_stdin: bool, stdin=None) -> tuple[str, bool]:
    """(password, generated): the first line of standard input, or a fresh random one."""
    if from_stdin:
        return (stdin or sys.stdin).readline().rstrip("\r\n"), False
    from vmwebd.accounts import generate_password

    return generate_password(), True


def credentials(args, env=None, stdin_tty=None) -> tuple[str | None, str | None]:
    """(user, password) from the options, the environment or a credentials file (see the module)."""
    env = os.environ if env is None else env
    user = args.user or env.get("VMWEB_USER")
    password = args.password if args.password is not None else env.get("VMWEB_PASSWORD")
    path = args.credentials or env.get("VMWEB_CREDENTIALS")
    if (user is None or password is None) and path:
        from vmwebd.errors import InvalidArgument

        try:
            line = open(path, encoding="utf-8").readline().rstrip("\r\n")
        except OSError as e:
            raise InvalidArgument("--credentials", f"cannot read {path}: {e.strerror}") from None
        f_user, sep, f_password = line.partition(":")
        if not sep:
            raise InvalidArgument("--credentials", f"{path}: expected one line user:password")
        if user is None or user == f_user:
            user, password = f_user, password if password is not None else f_password
    if user is not None and password is None and (sys.stdin.isatty() if stdin_tty is None else stdin_tty):
        import getpass

        password = getpass.getpass(f"password for {user}: ")
    return user, password


def run_local(args, out=sys.stdout) -> int:
    """Commands that work on local files, not on a daemon (certificates)."""
    from vmwebd.gossip import pki

    if args.cmd == "init":
        ca = pki.init_ca(args.ca_dir, grid_name=args.grid_name)
        host = pki.issue_host_cert(ca.directory, args.host_id, args.cert_dir, args.address)
        out.write(
            f"created the grid CA in {ca.directory} and host {args.host_id}'s certificate in "
            f"{host.directory}\n"
        )
        if args.admin:
            _bootstrap(args.admin, args.state_dir, False, out)
    elif args.cmd == "user" and args.action == "bootstrap":
        _bootstrap(args.name, args.state_dir, args.password_stdin, out)
    elif args.cmd == "host" and args.action == "add":
        host = pki.issue_host_cert(args.ca_dir, args.host_id, args.cert_dir, args.address)
        out.write(
            f"issued host {args.host_id}'s certificate in {host.directory}; copy that directory "
            f"to the host and point its peers/@cert-dir at it\n"
        )
    return 0


def _bootstrap(name: str, state_dir: str, from_stdin: bool, out) -> None:
    from vmwebd.accounts import write_bootstrap_admin

    password, generated = new_password(from_stdin)
    path = write_bootstrap_admin(state_dir, name, password)
    out.write(
        f"wrote {path}: at its next start the daemon makes {name} an admin"
        + (f" with the password {password}\n" if generated else "\n")
    )


SSH_KEY_COLS = [("type", "TYPE"), ("fingerprint", "FINGERPRINT"), ("comment", "COMMENT")]


def read_key_file(path: str, stdin=None) -> list[str]:
    """The checked key lines of an OpenSSH public key file (``-``: standard input);
    InvalidArgument naming the line of a malformed key."""
    from vmwebd.accounts import parse_ssh_key_file
    from vmwebd.errors import InvalidArgument

    if path == "-":
        text = (stdin or sys.stdin).read()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(1 << 20)
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(
                "FILE", f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
            ) from None
    return [k.line for k in parse_ssh_key_file(text, "key")]


def _user_keys(args, client, out, emit) -> int:
    from vmwebd.client import ApiFault

    user = args.key_user or ""
    if args.key_action == "list":
        ks = client.call("ListSshKeys", user) or []
        emit(ks, table(ks, SSH_KEY_COLS) if ks else "no SSH keys")
    elif args.key_action == "add":
        added, lines, failed = [], [], 0
        for line in read_key_file(args.file):
            try:
                k = client.call("AddSshKey", user, line)
            except ApiFault as f:
                if f.code != "Client.SshKeyExists":
                    raise
                lines.append(f"vmweb: {f.code}: {f.message}")
                failed += 1
                continue
            added.append(k)
            lines.append(
                f"added {k['fingerprint']} ({k['type']}{', ' + k['comment'] if k['comment'] else ''})"
            )
        emit(added, "\n".join(lines))
        return EXIT_REFUSED if failed else 0
    elif args.key_action == "remove":
        k = client.call("RemoveSshKey", user, args.key)
        emit(k, f"removed {k['fingerprint']} ({k['type']}{', ' + k['comment'] if k['comment'] else ''})")
    return 0


USER_COLS = [
    ("name", "USER"),
    ("role", "ROLE"),
    ("quota_vms", "QUOTA"),
    ("used_vms", "VMS"),
    ("used_vcpus", "VCPUS"),
    ("used_memory_mib", "MEM(MiB)"),
    ("clusters", "CLUSTERS"),
]


def run(args, client, out=sys.stdout) -> int:
    def emit(obj, text):
        out.write((json.dumps(obj, indent=2, default=str) if args.json else text) + "\n")

    if args.cmd == "templates":
        ts = client.call("ListTemplates")
        rows = [
            {
                **t,
                "roles": ", ".join(
                    f"{r['name']}×{r['count']} ({r['vcpus']} vCPU, {r['memory_mib']} MiB)" for r in t["roles"]
                ),
            }
            for t in ts
        ]
        emit(
            ts,
            table(
                rows,
                [
                    ("name", "TEMPLATE"),
                    ("min_count", "MIN"),
                    ("pool", "POOL"),
                    ("roles", "ROLES"),
                    ("description", "DESCRIPTION"),
                ],
            ),
        )
    elif args.cmd == "cluster" and args.action != "list":
        if args.action == "create":
            c = client.call("CreateCluster", args.name, args.template, args.owner, args.count)
            code = 0
            if not args.no_wait:
                c, code = wait_for_boot(client, args.name, args.timeout, quiet=args.json)
            emit(c, show_cluster(c))
            return code
        elif args.action == "scale":
            now = client.call("GetCluster", args.name)
            going = sum(1 for v in now["vms"] or [] if v["desired"] != "absent") - args.count
            if going > 0:
                stop_notice(client, f"{args.name}: removing {going} VMs", args.force, args.json)
            # force only when given: a host from before the flag knows no such argument
            c = client.call("ScaleCluster", args.name, args.count, *([True] if args.force else []))
            code = 0
            if not args.no_wait:
                c, code = wait_for_boot(client, args.name, args.timeout, quiet=args.json)
            emit(c, show_cluster(c))
            return code
        elif args.action == "destroy":
            stop_notice(client, f"{args.name}: destroying its VMs", args.force, args.json)
            state = client.call("DestroyCluster", args.name, *([True] if args.force else []))
            emit(
                {"name": args.name, "state": state},
                f"cluster {args.name} {state}"
                + (waiting_on(client, args.name) if state != "destroyed" else ""),
            )
        elif args.action == "show":
            c = client.call("GetCluster", args.name)
            emit(c, show_cluster(c))
        elif args.action == "hosts":
            h = client.call("GetClusterHosts", args.name)
            text = (h["mpi"] if args.mpi else h["hosts"]) or ""
            if args.json:
                emit(h, "")
            else:
                out.write(text)
    elif args.cmd == "clusters" or (args.cmd == "cluster" and args.action == "list"):
        cs = client.call("ListClusters", args.owner) or []
        emit(cs, table(cs, CLUSTER_COLS))
    elif args.cmd == "hosts" or (args.cmd == "host" and args.action == "list"):
        hs = client.call("ListHosts") or []
        emit(hs, table(hs, HOST_COLS))
    elif args.cmd == "dom":
        xml = client.call("GetDom")
        emit({"dom": xml}, xml.rstrip())
    elif args.cmd == "settings":
        ss = client.call("GetSettings") or []
        emit(ss, table(ss, [("key", "KEY"), ("value", "VALUE"), ("description", "DESCRIPTION")]))
    elif args.cmd == "set":
        s = client.call("SetSetting", args.key, args.value)
        emit(s, f"{s['key']} = {s['value']}")
    elif args.cmd == "host" and args.action == "drain":
        ms = client.call("DrainHost", args.host_id) or []
        started = [m for m in ms if m["id"]]
        if not args.no_wait:
            started = [follow_migration(client, m, args.timeout, quiet=args.json) for m in started]
        refused = [m for m in ms if not m["id"]]
        lines = [
            f"host {args.host_id} is draining: no new VMs go there (vmweb host undrain "
            f"{args.host_id} ends it)"
        ]
        lines += [
            f"{m['vm']}: {m['phase']} to {m['dest']}" + (f" ({m['error']})" if m["error"] else "")
            for m in started
        ]
        lines += [f"{m['vm']}: not moved now: {m['error']}" for m in refused]
        emit(started + refused, "\n".join(lines))
        if refused or any(m["phase"] == "failed" for m in started):
            return EXIT_REFUSED
        if not args.no_wait and any(m["phase"] != "done" for m in started):
            return EXIT_TIMEOUT  # follow_migration stopped at --timeout; the moves go on
    elif args.cmd == "host" and args.action == "undrain":
        client.call("UndrainHost", args.host_id)
        emit({"host": args.host_id, "draining": False}, f"host {args.host_id} takes new VMs again")
    elif args.cmd == "host" and args.action == "evacuate":
        ms = client.call("EvacuateHost", args.host_id) or []
        lines = [evacuated_line(m) for m in ms]
        emit(ms, "\n".join(lines) if lines else f"host {args.host_id} had no VMs to re-place")
    elif args.cmd == "host":
        op = "AddHost" if args.action == "add" else "RemoveHost"
        members = client.call(op, args.host_id) or []
        emit(members, "consensus members: " + ", ".join(members))
    elif args.cmd == "user":
        if args.action == "list":
            us = client.call("ListUsers") or []
            emit(us, table(us, USER_COLS))
        elif args.action == "create":
            password, generated = new_password(args.password_stdin)
            u = client.call("CreateUser", args.name, password, args.role, args.quota)
            shown = {**u, "password": password} if generated else u
            emit(shown, table([u], USER_COLS) + (f"\npassword: {password}" if generated else ""))
        elif args.action == "delete":
            client.call("DeleteUser", args.name)
            emit({"name": args.name, "deleted": True}, f"user {args.name} deleted")
        elif args.action == "passwd":
            password, generated = new_password(args.password_stdin)
            client.call("SetPassword", args.name, password)
            emit(
                {"name": args.name, **({"password": password} if generated else {})},
                f"password of {args.name} changed" + (f": {password}" if generated else ""),
            )
        elif args.action == "key":
            return _user_keys(args, client, out, emit)
        elif args.action == "quota":
            u = client.call("SetQuota", args.name, args.quota)
            emit(u, table([u], USER_COLS))
    elif args.cmd == "vm" and args.action == "migrate":
        m = client.call("MigrateVm", args.cluster, args.vm, args.to)
        if not args.no_wait:
            m = follow_migration(client, m, args.timeout, quiet=args.json)
        text = table([m], MIGRATION_COLS)
        if m["phase"] == "failed":
            emit(m, text)
            out.flush()
            print(
                f"vmweb: Server.MigrationFailed: {m['vm']} stays on {m['source']}: {m['error']}",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        emit(m, text)
        if not args.no_wait and m["phase"] != "done":
            return EXIT_TIMEOUT  # follow_migration stopped at --timeout; the move goes on
    elif args.cmd == "vm" and args.action == "stop":
        timeout = stop_notice(client, f"{args.cluster}/{args.vm}", args.force, args.json)
        v = client.call("StopVm", args.cluster, args.vm, *([True] if args.force else []))
        v = wait_for_stop(client, args.cluster, v, timeout, quiet=args.json)
        emit(v, table([v], VM_COLS))
    elif args.cmd == "vm":
        v = client.call("StartVm", args.cluster, args.vm)
        emit(v, table([v], VM_COLS))
    elif args.cmd == "migrations":
        ms = client.call("ListMigrations") or []
        emit(ms, table(ms, MIGRATION_COLS))
    elif args.cmd == "audit":
        recs = client.call("ListAudit", args.audit_user or "", args.since or "", args.limit) or []
        rows = [
            {**r, "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((r["at"] or 0) / 1000))}
            for r in recs
        ]
        emit(recs, table(rows, AUDIT_COLS))
    elif args.cmd == "image":
        if args.action == "add":
            path = os.path.abspath(args.file)
            i = client.call("AddImage", args.name, path, args.format, args.kernel, args.initrd, args.cmdline)
            items = [i]
        else:
            items = client.call("ListImages") or []
        rows = [
            {**i, "sha": (i["sha256"] or "")[:16] or "(blank)", "holders": ", ".join(i["hosts"] or [])}
            for i in items
        ]
        emit(items[0] if args.action == "add" else items, table(rows, IMAGE_COLS))
    return 0


def escape_key(text: str) -> bytes:
    """The byte of ``^X`` (a control key: ``^]`` is 0x1d), or of one plain character."""
    if len(text) == 2 and text[0] == "^" and 0x3F <= ord(text[1].upper()) <= 0x5F:
        return bytes([ord(text[1].upper()) ^ 0x40])
    if len(text) == 1 and ord(text) < 0x80:
        return text.encode()
    raise ValueError(f"--escape {text!r}: give ^X (a control key such as ^]) or one ASCII character")


def console_loop(conn, escape: bytes, stdin_fd: int, out, err) -> int:
    """Copies the terminal's keys to the console and its output to ``out`` (a binary file)
    until ``escape`` is typed (exit 0), the console ends (0) or is refused (1). The terminal
    is put in raw mode (every key goes to the guest, Ctrl-C included, as with ``virsh console``)
    and restored on every way out: the escape, the console's end, an error, a signal."""
    import select
    import signal
    import threading

    is_tty = os.isatty(stdin_fd)
    saved = None
    if is_tty:
        import termios
        import tty

        saved = termios.tcgetattr(stdin_fd)
    wake_r, wake_w = os.pipe()
    result = {"code": 0, "line": ""}

    def reader():
        try:
            while True:
                kind, data = conn.recv()
                if kind == "output":
                    out.write(data)
                    out.flush()
                elif kind == "ready":
                    continue
                else:
                    if kind == "error":
                        result["code"], result["line"] = EXIT_REFUSED, f"vmweb: {conn.code}: {data}"
                    elif data:
                        result["line"] = f"vmweb: {data}"
                    return
        except OSError as e:  # the terminal went away
            result["line"] = f"vmweb: the console output could not be written: {e.strerror}"
        finally:
            os.write(wake_w, b"x")

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    handlers = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    thread = threading.Thread(target=reader, name="console output", daemon=True)
    try:
        if saved is not None:
            tty.setraw(stdin_fd)
            err.write(f"Connected to the console of {conn.what}; {args_escape_name(escape)} leaves.\r\n")
            err.flush()
        thread.start()
        while True:
            ready, _, _ = select.select([stdin_fd, wake_r], [], [])
            if wake_r in ready:
                break
            data = os.read(stdin_fd, 4096)
            if not data:  # standard input ended (not a terminal): leave
                break
            if escape in data:
                before = data[: data.index(escape)]
                if before:
                    conn.send(before)
                break
            conn.send(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        for sig, old in handlers.items():
            signal.signal(sig, old)
        conn.close()
        thread.join(5)
        os.close(wake_r)
        os.close(wake_w)
    if result["line"]:
        err.write(("\n" if is_tty else "") + result["line"] + "\n")
    return result["code"]


def args_escape_name(escape: bytes) -> str:
    return f"Ctrl-{chr(escape[0] ^ 0x40)}" if escape[0] < 0x20 else repr(escape.decode())


def run_console(args, user, password) -> int:
    """``vmweb vm console CLUSTER VM``: see :func:`console_loop`."""
    from vmwebd.client import ApiTlsError, ConsoleConnection, ConsoleRefused

    try:
        escape = escape_key(args.escape)
    except ValueError as e:
        print(f"vmweb: argument {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        conn = ConsoleConnection(
            args.host, args.cluster, args.vm, user=user, password=password, ca=args.ca or None
        )
    except (ValueError, FileNotFoundError) as e:
        arg = "--ca" if isinstance(e, FileNotFoundError) else "--host"
        print(f"vmweb: argument {arg}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ApiTlsError as e:
        print(f"vmweb: {e}; give --ca FILE or set VMWEB_CA to the CA that issued it", file=sys.stderr)
        return EXIT_USAGE
    except ConsoleRefused as e:
        hint = (
            "; give --user, or set VMWEB_USER and VMWEB_PASSWORD, or VMWEB_CREDENTIALS"
            if e.code == "Client.NotAuthorized" and user is None
            else ""
        )
        print(f"vmweb: {e.code}: {e.message}{hint}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as e:
        print(
            f"vmweb: cannot reach vmwebd at {args.host} ({e.strerror or type(e).__name__}); "
            f"give --host HOST:PORT or set VMWEB_HOST",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return console_loop(conn, escape, sys.stdin.fileno(), sys.stdout.buffer, sys.stderr)
    except KeyboardInterrupt:  # standard input is not a terminal: Ctrl-C reached us
        return EXIT_INTERRUPTED


def check_combinations(ap: argparse.ArgumentParser, args) -> None:
    """Usage errors argparse cannot see alone, found before anything is done (exit 2), shown
    with the command's own usage line."""
    leaves = dict(_leaf_parsers(ap))
    if args.cmd == "init" and args.admin and not args.state_dir:
        leaves[("init",)].error("argument --admin: needs --state-dir DIR (the first host's state directory)")
    if args.cmd == "host" and args.action == "add":
        add = leaves[("host", "add")]
        if not args.member and not (args.ca_dir or args.cert_dir):
            add.error(
                "give --ca-dir and --cert-dir (issue a certificate) and/or --member (make it "
                "a consensus member)"
            )
        if bool(args.ca_dir) != bool(args.cert_dir):
            missing = "--cert-dir" if args.ca_dir else "--ca-dir"
            add.error(
                f"argument {missing}: needed to issue a certificate (give both --ca-dir and --cert-dir)"
            )


def _fail(e) -> int:
    """One line for a VmwebError (a refused argument, a local command that failed)."""
    print(f"vmweb: {e.faultcode}: {e}", file=sys.stderr)
    return EXIT_REFUSED


def main(argv=None) -> int:
    ap = build_parser()
    try:
        import argcomplete
    except ImportError:  # completion is a convenience: the command works without it
        pass
    else:
        argcomplete.autocomplete(ap)  # returns at once unless the shell asks for completions
    args = ap.parse_args(argv)
    check_combinations(ap, args)
    from vmwebd.errors import VmwebError

    if args.cmd == "host" and args.action == "add" and args.member and args.ca_dir:
        try:
            run_local(args)
        except VmwebError as e:
            return _fail(e)
    if _is_local(args):
        try:
            return run_local(args)
        except VmwebError as e:
            return _fail(e)
    import requests

    from vmwebd.client import ApiClient, ApiFault, ApiTlsError

    try:
        user, password = credentials(args)
    except VmwebError as e:
        return _fail(e)
    if args.cmd == "vm" and args.action == "console":
        return run_console(args, user, password)
    try:
        try:
            client = ApiClient(args.host, user=user, password=password, ca=args.ca or None)
        except (ValueError, FileNotFoundError) as e:  # a malformed --host, a missing --ca file
            arg = "--ca" if isinstance(e, FileNotFoundError) else "--host"
            print(f"vmweb: argument {arg}: {e}", file=sys.stderr)
            return EXIT_USAGE
        return run(args, client)
    except ApiTlsError as e:
        hint = (
            "; give --ca FILE or set VMWEB_CA to the CA that issued it (a grid's ca.crt)"
            if e.certificate
            else "; does the host serve https on that port?"
        )
        print(f"vmweb: {e}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except ApiFault as f:
        hint = (
            "; give --user, or set VMWEB_USER and VMWEB_PASSWORD, or VMWEB_CREDENTIALS"
            if f.code == "Client.NotAuthorized" and user is None
            else ""
        )
        print(f"vmweb: {f.code}: {f.message}{hint}", file=sys.stderr)
        return EXIT_REFUSED
    except VmwebError as e:  # checked here before anything is sent (a key file)
        return _fail(e)
    except requests.exceptions.RequestException as e:
        tls_hint = "" if args.host.startswith("https://") else " (https://HOST:PORT if it serves TLS)"
        print(
            f"vmweb: cannot reach vmwebd at {args.host} ({type(e).__name__}); "
            f"give --host HOST:PORT{tls_hint} or set VMWEB_HOST",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
