"""Real ``vmwebd`` processes for tests: free ports, a systemd notify socket, bounded waits.

:class:`Daemon` starts ``python -m vmwebd.daemon --config PATH`` with ``NOTIFY_SOCKET`` pointing
at a datagram socket the test owns, so readiness is the daemon's own ``READY=1`` (no sleeps, no
polling of the port). Every wait has a visible deadline; the daemon's log goes to a file next to
its config so a failing test can show it.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
READY_TIMEOUT = 60.0
_serial = itertools.count(1)
STOP_TIMEOUT = 30.0


# -- ports for daemons ----------------------------------------------------------------------------
# A daemon's config names its ports before it starts (its peers' configs list them), so a test
# cannot let it bind port 0. Binding port 0 and closing, then handing the port over, races with
# everything else that takes ports in between: the kernel gives that same range to every outgoing
# connection (clients, the daemons' peer links) and to other test runs on the machine. So ports
# are taken from below the kernel's ephemeral range, where no outgoing connection lands, each one
# reserved with a lock file held for the life of this test process (a concurrent test run skips
# it; the lock goes when the process does), never handed out twice, and checked free by a bind.
PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "vmweb-test-ports"
_PORT_TRIES = 200
_reserved: dict[int, object] = {}  # port -> its open lock file (kept open: the lock holds)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reserve(port: int) -> bool:
    import fcntl

    PORT_LOCK_DIR.mkdir(mode=0o1777, exist_ok=True)
    f = open(PORT_LOCK_DIR / str(port), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            f.close()
            return False
    _reserved[port] = f
    return True


def free_port(rng=None) -> int:
    """A loopback TCP port for a daemon to listen on: below the ephemeral range, reserved for
    this test process, never returned twice, free when checked. Fails after a bounded number
    of tries (each try is one candidate port)."""
    import random

    rng = rng or random.SystemRandom()
    high = min(_ephemeral_low(), 65536) - 1
    low = max(1024, high - 20000)
    for _ in range(_PORT_TRIES):
        port = rng.randint(low, high)
        if port not in _reserved and _reserve(port):
            return port
    raise RuntimeError(f"no free port found in {low}-{high} after {_PORT_TRIES} tries")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child python: this one, the repo importable, plus ``extra``."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # never let a child notify whatever started the tests
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class NotifySocket:
    """A bound AF_UNIX datagram socket playing systemd's side of sd_notify(3).

    Bound in ``directory`` unless that path is too long for ``sun_path``, then in a short
    temporary directory (removed by :meth:`close`).
    """

    def __init__(self, directory: Path):
        self._short = None
        name = f"notify-{next(_serial)}.sock"  # unique: a restarted daemon gets a fresh socket
        path = Path(directory) / name
        if len(str(path)) > SUN_PATH_MAX:
            self._short = tempfile.mkdtemp(prefix="vmwn")
            path = Path(self._short) / name
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = READY_TIMEOUT, alive=lambda: True
    ) -> dict[str, str]:
        """Receives datagrams until one assigns ``key`` (= ``value`` if given); returns it.

        Raises TimeoutError after ``timeout`` seconds, or RuntimeError as soon as ``alive()`` is
        false (the sender exited, so nothing more will come)."""
        for msg in self.messages:
            if key in msg and (value is None or msg[key] == value):
                return msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key} notification within {timeout} s; got {self.messages}")
            # A short slice, so a sender that died is noticed promptly instead of at the deadline.
            self.sock.settimeout(min(left, 0.25))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if not alive():
                    raise RuntimeError(f"the sender exited before {key}; got {self.messages}") from None
                continue
            msg = dict(line.partition("=")[::2] for line in data.decode().splitlines() if line)
            self.messages.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()
        if self._short:
            shutil.rmtree(self._short, ignore_errors=True)
        else:
            Path(self.path).unlink(missing_ok=True)


class Daemon:
    """One ``vmwebd`` process on ``config``, started by :meth:`start`, always ended by :meth:`close`."""

    def __init__(
        self,
        config: Path,
        fsync: bool = False,
        api_port: int | None = None,
        scheme: str = "http",
        own_session: bool = False,
    ):
        self.config = Path(config)
        self.own_session = own_session  # its own process group (see bench/scale.py)
        self.fsync = fsync
        self.api_port = api_port
        self.scheme = scheme  # "https" when the config says api-tls="grid" or "files"
        self.log_path = self.config.parent / "vmwebd.log"
        self.proc: subprocess.Popen | None = None
        self.notify: NotifySocket | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, or ``https://`` for a daemon serving its API over TLS."""
        return f"{self.scheme}://{self.address}"

    def start(self, wait: bool = True) -> "Daemon":
        """Starts the process; with ``wait``, returns once it has sent READY=1."""
        self.notify = NotifySocket(self.config.parent)
        cmd = [sys.executable, "-m", "vmwebd.daemon", "--config", str(self.config)]
        if not self.fsync:
            cmd.append("--no-fsync")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(NOTIFY_SOCKET=self.notify.path),
                cwd=REPO,
                start_new_session=self.own_session,
            )
        if wait:
            self.wait_ready()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Waits (bounded) for READY=1; fails with the daemon's log if it exits first."""
        try:
            return self.notify.wait_for("READY", "1", timeout, alive=self.alive)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{e}\n--- {self.log_path} ---\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then waits (bounded) for the exit; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of this process."""
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Kills the process if it still runs and closes the notify socket (idempotent)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None


def host_config(
    directory: Path, host_id: str = "host1", cpus: int = 16, memory_mib: int = 32768, **kw
) -> tuple[Path, int]:
    """Writes a host directory (see vmwebd.demo.write_host_config) on free ports, with the test
    admin's bootstrap file in its state dir; returns (config, api port)."""
    from vmwebd.demo import write_host_config

    api_port = free_port()
    cfg = write_host_config(Path(directory), host_id, api_port, free_port(), cpus, memory_mib, **kw)
    bootstrap_admin(Path(directory) / "state")
    return cfg, api_port


# -- users for tests ------------------------------------------------------------------------------
ADMIN = ("admin", "admin-test-password")
#: Accounts the tests create clusters for; each one's password is ``password_of(name)``.
TEST_USERS = ("alice", "bob", "carol", "dave")


def password_of(name: str) -> str:
    return f"{name}-test-password"


@functools.lru_cache(maxsize=None)
def password_hash(password: str) -> str:
    """scrypt is slow on purpose: hash each test password once per test run."""
    from vmwebd.accounts import hash_password

    return hash_password(password)


def bootstrap_admin(state_dir: Path) -> Path:
    """Writes ``<state_dir>/bootstrap-admin`` for the test admin (what `vmweb user bootstrap` does)."""
    from vmwebd.accounts import BOOTSTRAP_FILE

    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / BOOTSTRAP_FILE
    path.write_text(f"{ADMIN[0]}:{password_hash(ADMIN[1])}\n")
    path.chmod(0o600)
    return path


def admin_client(address: str, **kw):
    """A zeep client on ``address`` logged in as the test admin."""
    from vmwebd.client import ApiClient

    return ApiClient(address, user=ADMIN[0], password=ADMIN[1], **kw)


def user_client(address: str, name: str, **kw):
    from vmwebd.client import ApiClient

    return ApiClient(address, user=name, password=password_of(name), **kw)


def create_users(client, names=TEST_USERS, quota: int = 256) -> None:
    """Creates the accounts ``names`` (role user) through ``client`` (an admin's), unless they exist."""
    have = {u["name"] for u in client.call("ListUsers") or []}
    for name in names:
        if name not in have:
            client.call("CreateUser", name, password_of(name), "user", quota)
