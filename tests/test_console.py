"""A VM's serial console (vmwebd/console/): the ring, the pty source, then on in-process nodes
over real WebSockets: typing into a VM's console and reading its output through the host the
user is on (the VM's own, or another relaying over the peers' mutual TLS), the ring replayed on
reconnect, refusals naming the VM, bounded input with back-pressure, and no stream, socket or
process left behind after many opens and closes.

The test driver has no consoles (``virDomainOpenConsole`` is not supported there), so each VM's
console here is a real ``/bin/sh`` on a real pty (:func:`vmwebd.console.pty.shell_opener`)
behind the driver's console interface; tests/test_console_realhost.py types into a real guest.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from procs import ADMIN, password_of
from test_dead_hosts import until
from test_history import two_hosts  # noqa: F401  (a fixture)
from test_web_views import Browserless
from vmwebd.client import ConsoleConnection, ConsoleRefused
from vmwebd.console.hub import HIGH_WATER, MAX_INPUT_MESSAGE
from vmwebd.console.pty import PtyConsole, shell_opener
from vmwebd.console.ring import ConsoleRing
from vmwebd.dom.records import VmRec, status_of

WAIT = 20.0


# -- the ring ----------------------------------------------------------------------------------------


def test_the_ring_keeps_the_last_bytes_and_counts_all():
    """Past its capacity the oldest bytes fall out; the total counts every byte written."""
    ring = ConsoleRing(capacity=8)
    ring.append(b"abc")
    ring.append(b"defgh")
    assert ring.snapshot() == b"abcdefgh"
    ring.append(b"ij")
    assert ring.snapshot() == b"cdefghij" and ring.total == 10
    ring.append(b"0123456789xyz")
    assert ring.snapshot() == b"56789xyz" and len(ring) == 8 and ring.total == 23


def test_a_ring_holds_at_least_one_byte():
    """A ring of no bytes is refused."""
    with pytest.raises(ValueError):
        ConsoleRing(0)


# -- the pty source ----------------------------------------------------------------------------------


def read_until(stream, pattern: bytes, timeout: float = WAIT) -> bytes:
    """Reads ``stream`` (blocking, in this thread) until ``pattern`` shows; the bytes read."""
    got = b""
    deadline = time.monotonic() + timeout
    while pattern not in got:
        assert time.monotonic() < deadline, f"{pattern!r} not seen in {got[-300:]!r}"
        data = stream.read(4096)
        assert data, f"the stream ended before {pattern!r}; read {got[-300:]!r}"
        got += data
    return got


def test_a_pty_console_runs_a_program_and_ends_when_interrupted():
    """A shell on a real pty answers what is typed; interrupt makes a blocked read answer the
    end; release frees its descriptor and reaps the process."""
    fds = len(os.listdir("/proc/self/fd"))
    c = PtyConsole(["/bin/sh", "-i"], env={"PATH": "/usr/bin:/bin", "PS1": "$ "})
    c.write(b"echo $((6*7))x\n")
    read_until(c, b"42x")
    c.interrupt()
    deadline = time.monotonic() + WAIT
    while c.read(4096):
        assert time.monotonic() < deadline
    c.release()
    assert c.proc.returncode is not None
    assert len(os.listdir("/proc/self/fd")) == fds


# -- on nodes ----------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def running_cluster(node, name: str, owner: str, count: int):
    """Creates a cluster of the lab template and waits until its VMs run."""
    yield node.manager.create(name, "lab", owner, count)
    yield node.domsvc.wait_for(
        lambda: all(
            (st := status_of(node.domsvc.dom, vm)) is not None and st.state == "running"
            for vm in node.domsvc.dom.all(VmRec)
            if vm.cluster == name
        ),
        30,
    )
    return sorted((vm for vm in node.domsvc.dom.all(VmRec) if vm.cluster == name), key=lambda v: v.id)


def with_shells(*nodes):
    for n in nodes:
        n.consoles.opener = shell_opener()


class Term:
    """A console connection read in this (non-reactor) thread, collecting what it shows."""

    def __init__(self, node, cluster, vm, user="alice", password=None):
        self.conn = ConsoleConnection(
            node.api_address,
            cluster,
            vm,
            user=user,
            password=password_of(user) if password is None else password,
        )
        self.out = b""
        self.events: list[tuple[str, str]] = []

    def until(self, pattern: bytes, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        self.conn.ws.settimeout(timeout)
        while pattern not in self.out:
            assert time.monotonic() < deadline, f"{pattern!r} not seen in {self.out[-300:]!r}"
            kind, data = self.conn.recv()
            if kind == "output":
                self.out += data
            else:
                self.events.append((kind, data))
                assert kind == "ready", f"{kind}: {data} (waiting for {pattern!r})"
        return self.out

    def event(self, timeout: float = WAIT) -> tuple[str, str]:
        """The next event that is not output nor ready."""
        self.conn.ws.settimeout(timeout)
        while True:
            kind, data = self.conn.recv()
            if kind == "output":
                self.out += data
            elif kind != "ready":
                return kind, data

    def type(self, text: str) -> None:
        self.conn.send(text.encode())

    def close(self) -> None:
        self.conn.close()


@pytest_twisted.inlineCallbacks
def test_typing_into_a_vms_console_and_reading_it_back_with_the_ring_replayed(start_node):
    """alice types into her VM's console on its host and reads the answer; a second connection
    (a reload) gets the last output at once from the ring, before anything is typed."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab1", "alice", 1)

    def story():
        t = Term(h.node, "lab1", vm.name)
        t.type("echo $((6*7))-answer\n")
        t.until(b"42-answer\r\n")
        t.close()
        again = Term(h.node, "lab1", vm.name)
        again.until(b"42-answer\r\n")  # replayed: nothing typed on this one
        again.type("echo second\n")
        again.until(b"second\r\n")
        again.close()

    yield threads.deferToThread(story)
    yield until(lambda: h.node.consoles.open_streams == 0, WAIT, "the console stream to close")
    assert b"42-answer" in h.node.consoles.rings["lab1/" + vm.name].snapshot()
    # Each opening is in the audit trail: who, which VM, granted.
    assert console_openings(h.node) == [("alice", f"vm/lab1/{vm.name}", "ok")] * 2


@pytest_twisted.inlineCallbacks
def test_a_console_through_another_host_is_relayed_over_the_peers_tls(two_hosts):  # noqa: F811
    """A VM running on host1 is typed into from host2's API: host2 relays over the peer endpoint
    (no console stream opens on host2); the peer endpoint takes no one without a grid
    certificate."""
    a, b = yield two_hosts()
    with_shells(a.node, b.node)
    vms = yield running_cluster(a.node, "lab2", "alice", 4)
    yield b.node.domsvc.wait_for(
        lambda: all(
            (st := status_of(b.node.domsvc.dom, vm)) is not None and st.state == "running" for vm in vms
        ),
        30,
    )
    on_a = [v for v in b.node.domsvc.dom.all(VmRec) if v.cluster == "lab2" and v.host == "host1"]
    assert on_a, "placement put no VM on host1"
    vm = on_a[0]

    def story():
        t = Term(b.node, "lab2", vm.name)
        t.type("echo relayed-$((40+2))\n")
        t.until(b"relayed-42\r\n")
        assert a.node.consoles.open_streams == 1 and b.node.consoles.open_streams == 0
        assert len(b.node.consoles.relay.live) == 1
        t.close()
        import requests

        with pytest.raises(requests.exceptions.RequestException):
            requests.get(f"https://{a.node.peer_address}/console/lab2/{vm.name}", verify=False, timeout=10)

    yield threads.deferToThread(story)
    yield until(
        lambda: a.node.consoles.open_streams == 0 and not b.node.consoles.relay.live,
        WAIT,
        "the stream and the relay to close",
    )
    # Recorded once, by the host it was asked of; the relayed hop is not a second opening.
    assert console_openings(b.node) == [("alice", f"vm/lab2/{vm.name}", "ok")]
    assert not [r for r in a.node.audit.query(None, 0, 1000) if r.op == "OpenConsole" and r.host == "host1"]


@pytest_twisted.inlineCallbacks
def test_refusals_name_the_vm_and_why(start_node):
    """Another user's VM, an unknown VM or cluster, a stopped VM, no credentials, a wrong
    password: each refused with a message naming it; nothing is left open."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab3", "alice", 1)
    yield defer.maybeDeferred(h.node.manager.set_vm_power, "lab3", vm.name, "stopped", force=True)
    yield h.node.domsvc.wait_for(
        lambda: status_of(h.node.domsvc.dom, h.node.domsvc.dom.get(VmRec, vm.id)).state == "shutoff", 30
    )

    def refused(user, cluster, name, password=None) -> tuple[str, str]:
        with pytest.raises(ConsoleRefused) as e:
            Term(h.node, cluster, name, user, password)
        return e.value.code, e.value.message

    def story():
        code, msg = refused("bob", "lab3", vm.name)
        assert code == "Client.NotAuthorized" and "user 'bob' may not see or change cluster 'lab3'" in msg
        code, msg = refused("alice", "lab3", "nope")
        assert code == "Client.NoSuchVm" and "'lab3' has no VM named 'nope'" in msg, (code, msg)
        code, msg = refused("alice", "nolab", "x")
        assert code == "Client.NoSuchCluster" and "'nolab'" in msg
        code, msg = refused("alice", "lab3", vm.name)
        assert code == "Server.ConsoleUnavailable"
        assert (
            msg
            == f"the console of VM lab3/{vm.name} is not available: it is not running (its state is shutoff)"
        )
        code, msg = refused(ADMIN[0], "lab3", vm.name, ADMIN[1])  # an admin: the same words
        assert "is not running" in msg
        with pytest.raises(ConsoleRefused) as e:
            ConsoleConnection(h.node.api_address, "lab3", vm.name)
        assert e.value.code == "Client.NotAuthorized"
        with pytest.raises(ConsoleRefused) as e:
            ConsoleConnection(h.node.api_address, "lab3", vm.name, user="alice", password="wrong")
        assert e.value.code == "Client.NotAuthorized"

    yield threads.deferToThread(story)
    assert h.node.consoles.open_streams == 0
    # Refused openings are in the audit trail too, with the fault each was answered; the two
    # attempts that never logged in are not openings.
    assert sorted(console_openings(h.node)) == sorted(
        [
            ("bob", f"vm/lab3/{vm.name}", "Client.NotAuthorized"),
            ("alice", "vm/lab3/nope", "Client.NoSuchVm"),
            ("alice", "vm/nolab/x", "Client.NoSuchCluster"),
            ("alice", f"vm/lab3/{vm.name}", "Server.ConsoleUnavailable"),
            (ADMIN[0], f"vm/lab3/{vm.name}", "Server.ConsoleUnavailable"),
        ]
    )


def console_openings(node) -> list[tuple[str, str, str]]:
    """(user, object, outcome) of the console openings in ``node``'s audit trail, oldest first."""
    recs = [r for r in node.audit.query(None, 0, 1000) if r.op == "OpenConsole"]
    return [(r.user, r.object, r.outcome) for r in reversed(recs)]


@pytest_twisted.inlineCallbacks
def test_a_browser_session_opens_a_console_but_another_sites_page_cannot(start_node):
    """The pages' session cookie opens a console; the same cookie from a page of another origin
    is refused before any WebSocket (403)."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab4", "alice", 1)

    def story():
        import websocket

        b = Browserless(h.node.api_address)
        assert b.login("alice", password_of("alice")).status_code == 303
        cookie = "; ".join(f"{c.name}={c.value}" for c in b.s.cookies)
        url = f"ws://{h.node.api_address}/console/lab4/{vm.name}"
        ws = websocket.create_connection(url, cookie=cookie, origin=b.base, timeout=WAIT)
        while ws.recv_data() != (websocket.ABNF.OPCODE_TEXT, b'{"event": "ready", "message": ""}'):
            pass
        ws.send_binary(b"echo cookie-ok\n")
        got = b""
        while b"cookie-ok\r\n" not in got:
            op, data = ws.recv_data()
            got += data if op == websocket.ABNF.OPCODE_BINARY else b""
        ws.close()
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(url, cookie=cookie, origin="http://evil.example", timeout=WAIT)
        assert e.value.status_code == 403

    yield threads.deferToThread(story)


@pytest_twisted.inlineCallbacks
def test_a_huge_paste_is_taken_in_bounded_pieces_and_an_oversized_message_is_refused(start_node):
    """256 KiB pasted in 16 KiB messages reaches the guest whole (its byte count is right)
    while the hub's queue pauses the sender's socket past its high-water mark; one message over
    64 KiB is refused with a message saying the limit, and the connection closes."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab5", "alice", 1)
    pauses = []
    from vmwebd.console import hub as hubmod

    original = hubmod._Hub.write

    def spy(self, data):
        original(self, data)
        pauses.append(self.paused)

    hubmod._Hub.write = spy
    try:

        def story():
            t = Term(h.node, "lab5", vm.name)
            t.type("stty -echo; wc -c; stty echo\n")
            line = b"x" * 63 + b"\n"
            t.conn.send(line * (256 * 1024 // 64))
            t.type("\x04")
            t.until(b"262144")
            t.close()
            big = Term(h.node, "lab5", vm.name)
            big.conn.ws.send_binary(b"y" * (MAX_INPUT_MESSAGE + 1))
            kind, message = big.event()
            assert kind == "error" and f"over the limit of {MAX_INPUT_MESSAGE} bytes" in message
            assert big.conn.recv()[0] == "end"  # closed by the host
            big.close()

        yield threads.deferToThread(story)
    finally:
        hubmod._Hub.write = original
    assert HIGH_WATER < 256 * 1024 and any(pauses), "the queue never passed its high-water mark"
    yield until(lambda: h.node.consoles.open_streams == 0, WAIT, "the console stream to close")


@pytest_twisted.inlineCallbacks
def test_console_output_never_reaches_the_vm_page(start_node):
    """Markup and escape sequences a guest prints stay in the console's bytes: the VM page (HTML)
    never carries them; the page offers the console tab."""
    h = yield start_node()
    with_shells(h.node)
    (vm,) = yield running_cluster(h.node, "lab6", "alice", 1)

    def story():
        t = Term(h.node, "lab6", vm.name)
        t.type("printf '<script>alert(1)</script>\\033[31mred\\033[0m-done\\n'\n")
        t.until(b"red\x1b[0m-done")
        b = Browserless(h.node.api_address)
        assert b.login("alice", password_of("alice")).status_code == 303
        page = b.s.get(f"{b.base}/vm/lab6/{vm.name}", timeout=10)
        assert page.status_code == 200
        assert "alert(1)" not in page.text and "\x1b" not in page.text
        assert f'href="/vm/lab6/{vm.name}/console"' in page.text
        tab = b.s.get(f"{b.base}/vm/lab6/{vm.name}/console", timeout=10)
        assert tab.status_code == 200
        assert "alert(1)" not in tab.text and "\x1b" not in tab.text
        assert f'data-console="/console/lab6/{vm.name}"' in tab.text
        nonce = re.search(r'data-style-nonce="([^"]+)"', tab.text).group(1)
        assert f"style-src 'self' 'nonce-{nonce}'" in tab.headers["Content-Security-Policy"]
        assert "script-src 'self';" in tab.headers["Content-Security-Policy"]
        other = Browserless(h.node.api_address)
        assert other.login("bob", password_of("bob")).status_code == 303
        refused = other.s.get(f"{other.base}/vm/lab6/{vm.name}/console", timeout=10)
        assert refused.status_code == 403 and "may not see or change cluster" in refused.text
        t.close()

    yield threads.deferToThread(story)


@pytest_twisted.inlineCallbacks
def test_many_opens_and_closes_leave_no_stream_socket_or_process(two_hosts):  # noqa: F811
    """Forty consoles opened and closed (half relayed from host2, some dropped without a close
    frame, some left before the ready event) leave no stream, relay, WebSocket, descriptor or
    shell process behind, and the reactor kept answering meanwhile."""
    a, b = yield two_hosts()
    with_shells(a.node, b.node)
    vms = yield running_cluster(a.node, "lab7", "alice", 2)
    yield b.node.domsvc.wait_for(
        lambda: all(
            (st := status_of(b.node.domsvc.dom, vm)) is not None and st.state == "running" for vm in vms
        ),
        30,
    )
    vm = next(v for v in b.node.domsvc.dom.all(VmRec) if v.cluster == "lab7" and v.host == "host1")
    fds = _descriptors_besides_idle_peer_connections(a.node, b.node)

    def story():
        for i in range(40):
            node = a.node if i % 2 else b.node
            t = Term(node, "lab7", vm.name)
            if i % 5 == 4:
                t.conn.ws.sock.close()  # gone without a close frame
                continue
            if i % 5 == 3:
                t.close()  # before ready, perhaps
                continue
            t.type(f"echo round-{i}\n")
            t.until(f"round-{i}\r\n".encode())
            t.close()

    yield threads.deferToThread(story)

    def settled():
        return (
            a.node.consoles.open_streams == 0
            and b.node.consoles.open_streams == 0
            and not b.node.consoles.relay.live
            and not a.node.consoles.relay.live
        )

    yield until(settled, WAIT, "every stream and relay to close")
    yield until(
        lambda: all(not r.live for n in (a.node, b.node) for r in n.consoles.resources),
        WAIT,
        "every console WebSocket to close",
    )
    yield until(
        lambda: _descriptors_besides_idle_peer_connections(a.node, b.node) <= fds,
        WAIT,
        f"descriptors back to {fds} (now {_descriptors_besides_idle_peer_connections(a.node, b.node)})",
    )
    shells = [p for p in os.listdir("/proc") if p.isdigit() and _is_our_shell(int(p))]
    assert not shells, f"shell processes left: {shells}"


def _descriptors_besides_idle_peer_connections(*nodes) -> int:
    """This process's open descriptors, less the idle connections the hosts' peer clients keep
    for their next requests (both ends are in this process). Gossip opens more of those under the
    load of a console story and keeps up to eight per peer: they are not the consoles' and would
    otherwise count as a leak."""
    import psutil

    pooled = set()
    for node in nodes:
        for protocols in node.paxos_transport.client.pool._connections.values():
            for protocol in protocols:
                here, there = protocol.transport.getHost(), protocol.transport.getPeer()
                pooled.add(((here.host, here.port), (there.host, there.port)))
                pooled.add(((there.host, there.port), (here.host, here.port)))
    kept = sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and ((c.laddr.ip, c.laddr.port), (c.raddr.ip, c.raddr.port)) in pooled
    )
    return len(os.listdir("/proc/self/fd")) - kept


def _is_our_shell(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False
    ppid = int(re.search(r"\) \S+ (\d+)", stat).group(1))
    return ppid == os.getpid() and b"PS1=" in env


# -- a half-open viewer ------------------------------------------------------------------------------


class _Socket:
    def __init__(self):
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class _WsTransport:
    """What a ViewerProtocol is given by twisted.web.websocket, recording what it is asked."""

    def __init__(self):
        self.transport = _Socket()
        self.texts, self.pings, self.closed = [], 0, None

    def sendTextMessage(self, text):
        self.texts.append(text)

    def sendBytesMessage(self, data):
        pass

    def ping(self, payload=b""):
        self.pings += 1

    def loseConnection(self, code=1000):
        self.closed = code


def test_a_viewer_that_answers_no_ping_is_dropped_and_detached():
    """On a task.Clock: a viewer is pinged every 30 s; one that answered no ping for over 60 s
    (its client vanished without closing: a half-open connection) is aborted, and once its
    connection is lost it is detached and its pings stop."""
    from twisted.internet import task

    from vmwebd.console.wire import PING_SECONDS, ViewerProtocol

    clock = task.Clock()
    live, detached = set(), []

    class Hold:
        def write(self, data):
            pass

        def detach(self):
            detached.append(True)

    p = ViewerProtocol(lambda viewer: defer.succeed(Hold()), live, clock)
    t = _WsTransport()
    p.negotiationStarted(t)
    p.negotiationFinished()
    assert t.texts == ['{"event": "ready", "message": ""}'] and p in live
    clock.advance(PING_SECONDS)
    assert t.pings == 1
    p.pongReceived(b"vmweb")  # alive at 30 s
    clock.advance(PING_SECONDS)
    clock.advance(PING_SECONDS)
    assert t.pings == 3 and not t.transport.aborted  # 60 s since the pong: not over yet
    clock.advance(PING_SECONDS)
    assert t.transport.aborted and t.pings == 3
    p.connectionLost(None)
    assert detached == [True] and p not in live and clock.getDelayedCalls() == []


@pytest_twisted.inlineCallbacks
def test_a_vm_whose_host_cannot_be_reached_is_refused_naming_it(two_hosts):  # noqa: F811
    """The VM's host stops answering on its peer endpoint: a console asked of the other host is
    refused within the relay's bound, naming the VM and its host; nothing is left open."""
    a, b = yield two_hosts()
    with_shells(a.node, b.node)
    vms = yield running_cluster(a.node, "lab8", "alice", 4)
    yield b.node.domsvc.wait_for(
        lambda: all(
            (st := status_of(b.node.domsvc.dom, vm)) is not None and st.state == "running" for vm in vms
        ),
        30,
    )
    vm = next(v for v in b.node.domsvc.dom.all(VmRec) if v.cluster == "lab8" and v.host == "host1")
    yield a.node.peer_port.stopListening()

    def story():
        started = time.monotonic()
        with pytest.raises(ConsoleRefused) as e:
            Term(b.node, "lab8", vm.name)
        assert time.monotonic() - started < WAIT
        assert e.value.code == "Server.ConsoleUnavailable"
        assert e.value.message == (
            f"the console of VM lab8/{vm.name} is not available: its host host1 could not be reached"
        ), e.value.message

    yield threads.deferToThread(story)
    assert not b.node.consoles.relay.live and a.node.consoles.open_streams == 0


@pytest_twisted.inlineCallbacks
def test_the_test_drivers_vms_have_no_console_and_say_so(start_node):
    """Without a console source of the tests' own, a VM of libvirt's test driver (the demo's)
    is refused saying that driver has no consoles, naming the VM and its domain."""
    h = yield start_node()
    (vm,) = yield running_cluster(h.node, "lab9", "alice", 1)

    def story():
        with pytest.raises(ConsoleRefused) as e:
            Term(h.node, "lab9", vm.name)
        assert e.value.code == "Server.ConsoleUnavailable"
        assert e.value.message.startswith(
            f"the console of VM lab9/{vm.name} is not available: open the "
            f"console of domain 'vmweb-lab9-{vm.name}' on test://"
        )
        assert e.value.message.endswith("libvirt's test driver has no consoles (its guests do not run)")

    yield threads.deferToThread(story)
    assert h.node.consoles.open_streams == 0
