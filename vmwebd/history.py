"""Each host's load, used memory and VM count over the last hours, and how any host reads another's.

Every host samples itself into a bounded ring (:class:`HistoryRing`: 720 samples, one every 30 s:
6 hours) on the reactor's clock (:class:`Sampler`); the numbers come from the hypervisor driver's
``host_facts`` (run on its own thread pool, never on the reactor thread) and the DOM's VM count,
the same sources as the host record.

Where the samples live: with the host that took them, never in the DOM. A page at host B
showing host A's chart asks A for them (:meth:`HistoryService.samples_of`): a GET of
``/history`` on A's peer endpoint, over the peers' mutual TLS (both certificates from the grid's
CA, A's required to name A), so no new port opens and nothing but a grid host can read it.
Gossiping them instead would cost every host a copy of every host's ring: 16 hosts × 720 samples
× ~30 bytes ≈ 350 KB held everywhere, and a sample every 30 s from each host spread to all 16
(a host record is rewritten at most every 60 s at rest precisely to keep that traffic small),
for charts someone looks at now and then. Asking the owner costs one ~22 KB answer per look.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import resource

from vmwebd.errors import VmwebError
from vmwebd.wiring import HostFacts, PeerDirectory

log = Logger()

#: One sample this often (seconds) ...
INTERVAL_SECONDS = 30.0
#: ... and this many kept: 6 hours.
CAPACITY = 720
#: How long a page waits for another host's samples.
FETCH_TIMEOUT_SECONDS = 5.0
#: The largest answer taken from a peer (720 samples take ~22 KB).
MAX_ANSWER_BYTES = 256 * 1024


@dataclass(frozen=True)
class Sample:
    """One look at a host: when (seconds since the epoch), its 1-minute load, the memory in use
    (MiB) and how many VMs the DOM places there."""

    t: int
    load1: float
    mem_used_mib: int
    vms: int

    def as_list(self) -> list:
        return [self.t, self.load1, self.mem_used_mib, self.vms]


class HistoryRing:
    """The last ``capacity`` samples, oldest first; time only moves forward (a sample not later
    than the last one is dropped, so a clock stepped back cannot reorder the ring)."""

    def __init__(self, capacity: int = CAPACITY, interval: float = INTERVAL_SECONDS):
        if capacity < 1:
            raise ValueError("a history ring holds at least one sample")
        self.capacity = capacity
        self.interval = interval
        self._samples: collections.deque[Sample] = collections.deque(maxlen=capacity)

    def add(self, sample: Sample) -> bool:
        """Appends ``sample`` (the oldest falls out once full); False when it is not later than
        the last one and was dropped."""
        if self._samples and sample.t <= self._samples[-1].t:
            return False
        self._samples.append(sample)
        return True

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def __len__(self) -> int:
        return len(self._samples)


class Sampler:
    """Every ``interval`` seconds of ``clock``, asks ``probe()`` (a Deferred firing with a
    :class:`Sample`) and puts what it answers into ``ring``. A probe still running when the next
    tick comes makes that tick skip: a slow hypervisor never piles up probes."""

    def __init__(self, ring: HistoryRing, clock, probe, interval: float = INTERVAL_SECONDS):
        self.ring, self.clock, self.probe, self.interval = ring, clock, probe, interval
        self.busy = False
        self.skipped = 0
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        if self.busy:
            self.skipped += 1
            return
        self.busy = True

        def done(result):
            self.busy = False
            if isinstance(result, Sample):
                self.ring.add(result)

        def failed(f):
            self.busy = False
            log.warn("history: no sample this time: {err}", err=f.getErrorMessage())

        # Not returned: LoopingCall would otherwise wait for it, and a failure would stop it.
        defer.maybeDeferred(self.probe).addCallbacks(done, failed)


def to_json(host_id: str, ring: HistoryRing) -> bytes:
    """The wire form of ``ring``: ``{"host", "interval_s", "capacity", "samples": [[t, load1,
    mem_used_mib, vms], ...]}``, oldest first."""
    return json.dumps(
        {
            "host": host_id,
            "interval_s": ring.interval,
            "capacity": ring.capacity,
            "samples": [s.as_list() for s in ring.samples()],
        },
        separators=(",", ":"),
    ).encode()


def from_json(body: bytes, host_id: str, capacity: int = CAPACITY) -> list[Sample]:
    """The samples of another host's answer, checked: the host it names, at most ``capacity``
    samples, each four finite numbers in time order. Raises :class:`HistoryUnavailable`."""
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("host") != host_id:
            raise ValueError(f"the answer is not about host {host_id}")
        rows = doc.get("samples")
        if not isinstance(rows, list) or len(rows) > capacity:
            raise ValueError("no list of samples, or too many")
        out = []
        for row in rows:
            if (
                not isinstance(row, list)
                or len(row) != 4
                or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row
                )
            ):
                raise ValueError(f"a malformed sample {str(row)[:40]}")
            s = Sample(int(row[0]), float(row[1]), int(row[2]), int(row[3]))
            if out and s.t <= out[-1].t:
                raise ValueError("samples out of time order")
            out.append(s)
        return out
    except (ValueError, TypeError) as e:
        raise HistoryUnavailable(host_id, f"its answer was malformed ({e})") from None


class HistoryUnavailable(VmwebError):
    """Another host's samples could not be had (not reachable, no peers, a malformed answer)."""

    faultcode = "Server.HistoryUnavailable"

    def __init__(self, host: str, why: str):
        super().__init__(f"the load history of host {host} is not available: {why}")
        self.host, self.why = host, why


class HistoryResource(resource.Resource):
    """``GET /history`` on the peer endpoint: this host's samples as JSON, for grid hosts only
    (``identity_of(request)``: the host id of the client certificate, None without one)."""

    isLeaf = True

    def __init__(self, host_id: str, ring: HistoryRing, identity_of):
        super().__init__()
        self.host_id, self.ring, self.identity_of = host_id, ring, identity_of

    def render_GET(self, request):
        request.setHeader(b"Cache-Control", b"no-store")
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"no such file\n"
        if self.identity_of(request) is None:
            request.setResponseCode(403)
            return b"a grid host's certificate is needed\n"
        request.setHeader(b"Content-Type", b"application/json")
        return to_json(self.host_id, self.ring)


class HistoryService:
    """This host's ring and sampler, and the way to another host's samples (see the module).

    ``facts``: what answers ``host_facts()`` (the hypervisor driver); ``domsvc``: the DOM (this
    host's VM count); ``memory_mib``: the host's memory when the config sets it (else the
    driver's); ``peer_address_of`` and ``host_creds`` (None: this host runs without peers): how
    another host is asked, over the peers' mutual TLS."""

    def __init__(
        self,
        host_id: str,
        reactor,
        facts: HostFacts,
        domsvc,
        *,
        memory_mib: int | None = None,
        peer_address_of: PeerDirectory,
        host_creds=None,
        capacity: int = CAPACITY,
        interval: float = INTERVAL_SECONDS,
    ):
        self.host_id, self.reactor, self.facts, self.domsvc = host_id, reactor, facts, domsvc
        self.memory_mib = memory_mib
        self.peer_address_of, self.host_creds = peer_address_of, host_creds
        self.ring = HistoryRing(capacity, interval)
        self.sampler = Sampler(self.ring, reactor, self.probe, interval)
        self._agent = None
        self._expected: dict[tuple[str, int], str] = {}  # peer (address, port) -> host id asked

    def start(self) -> None:
        self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()

    def resource(self, identity_of) -> HistoryResource:
        return HistoryResource(self.host_id, self.ring, identity_of)

    def probe(self) -> defer.Deferred:
        """One sample of this host: the driver's facts (off the reactor thread) and the DOM."""

        def sample(facts):
            memory = self.memory_mib or facts.memory_mib
            used = max(0, memory - min(memory, facts.free_memory_mib))
            return Sample(
                int(self.reactor.seconds()),
                round(float(facts.load1), 2),
                int(used),
                self.domsvc.dom.count("vm", "host", self.host_id),
            )

        return self.facts.host_facts().addCallback(sample)

    def samples_of(self, host_id: str) -> defer.Deferred:
        """Fires with host ``host_id``'s samples: this host's from its ring, another's asked of
        it over the peer endpoint; fails with :class:`HistoryUnavailable` saying why."""
        if host_id == self.host_id:
            return defer.succeed(self.ring.samples())
        return self._fetch(host_id)

    @defer.inlineCallbacks
    def _fetch(self, host_id: str):
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        if self.host_creds is None:
            raise HistoryUnavailable(host_id, f"host {self.host_id} runs without peers")
        addr = self.peer_address_of(host_id)
        if not addr:
            raise HistoryUnavailable(host_id, f"host {self.host_id} does not know where it is")
        if self._agent is None:
            from vmwebd.gossip import tls

            # The answering host must hold the certificate of the host asked about.
            self._agent = Agent(
                self.reactor,
                contextFactory=tls.client_policy(
                    self.host_creds,
                    lambda hostname, port: self._expected.get((hostname.decode("ascii", "replace"), port)),
                ),
                connectTimeout=FETCH_TIMEOUT_SECONDS,
            )
        host, _, port = addr.rpartition(":")
        try:
            self._expected[(host.strip("[]"), int(port))] = host_id
        except ValueError:
            raise HistoryUnavailable(host_id, f"its peer address {addr!r} is not host:port") from None
        try:
            d = self._agent.request(
                b"GET", f"https://{addr}/history".encode(), Headers({b"User-Agent": [b"vmwebd"]})
            )
            d.addTimeout(FETCH_TIMEOUT_SECONDS, self.reactor)
            response = yield d
            if response.code != 200:
                raise HistoryUnavailable(host_id, f"it answered HTTP {response.code}")
            if isinstance(response.length, int) and response.length > MAX_ANSWER_BYTES:
                raise HistoryUnavailable(host_id, "its answer is too large")
            body = yield readBody(response).addTimeout(FETCH_TIMEOUT_SECONDS, self.reactor)
        except HistoryUnavailable:
            raise
        except defer.TimeoutError:
            raise HistoryUnavailable(
                host_id, f"it did not answer within {FETCH_TIMEOUT_SECONDS:g} s"
            ) from None
        except Exception as e:  # refused, reset, TLS: the page says so, the log keeps the detail
            log.info("history: asking {host} at {addr}: {err!r}", host=host_id, addr=addr, err=e)
            raise HistoryUnavailable(host_id, "it could not be reached") from None
        if len(body) > MAX_ANSWER_BYTES:
            raise HistoryUnavailable(host_id, "its answer is too large")
        return from_json(body, host_id, self.ring.capacity)


__all__ = [
    "Sample",
    "HistoryRing",
    "Sampler",
    "HistoryResource",
    "HistoryService",
    "HistoryUnavailable",
    "to_json",
    "from_json",
    "INTERVAL_SECONDS",
    "CAPACITY",
]
