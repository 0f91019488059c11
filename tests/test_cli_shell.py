"""The ``vmweb`` command line as a shell user meets it: --version, help, --json, exit statuses,
completion, and a start that loads no server code."""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import time

import pytest

from procs import ADMIN, REPO, Daemon, child_env, host_config
from vmwebd import __version__, cli, version


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m vmwebd.cli ARGS`` to completion (bounded), with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "vmwebd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env=child_env(**env),
    )


# -- what the CLI loads ---------------------------------------------------------------------------

SERVER_MODULES = (
    "spyne",
    "libvirt",
    "twisted",
    "vmwebd.api",
    "vmwebd.node",
    "vmwebd.hv",
    "vmwebd.gossip",
    "vmwebd.dom",
    "vmwebd.auth",
    "vmwebd.app",
)

PROBE = """
import json, sys
import vmwebd.cli
vmwebd.cli.build_parser().format_help()
code = vmwebd.cli.main(["--host", sys.argv[1], "clusters"])    # the whole path of a remote command
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def test_cli_imports_no_server_code():
    """Importing the CLI and running a remote command to its end loads no spyne, libvirt or
    Twisted (twisted.web included) and none of the daemon's own modules."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused at once
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, host],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=child_env(),
        )
    got = json.loads(proc.stdout)
    assert got["code"] == cli.EXIT_USAGE, proc.stderr
    loaded = [m for m in got["modules"] if any(m == bad or m.startswith(bad + ".") for bad in SERVER_MODULES)]
    assert loaded == [], loaded
    assert "twisted.web" not in got["modules"] and "spyne" not in got["modules"]


# -- --version ------------------------------------------------------------------------------------


def test_version_of_both_commands():
    """`vmweb --version` and `vmwebd --version` print the package's version and exit 0."""
    assert version() == __version__  # the installed metadata agrees with the source
    cl = run_cli("--version")
    assert (cl.returncode, cl.stdout) == (0, f"vmweb {__version__}\n"), cl
    d = subprocess.run(
        [sys.executable, "-m", "vmwebd.daemon", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=child_env(),
    )
    assert (d.returncode, d.stdout) == (0, f"vmwebd {__version__}\n"), d


def test_version_falls_back_to_the_source(monkeypatch):
    """Without installed metadata (a source tree never installed), version() is __version__."""
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert version() == __version__


# -- help -----------------------------------------------------------------------------------------


def walk(parser: argparse.ArgumentParser, path=("vmweb",)):
    """(command path, parser) for the parser and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert name in helped, f"{' '.join(path)} {name} has no help line"
                yield from walk(sub, path + (name,))


def test_every_argument_has_help():
    """Every option and positional of every command says what it is in --help."""
    missing = [
        f"{' '.join(path)} {a.option_strings or a.dest}"
        for path, p in walk(cli.build_parser())
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction) and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_help_lists_every_exit_status():
    """`vmweb --help` lists each exit status the CLI uses, and how to turn on completion."""
    text = cli.build_parser().format_help()
    for code in (0, cli.EXIT_REFUSED, cli.EXIT_USAGE, cli.EXIT_STUCK, cli.EXIT_TIMEOUT, cli.EXIT_INTERRUPTED):
        assert f"\n  {code}  " in text, code
    assert 'eval "$(register-python-argcomplete vmweb)"' in text


# -- usage errors: exit 2, naming the argument ------------------------------------------------------


@pytest.mark.parametrize(
    "argv, named",
    [
        (["cluster", "create", "c", "--template", "t", "--owner", "o", "--count", "-1"], "--count"),
        (["cluster", "create", "c", "--template", "t", "--owner", "o", "--count", "many"], "--count"),
        (["cluster", "scale", "c", "x"], "N"),
        (
            ["cluster", "create", "c", "--template", "t", "--owner", "o", "--count", "2", "--timeout", "0"],
            "--timeout",
        ),
        (["vm", "migrate", "c", "v", "--timeout", "soon"], "--timeout"),
        (["user", "quota", "alice", "-3"], "N"),
        (["init", "--ca-dir", "a", "--host-id", "h", "--cert-dir", "c", "--admin", "bob"], "--admin"),
        (["host", "add", "h2", "--ca-dir", "a"], "--cert-dir"),
        (["host", "add", "h2"], "--member"),
        (["--host", "ftp://x", "clusters"], "--host"),
        (["--ca", "/nonexistent/ca.crt", "--host", "https://127.0.0.1:1", "clusters"], "--ca"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(argv, named, tmp_path, capsys):
    """A malformed value or a missing companion option is a usage error (exit 2) whose message
    names the argument, found before anything is done (no CA written, no host dialled)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert named in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# -- --json ---------------------------------------------------------------------------------------


class FakeClient:
    """Answers operations from a table; records the calls."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls = []

    def call(self, operation, *args):
        self.calls.append((operation, *args))
        answer = self.answers[operation]
        return answer(*args) if callable(answer) else answer


VM = {
    "name": "compute0",
    "role": "compute",
    "host": "host1",
    "state": "running",
    "ip": "10.77.1.2",
    "mac": "52:54:00:00:00:01",
    "vcpus": 2,
    "memory_mib": 1024,
    "detail": None,
    "desired": "running",
}
CLUSTER = {
    "name": "lab1",
    "owner": "alice",
    "template": "hpc",
    "count": 1,
    "state": "running",
    "network": "lab",
    "bridge": "vmbr100",
    "vni": 100,
    "vms": [VM],
}
ANSWERS = {
    "ListTemplates": [
        {
            "name": "hpc",
            "min_count": 2,
            "pool": "lab",
            "description": "an HPC cluster",
            "roles": [{"name": "head", "count": 1, "vcpus": 2, "memory_mib": 2048}],
        }
    ],
    "ListClusters": [{k: v for k, v in CLUSTER.items() if k != "vms"}],
    "GetCluster": CLUSTER,
    "ListHosts": [
        {
            "id": "host1",
            "liveness": "alive",
            "cpus": 16,
            "memory_mib": 32768,
            "used_vcpus": 2,
            "used_memory_mib": 1024,
            "load1": 0.5,
            "vms": 1,
            "member": True,
            "draining": False,
            "api": "http://127.0.0.1:8470",
        }
    ],
    "ListUsers": [
        {
            "name": "alice",
            "role": "user",
            "quota_vms": 16,
            "used_vms": 1,
            "used_vcpus": 2,
            "used_memory_mib": 1024,
            "clusters": 1,
        }
    ],
    "ListSshKeys": [
        {
            "type": "ssh-ed25519",
            "fingerprint": "SHA256:abc",
            "comment": "alice@lab",
            "key": "ssh-ed25519 AAAA alice@lab",
        }
    ],
    "ListMigrations": [
        {
            "id": "m1",
            "vm": "lab1/compute0",
            "source": "host1",
            "dest": "host2",
            "mode": "live",
            "phase": "done",
            "bytes": 1 << 20,
            "total_ms": 900,
            "downtime_ms": 30,
            "error": None,
        }
    ],
    "ListImages": [
        {
            "name": "debian-12",
            "format": "qcow2",
            "size_mib": 2048,
            "sha256": "ab" * 32,
            "hosts": ["host1", "host2"],
        }
    ],
    "GetSettings": [{"key": "placement", "value": "spread", "description": "where new VMs go"}],
}
LISTINGS = [
    (["templates"], "ListTemplates", "hpc"),
    (["clusters"], "ListClusters", "lab1"),
    (["cluster", "list"], "ListClusters", "lab1"),
    (["cluster", "show", "lab1"], "GetCluster", "compute0"),
    (["hosts"], "ListHosts", "host1"),
    (["host", "list"], "ListHosts", "host1"),
    (["user", "list"], "ListUsers", "alice"),
    (["user", "key", "list"], "ListSshKeys", "SHA256:abc"),
    (["migrations"], "ListMigrations", "lab1/compute0"),
    (["image", "list"], "ListImages", "debian-12"),
    (["settings"], "GetSettings", "placement"),
]


@pytest.mark.parametrize("argv, operation, shown", LISTINGS, ids=[" ".join(a) for a, _, _ in LISTINGS])
def test_every_listing_prints_json_with_the_tables_data(argv, operation, shown):
    """Each listing prints a table by default and, with --json before or after the command, the
    records the grid answered as JSON on standard output."""
    ap = cli.build_parser()
    text = io.StringIO()
    assert cli.run(ap.parse_args(argv), FakeClient(ANSWERS), out=text) == 0
    assert shown in text.getvalue() and not text.getvalue().lstrip().startswith(("[", "{"))
    for args in (["--json", *argv], [*argv, "--json"]):
        out = io.StringIO()
        assert cli.run(ap.parse_args(args), FakeClient(ANSWERS), out=out) == 0
        assert json.loads(out.getvalue()) == ANSWERS[operation], args


def test_every_command_but_local_ones_takes_json_after_it():
    """`--json` is accepted after every command that asks the grid, not only before it."""
    without = [
        path
        for path, p in cli._leaf_parsers(cli.build_parser())
        if "--json" not in p._option_string_actions and path not in cli.LOCAL_ONLY
    ]
    assert without == []
    assert cli.build_parser().parse_args(["clusters"]).json is False


# -- exit statuses of commands that follow moves ------------------------------------------------------


class FakeTime:
    """A clock for follow_migration: sleeping advances it, nothing waits."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


def migration(phase: str, error=None, id="m1") -> dict:
    return {
        "id": id,
        "vm": "lab1/compute0",
        "source": "host1",
        "dest": "host2",
        "mode": "live",
        "phase": phase,
        "bytes": 0,
        "total_ms": 0,
        "downtime_ms": 0,
        "error": error,
    }


@pytest.mark.parametrize(
    "final, code", [("done", 0), ("failed", cli.EXIT_REFUSED), ("copying", cli.EXIT_TIMEOUT)]
)
def test_vm_migrate_exit_status(final, code, monkeypatch):
    """`vm migrate` exits 0 when the move is done, 1 when it failed, 4 when --timeout passes
    while it goes on."""
    monkeypatch.setattr(cli, "time", FakeTime())
    client = FakeClient(
        {
            "MigrateVm": migration("reserved"),
            "GetMigration": migration(final, "no room" if final == "failed" else None),
        }
    )
    args = cli.build_parser().parse_args(["vm", "migrate", "lab1", "compute0", "--timeout", "5"])
    assert cli.run(args, client, out=io.StringIO()) == code


def test_vm_migrate_says_what_a_move_waits_on_when_that_changes(monkeypatch):
    """Each phase is printed once, with what the move waits on; a change of that (its host
    found dead) is printed too, so a stuck move says why and what can be done."""
    monkeypatch.setattr(cli, "time", FakeTime())
    prepare = {**migration("prepare"), "waiting": "host host2 to prepare"}
    dead = {**prepare, "waiting": "host host2 to prepare; it is dead as host host1 sees it"}
    follow = cli.follow_migration
    seen = iter([prepare, prepare, dead, dead, migration("done")])

    class Client:
        def call(self, op, *args):
            assert op == "GetMigration"
            return next(seen)

    err = io.StringIO()
    m = follow(Client(), prepare, timeout=60, quiet=False, out=err)
    assert m["phase"] == "done"
    assert err.getvalue().splitlines() == [
        "lab1/compute0: host1 -> host2 (live): prepare (waiting on host host2 to prepare)",
        "lab1/compute0: host1 -> host2 (live): prepare (waiting on host host2 to prepare; it is dead as "
        "host host1 sees it)",
        "lab1/compute0: host1 -> host2 (live): done",
    ]


def test_host_evacuate_says_what_became_of_each_vm():
    """Re-placed VMs boot afresh; a move to the dead host that it held is failed (its source
    restores the VM) or, restored there already, recorded done before its VM is re-placed."""
    moves = [
        {**migration("failed"), "vm": "lab1/a", "mode": "cold", "source": "host1", "dest": "host3"},
        {**migration("done"), "vm": "lab1/b", "mode": "cold", "source": "host1", "dest": "host3"},
        {**migration("done"), "vm": "lab1/b", "mode": "evacuate", "source": "host3", "dest": "host2"},
    ]
    out = io.StringIO()
    args = cli.build_parser().parse_args(["host", "evacuate", "host3"])
    assert cli.run(args, FakeClient({"EvacuateHost": moves}), out=out) == 0
    assert out.getvalue().splitlines() == [
        "lab1/a: its move to host3 failed; host1 restores it from its saved state",
        "lab1/b: its move to host3 recorded done there",
        "lab1/b: now on host2, booting afresh from its base image",
    ]


@pytest.mark.parametrize(
    "answers, code",
    [
        ({"DrainHost": [migration("reserved")], "GetMigration": migration("done")}, 0),
        ({"DrainHost": [migration("reserved")], "GetMigration": migration("copying")}, cli.EXIT_TIMEOUT),
        (
            {"DrainHost": [migration("reserved")], "GetMigration": migration("failed", "no room")},
            cli.EXIT_REFUSED,
        ),
        ({"DrainHost": [migration("reserved", "no host fits", id="")]}, cli.EXIT_REFUSED),
    ],
)
def test_host_drain_exit_status(answers, code, monkeypatch):
    """`host drain` exits 0 when every move is done, 1 when one was refused or failed, 4 when
    --timeout passes with moves still going."""
    monkeypatch.setattr(cli, "time", FakeTime())
    args = cli.build_parser().parse_args(["host", "drain", "host1", "--timeout", "5"])
    assert cli.run(args, FakeClient(answers), out=io.StringIO()) == code


# -- completion -----------------------------------------------------------------------------------


def complete(line: str, tmp_path, **env: str) -> tuple[list[str], float]:
    """What bash completion offers for ``line`` (the cursor at its end), and how long it took."""
    out = tmp_path / "completions"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "vmwebd.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env=child_env(
            _ARGCOMPLETE="1",
            COMP_LINE=line,
            COMP_POINT=str(len(line)),
            _ARGCOMPLETE_STDOUT_FILENAME=str(out),
            **env,
        ),
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    return [w.strip() for w in out.read_text().split("\013") if w.strip()], took


def test_completion_of_commands_and_options(tmp_path):
    """Completion offers the commands and the options of a command, without asking any host."""
    assert complete("vmweb clu", tmp_path)[0] == ["cluster", "clusters"]
    assert complete("vmweb cluster s", tmp_path)[0] == ["scale", "show"]
    assert "--json" in complete("vmweb clusters --j", tmp_path)[0]
    assert "--template" in complete("vmweb cluster create lab1 --te", tmp_path)[0]


@pytest.fixture
def silent_host():
    """A loopback address that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_name_completion_is_bounded_and_silent(silent_host, tmp_path):
    """Completing a cluster name at a host that never answers gives up within
    COMPLETION_TIMEOUT, offers no name, prints nothing and exits 0 (the shell keeps going)."""
    words, took = complete("vmweb cluster show ", tmp_path, VMWEB_HOST=silent_host)
    assert not [w for w in words if not w.startswith("-")], words
    assert took < cli.COMPLETION_TIMEOUT + 5, took
    started = time.monotonic()
    assert cli.CLUSTER_NAMES("", parsed_args=argparse.Namespace(host=silent_host)) == []
    assert time.monotonic() - started < cli.COMPLETION_TIMEOUT + 1


def test_name_completion_offers_nothing_when_unreachable_or_malformed():
    """A refused connection or a malformed --host gives no names and no error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"
        assert cli.HOST_IDS("", parsed_args=argparse.Namespace(host=refused)) == []
    assert cli.HOST_IDS("", parsed_args=argparse.Namespace(host="ftp://x")) == []


@pytest.mark.slow
def test_name_completion_from_a_real_host(tmp_path):
    """With credentials in the environment, completion offers the host's templates and hosts."""
    config, port = host_config(tmp_path / "host1")
    d = Daemon(config, api_port=port)
    try:
        d.start()
        env = dict(VMWEB_HOST=d.address, VMWEB_USER=ADMIN[0], VMWEB_PASSWORD=ADMIN[1])
        words, _ = complete("vmweb cluster create lab1 --template h", tmp_path, **env)
        assert words == ["hpc"], words
        words, _ = complete("vmweb host drain ", tmp_path, **env)
        assert "host1" in words, words
        words, _ = complete("vmweb host drain ", tmp_path, VMWEB_HOST=d.address)  # no credentials
        assert "host1" not in words
    finally:
        d.close()
