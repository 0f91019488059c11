"""Requests per second of a trivial SOAP call through build_soap_resource vs a plain twisted.web resource.

One run starts one server process (the real reactor, both resources on one loopback port:
``/soap`` and ``/plain``, both POSTed the same SOAP request) and loads each resource in turn from this process, with a few threads
each holding one persistent HTTP/1.1 connection (http.client keep-alive loops). Each phase has a
short warm-up and a fixed duration, so the whole run is bounded (about 2 x (warmup + duration)).

    .venv/bin/python bench/soap.py                       # local Ping service
    .venv/bin/python bench/soap.py --service vmwebd.api.user:UserApi --operation ListTemplates \
        --tns urn:vmweb:api:1

Figures are for this machine's loopback and a Python client: the client costs CPU too, so the
plain figure is a floor of what Twisted can do, and the ratio is what matters.
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

# isort: off
import vmwebd.api  # noqa: F401  (spyne's compatibility fixes come before spyne)

# isort: on
from spyne import Service, Unicode, rpc

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
PLAIN_BODY = b"pong"


class PingService(Service):
    """The default load: a no-argument operation returning a short string."""

    @rpc(_returns=Unicode)
    def Ping(ctx):
        return "pong"


# -- server side (child process) ----------------------------------------------------------------
def serve(service_ref: str, tns: str) -> None:
    """Serve /soap and /plain on 127.0.0.1, print the port, run until stdin closes."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Protocol
    from twisted.internet.stdio import StandardIO
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from vmwebd.api.soap import build_soap_resource

    class Plain(Resource):
        isLeaf = True

        def render(self, request):
            request.content.read()
            request.setHeader(b"Content-Type", b"text/plain")
            return PLAIN_BODY

    class StopOnEOF(Protocol):
        def connectionLost(self, reason):
            reactor.stop()

    root = Resource()
    root.putChild(b"soap", build_soap_resource([load_service(service_ref)], tns=tns, name="Bench"))
    root.putChild(b"plain", Plain())
    site = Site(root)
    site.log = lambda request: None  # access logging would dominate both figures
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    StandardIO(StopOnEOF())
    reactor.run()


def load_service(ref: str) -> type:
    if ref == "ping":
        return PingService
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# -- client side ----------------------------------------------------------------------------------
def soap_body(tns: str, operation: str, inner: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?><e:Envelope xmlns:e="{SOAP_ENV}" xmlns:t="{tns}">'
        f"<e:Body><t:{operation}>{inner}</t:{operation}></e:Body></e:Envelope>"
    ).encode()


def load(
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict,
    threads: int,
    warmup: float,
    duration: float,
) -> tuple[float, int]:
    """Requests/s over ``duration`` seconds after ``warmup``, and how many answers were not 200."""
    counts = [0] * threads
    errors = [0] * threads
    start_event = threading.Event()
    deadline = [0.0, 0.0]  # measuring starts at deadline[0], stops at deadline[1]

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start_event.wait()
        while True:
            now = time.perf_counter()
            if now >= deadline[1]:
                break
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if now >= deadline[0]:
                counts[i] += 1
                errors[i] += response.status != 200
        conn.close()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    t0 = time.perf_counter()
    deadline[0], deadline[1] = t0 + warmup, t0 + warmup + duration
    start_event.set()
    for w in workers:
        w.join(warmup + duration + 60)
    return sum(counts) / duration, sum(errors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", default="ping", help="'ping' or module:ServiceClass (default: ping)")
    parser.add_argument("--operation", default="Ping", help="operation to call (default: Ping)")
    parser.add_argument("--args-xml", default="", help="inner XML of the request element (default: none)")
    parser.add_argument(
        "--tns", default="urn:vmweb:bench:1", help="target namespace (default: urn:vmweb:bench:1)"
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="client threads, one connection each (default: 4)"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per phase (default: 3)")
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="seconds of warm-up per phase (default: 0.5)"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args.service, args.tns)
        return 0

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--service", args.service, "--tns", args.tns],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        body = soap_body(args.tns, args.operation, args.args_xml)
        soap_headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": f'"{args.operation}"'}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # one check call first
        conn.request("POST", "/soap", body=body, headers=soap_headers)
        check = conn.getresponse()
        answer = check.read()
        conn.close()
        if check.status != 200:
            print(f"SOAP check call failed: HTTP {check.status}: {answer[:500]!r}", file=sys.stderr)
            return 1

        common = dict(threads=args.threads, warmup=args.warmup, duration=args.duration)
        soap_rps, soap_err = load(port, "POST", "/soap", body, soap_headers, **common)
        # The plain resource gets the same POST (body and headers): twisted.web's own request
        # handling (e.g. Content-Type parsing for POST) is then in both figures, not in the ratio.
        plain_rps, plain_err = load(port, "POST", "/plain", body, soap_headers, **common)
    finally:
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    print(
        f"SOAP  {args.operation} via build_soap_resource: {soap_rps:8.0f} req/s"
        f"  ({len(answer)} byte answer, {soap_err} non-200)"
    )
    print(
        f"plain twisted.web resource:            {plain_rps:8.0f} req/s"
        f"  ({len(PLAIN_BODY)} byte answer, {plain_err} non-200)"
    )
    print(
        f"ratio plain/SOAP: {plain_rps / soap_rps:.1f}x  "
        f"(about {1e6 / soap_rps - 1e6 / plain_rps:.0f} us more server time per SOAP call; "
        f"{args.threads} keep-alive connections, {args.duration:g} s each)"
    )
    return 0 if soap_err == plain_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
