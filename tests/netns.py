"""Scratch network namespaces for tests of real network devices.

Every namespace is named ``vmwt-<pid>-<tag>`` so concurrent runs never meet, and every device is
made inside one of them (``ip -n NS ...``): nothing is created or changed in the namespace the
tests run in. :meth:`Namespaces.close` deletes them all (and with them their devices).

Waits are bounded: :func:`wait_until` polls a condition until a deadline and says what it waited
for when it gives up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

#: Seconds any one command may take.
COMMAND_TIMEOUT = 20.0


def unavailable() -> str | None:
    """Why real network tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"needs the {tool} command (iproute2)"
    return None


def run(
    *argv: str, check: bool = True, stdin: str = "", timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def wait_until(predicate, what: str, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Namespaces:
    """Named scratch namespaces, deleted by :meth:`close`."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"vmwt-{os.getpid()}"
        self.names: list[str] = []

    def add(self, tag: str) -> str:
        name = f"{self.prefix}-{tag}"
        run("ip", "netns", "add", name)
        self.names.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def remove(self, name: str) -> None:
        run("ip", "netns", "del", name, check=False)
        if name in self.names:
            self.names.remove(name)

    def close(self) -> None:
        for name in reversed(list(self.names)):
            self.remove(name)

    # -- commands inside a namespace ---------------------------------------------------------------
    @staticmethod
    def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "-n", ns, *args, check=check)

    @staticmethod
    def exec(
        ns: str, *argv: str, check: bool = True, stdin: str = "", timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", ns, *argv, check=check, stdin=stdin, timeout=timeout)

    def links(self, ns: str) -> dict[str, dict]:
        """``ip -d link`` of a namespace, by device name (iproute2's JSON)."""
        out = json.loads(self.ip(ns, "-j", "-d", "link", "show").stdout or "[]")
        return {link["ifname"]: link for link in out}

    def addresses(self, ns: str, dev: str) -> list[tuple[str, str, int]]:
        """(family, address, prefix) of a device's addresses."""
        out = json.loads(self.ip(ns, "-j", "addr", "show", "dev", dev).stdout or "[]")
        return [
            (a["family"], a["local"], a["prefixlen"]) for entry in out for a in entry.get("addr_info", [])
        ]

    def fdb_zero(self, ns: str, dev: str) -> set[str]:
        """Destinations of a VXLAN device's all-zeros forwarding entries."""
        out = json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", dev).stdout or "[]")
        return {e["dst"] for e in out if e.get("mac") == "00:00:00:00:00:00" and e.get("dst")}

    def veth(self, ns: str, name: str, peer_ns: str, peer: str, mtu: int = 1500) -> None:
        """A veth pair made inside ``ns`` whose other end is moved straight to ``peer_ns``."""
        self.ip(
            ns,
            "link",
            "add",
            name,
            "mtu",
            str(mtu),
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "mtu",
            str(mtu),
            "netns",
            peer_ns,
        )
        self.ip(ns, "link", "set", name, "up")
        self.ip(peer_ns, "link", "set", peer, "up")

    def guest(
        self, tag: str, host_ns: str, bridge: str, address: str, mtu: int, gateway: str | None = None
    ) -> str:
        """A namespace standing for a VM: one NIC ``eth0`` with ``address`` (CIDR), its other end
        ``g-<tag>`` on ``bridge`` in ``host_ns``, a default route via ``gateway`` when given."""
        ns = self.add(tag)
        port = f"g-{tag}"[:15]
        self.veth(host_ns, port, ns, "eth0", mtu)
        self.ip(host_ns, "link", "set", port, "master", bridge)
        self.ip(ns, "addr", "add", address, "dev", "eth0")
        if gateway:
            self.ip(ns, "route", "add", "default", "via", gateway)
        return ns

    def ping(self, ns: str, address: str, wait: int = 1) -> bool:
        """One ICMP echo from ``ns`` to ``address`` answered within ``wait`` seconds."""
        res = self.exec(
            ns,
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            str(wait),
            address,
            check=False,
            timeout=wait + COMMAND_TIMEOUT,
        )
        return res.returncode == 0

    def reaches(self, ns: str, address: str, timeout: float = 6.0) -> bool:
        """Whether ``ns`` gets an echo reply from ``address`` before ``timeout`` (a first echo can
        be lost while ARP and the bridges settle, so this tries again until the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(ns, address):
                return True
        return False
