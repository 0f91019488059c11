"""Every host's consoles: one open stream per watched VM on the VM's host, fanned out to viewers.

A viewer is any object with ``output(data)``, ``ended(why)``, ``pause_input()`` and
``resume_input()`` (a WebSocket, here or relayed from another host). :meth:`ConsoleService.attach`
checks the user's right to the VM (its owner or an admin, as :meth:`vmwebd.app.Application.cluster`)
and that it runs, then either attaches the viewer to the hub on this host or, when the VM runs
elsewhere, relays to the VM's host over the peer endpoint's mutual TLS (:mod:`.wire`).

Threads: a hub reads its stream on a thread of its own and writes on another; neither ever runs
on the reactor, which only gets the bytes read (``callFromThread``) and queues the bytes to
write. Input is bounded: past ``HIGH_WATER`` bytes queued and not yet taken by the console, every
viewer's socket stops being read (TCP pushes back on the typist) until the queue is under
``LOW_WATER``.

Lifetime: a hub opens with its first viewer and closes with its last (or when the console ends:
the VM stopped); its ring stays while the VM is on this host, so a reload or a second viewer gets
the last ``RING_BYTES`` at once.
"""

from __future__ import annotations

import queue
import threading

from twisted.internet import defer
from twisted.logger import Logger

from vmwebd.console.ring import RING_BYTES, ConsoleRing
from vmwebd.dom.records import VmRec, status_of
from vmwebd.errors import ConsoleUnavailable, VmwebError
from vmwebd.hv.naming import domain_name
from vmwebd.wiring import ConsoleGate, ConsoleRelay

log = Logger()

#: The console is read this many bytes at a time.
READ_CHUNK = 4096
#: Input queued for the console past which viewers' sockets are no longer read ...
HIGH_WATER = 64 * 1024
#: ... until the queue is back under this.
LOW_WATER = 16 * 1024
#: A viewer's single message of keystrokes may be this large (a paste is sent in pieces).
MAX_INPUT_MESSAGE = 64 * 1024
#: How long opening a console (the hypervisor's answer) may take.
OPEN_TIMEOUT_SECONDS = 15.0
#: How long a hub's reader waits for its writer to finish after the console ended.
WRITER_JOIN_SECONDS = 10.0
#: How long a stopping host waits for its consoles' streams to be released.
STOP_SECONDS = 5.0


class Attachment:
    """A viewer's hold on a console: what it types goes through ``write``; ``detach`` lets go."""

    def __init__(self, hub: "_Hub", viewer):
        self._hub, self._viewer = hub, viewer

    def write(self, data: bytes) -> None:
        if self._hub is not None:
            self._hub.write(data)

    def detach(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            hub.detach(self._viewer)


class _Hub:
    """One open console stream of VM ``vm_id`` on this host and the viewers watching it."""

    def __init__(self, service: "ConsoleService", vm_id: str, stream, ring: ConsoleRing):
        self.service, self.vm_id, self.stream, self.ring = service, vm_id, stream, ring
        self.reactor = service.reactor
        self.viewers: list = []
        self.pending = 0  # bytes queued for the console, not yet written
        self.paused = False
        self.closing = False
        self.why = ""
        self.done = defer.Deferred()  # fires once the stream is released
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name=f"console-w {vm_id}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"console-r {vm_id}", daemon=True)
        self._writer.start()
        self._reader.start()

    # -- the reactor's side ----------------------------------------------------------------
    def attach(self, viewer) -> Attachment:
        self.viewers.append(viewer)
        backlog = self.ring.snapshot()
        if backlog:
            viewer.output(backlog)
        if self.paused:
            viewer.pause_input()
        return Attachment(self, viewer)

    def detach(self, viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
            if self.paused:
                viewer.resume_input()
        if not self.viewers:
            self.close("no one watches it any more")

    def write(self, data: bytes) -> None:
        if self.closing or not data:
            return
        for i in range(0, len(data), READ_CHUNK):
            chunk = bytes(data[i : i + READ_CHUNK])
            self.pending += len(chunk)
            self._queue.put(chunk)
        if self.pending > HIGH_WATER and not self.paused:
            self.paused = True
            for v in list(self.viewers):
                v.pause_input()

    def _written(self, n: int) -> None:
        self.pending -= n
        if self.paused and self.pending <= LOW_WATER:
            self.paused = False
            for v in list(self.viewers):
                v.resume_input()

    def _output(self, data: bytes) -> None:
        self.ring.append(data)
        for v in list(self.viewers):
            v.output(data)

    def close(self, why: str) -> defer.Deferred:
        """Ends the stream (off the reactor thread); fires once it is released."""
        if not self.closing:
            self.closing, self.why = True, why
            self.service._begin_close(self)
            self._queue.put(None)
            self.service.run_blocking(self.stream.interrupt).addErrback(
                lambda f: log.warn(
                    "console of {vm}: interrupting its stream: {err}", vm=self.vm_id, err=f.getErrorMessage()
                )
            )
        return self.service.when_done(self)

    def _ended(self, why: str) -> None:
        self.closing = True
        viewers, self.viewers = self.viewers, []
        self.service._hub_ended(self)
        for v in viewers:
            v.ended(why)
        self.done.callback(None)

    # -- threads ---------------------------------------------------------------------------
    def _read_loop(self) -> None:
        why = ""
        try:
            while True:
                data = self.stream.read(READ_CHUNK)
                if not data:
                    break
                self.reactor.callFromThread(self._output, data)
        except Exception as e:  # the hypervisor's words reach the viewers and the log
            why = str(e)
        self._queue.put(None)
        self._writer.join(WRITER_JOIN_SECONDS)
        try:
            self.stream.release()
        except Exception as e:
            why = why or f"releasing it failed: {e}"
        self.reactor.callFromThread(self._finish, why)

    def _finish(self, why: str) -> None:
        if self.closing and self.why:
            why = why or self.why
        else:
            why = why or "the console ended (the VM stopped or its console closed)"
        self._ended(f"the console of VM {self.vm_id} closed: {why}")

    def _write_loop(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            try:
                self.stream.write(chunk)
            except Exception as e:
                log.warn("console of {vm}: a write failed: {err}", vm=self.vm_id, err=str(e))
                self.stream.interrupt()
                return
            finally:
                self.reactor.callFromThread(self._written, len(chunk))


class ConsoleService:
    """This host's console hubs and rings, and the way to a VM's console wherever it runs.

    ``opener(domain)``: a Deferred firing with a :class:`vmwebd.hv.driver.ConsoleStream` on that
    libvirt domain (the hypervisor driver's ``open_console``); ``domsvc``: the DOM (where VMs
    run); ``console_gate(principal, cluster, vm)``: the VM's view if the principal may open its
    console now (the application's ``open_console``, which records each opening); ``relay``: the way to a console on another host (None: this host
    runs without peers)."""

    def __init__(
        self,
        host_id: str,
        reactor,
        domsvc,
        opener,
        console_gate: ConsoleGate,
        *,
        relay: ConsoleRelay | None = None,
        ring_bytes: int = RING_BYTES,
    ):
        self.host_id = host_id
        self.reactor = reactor
        self.domsvc = domsvc
        self.console_gate = console_gate
        self.opener = opener
        self.ring_bytes = ring_bytes
        self.rings: dict[str, ConsoleRing] = {}
        self.hubs: dict[str, _Hub] = {}
        self._opening: dict[str, defer.Deferred] = {}
        self._closing: set[_Hub] = set()
        self.relay = relay  # a wire.Relay when peers run (see wire.py)
        self.resources: list = []  # the WebSocket end points (wire.py), each with its live set
        self.stopped = False

    # -- what tests and the metrics read ------------------------------------------------------
    @property
    def open_streams(self) -> int:
        """Console streams open on this host (hubs watched, or closing and not yet released)."""
        return len(self.hubs) + len(self._closing)

    def run_blocking(self, fn, *args) -> defer.Deferred:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def when_done(self, hub: _Hub) -> defer.Deferred:
        d = defer.Deferred()
        if hub.done.called:
            d.callback(None)
        else:
            hub.done.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    # -- entry points -----------------------------------------------------------------------
    def check_access(self, principal, cluster: str, vm: str):
        """The VM's view if ``principal`` may open its console now (the application's say,
        recorded in its audit trail): NotAuthorized, NoSuchCluster, NoSuchVm or
        ConsoleUnavailable otherwise."""
        return self.console_gate(principal, cluster, vm)

    def attach(self, principal, cluster: str, vm: str, viewer) -> defer.Deferred:
        """Fires with an :class:`Attachment` of ``viewer`` to VM ``cluster/vm``'s console,
        wherever it runs; fails with NotAuthorized, NoSuchCluster, NoSuchVm or
        :class:`ConsoleUnavailable`, each naming the VM."""
        try:
            v = self.check_access(principal, cluster, vm)
        except VmwebError as e:
            return defer.fail(e)
        vm_id = f"{cluster}/{vm}"
        if v.host == self.host_id:
            return self.attach_local(vm_id, viewer)
        if self.relay is None:
            return defer.fail(
                ConsoleUnavailable(
                    vm_id, f"it runs on host {v.host} and host {self.host_id} runs without peers"
                )
            )
        return self.relay.attach(v.host, vm_id, viewer, principal.name)

    def attach_local(self, vm_id: str, viewer) -> defer.Deferred:
        """Attaches ``viewer`` to the console of VM ``vm_id`` running on this host."""
        if self.stopped:
            return defer.fail(ConsoleUnavailable(vm_id, f"host {self.host_id} is stopping"))
        dom = self.domsvc.dom
        rec = dom.get(VmRec, vm_id)
        if rec is None or rec.desired == "absent":
            return defer.fail(ConsoleUnavailable(vm_id, "there is no such VM"))
        if rec.host != self.host_id:
            return defer.fail(
                ConsoleUnavailable(
                    vm_id, f"it runs on host {rec.host or '(none)'}, not on host {self.host_id}"
                )
            )
        st = status_of(dom, rec)
        if st is None or st.state != "running":
            return defer.fail(
                ConsoleUnavailable(vm_id, f"it is not running (its state is {st.state if st else 'pending'})")
            )
        hub = self.hubs.get(vm_id)
        if hub is not None and not hub.closing:
            return defer.succeed(hub.attach(viewer))
        opening = self._opening.get(vm_id)
        if opening is None:
            opening = self._open(vm_id)
        d = defer.Deferred()

        def opened(hub):
            d.callback(hub.attach(viewer))
            return hub

        def failed(f):
            d.errback(f)
            return f

        opening.addCallbacks(opened, failed)
        opening.addErrback(lambda f: None)  # handed to each waiter above
        return d

    def _open(self, vm_id: str) -> defer.Deferred:
        opener = self.opener
        self._forget_rings()
        d = defer.maybeDeferred(opener, domain_name(vm_id))
        d.addTimeout(OPEN_TIMEOUT_SECONDS, self.reactor)
        result = defer.Deferred()
        self._opening[vm_id] = result

        def opened(stream):
            del self._opening[vm_id]
            if self.stopped:
                self.run_blocking(lambda: (stream.interrupt(), stream.release()))
                raise ConsoleUnavailable(vm_id, f"host {self.host_id} is stopping")
            ring = self.rings.setdefault(vm_id, ConsoleRing(self.ring_bytes))
            hub = _Hub(self, vm_id, stream, ring)
            self.hubs[vm_id] = hub
            log.info("console of {vm} opened", vm=vm_id)
            return hub

        def failed(f):
            self._opening.pop(vm_id, None)
            if f.check(defer.TimeoutError):
                raise ConsoleUnavailable(
                    vm_id, f"the hypervisor did not open it within {OPEN_TIMEOUT_SECONDS:g} s"
                )
            if f.check(ConsoleUnavailable):
                return f
            raise ConsoleUnavailable(vm_id, f.getErrorMessage())

        d.addCallbacks(opened, failed).chainDeferred(result)
        return result

    def _begin_close(self, hub: _Hub) -> None:
        """A closing hub is no longer the VM's (a new viewer opens a new one) but its stream
        counts as open until released."""
        if self.hubs.get(hub.vm_id) is hub:
            del self.hubs[hub.vm_id]
        self._closing.add(hub)

    def _hub_ended(self, hub: _Hub) -> None:
        if self.hubs.get(hub.vm_id) is hub:
            del self.hubs[hub.vm_id]
        self._closing.discard(hub)
        log.info("console of {vm} closed: {why}", vm=hub.vm_id, why=hub.why or "it ended")

    def _forget_rings(self) -> None:
        """Rings of VMs no longer on this host go (a VM moved away or removed)."""
        dom, me = self.domsvc.dom, self.host_id
        for vm_id in list(self.rings):
            rec = dom.get(VmRec, vm_id)
            if (rec is None or rec.host != me) and vm_id not in self.hubs:
                del self.rings[vm_id]

    def stop(self) -> defer.Deferred:
        """Closes every console and relay; fires once every stream is released."""
        self.stopped = True
        waits = []
        for hub in list(self.hubs.values()) + list(self._closing):
            waits.append(hub.close(f"host {self.host_id} is stopping"))
        if self.relay is not None:
            self.relay.stop()

        def late(f):
            f.trap(defer.TimeoutError)
            log.warn(
                "{n} console streams still open after {s} s; stopping anyway",
                n=self.open_streams,
                s=STOP_SECONDS,
            )

        return defer.DeferredList(waits).addTimeout(STOP_SECONDS, self.reactor).addErrback(late)
