"""``vmwebd --config PATH``: the daemon's entry point (the only place that touches the global reactor).

``vmwebd --print-example-config`` prints the example ``vmwebd.xml`` shipped in the package;
``vmwebd --write-example-config DIR`` writes it and the scenario templates it names into DIR
(e.g. ``/etc/vmwebd``), overwriting nothing; ``vmwebd --version`` prints the version.

It validates the config before anything starts (a ConfigError names file, line and field and the
daemon exits 2 without starting half-configured), then runs a :class:`~vmwebd.node.Node`, telling
systemd READY / STATUS / WATCHDOG / STOPPING over ``NOTIFY_SOCKET`` when it is set.

The log goes to journald, with priorities and fields, when systemd connected our output to the
journal (``--log-target auto``, the default; ``journal`` or ``text`` to choose), else one line
per event on standard error (see :mod:`vmwebd.logs`).
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import defer, task
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogBeginner

from vmwebd import examples, logs, version
from vmwebd.config import load_config
from vmwebd.errors import ConfigError, VmwebError
from vmwebd.net.host import check_network

log = Logger()


def _missing_hypervisor_binding() -> str:
    """Why the daemon cannot talk to libvirt on this Python, or "" (the CLI installs without
    the binding; the daemon needs it: the ``daemon`` extra)."""
    try:
        import libvirt  # noqa: F401
    except ImportError as e:
        return (
            f"the libvirt Python binding (package libvirt-python) is not installed for "
            f"{sys.executable} ({e}); install vmweb with its daemon extra: "
            "pip install 'vmweb[daemon]'"
        )
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vmwebd", description="vmweb daemon: one per physical host")
    ap.add_argument("--config", default="/etc/vmwebd/vmwebd.xml", help="path to vmwebd.xml")
    ap.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync of the DOM journal (throw-away demos and tests only)",
    )
    ap.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warn", "error"],
        help="the least important messages logged (default info)",
    )
    ap.add_argument(
        "--log-target",
        default="auto",
        choices=logs.TARGETS,
        help="journal: entries with priorities and fields to journald; text: one "
        "line per event on standard error; auto (default): journal when systemd "
        "connected our output to the journal ($JOURNAL_STREAM), else text",
    )
    ap.add_argument(
        "--journal-socket",
        default=logs.JOURNAL_SOCKET,
        metavar="PATH",
        help=f"journald's native socket (default {logs.JOURNAL_SOCKET}; empty: write "
        "<N>-prefixed lines to the journal stream instead)",
    )
    ap.add_argument(
        "--version", action="version", version=f"vmwebd {version()}", help="print vmwebd's version and exit"
    )
    example = ap.add_mutually_exclusive_group()
    example.add_argument(
        "--print-example-config", action="store_true", help="print the example vmwebd.xml and exit"
    )
    example.add_argument(
        "--write-example-config",
        metavar="DIR",
        help="write the example vmwebd.xml and its templates/ into DIR (made if "
        "missing; no file is overwritten) and exit",
    )
    args = ap.parse_args(argv)
    if args.print_example_config:
        sys.stdout.write(examples.example_config())
        return 0
    if args.write_example_config:
        try:
            written = examples.write_example_config(args.write_example_config)
        except OSError as e:
            print(f"vmwebd: --write-example-config: {e}", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}")
        return 0
    missing = _missing_hypervisor_binding()
    if missing:
        print(f"vmwebd: {missing}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        check_network(config)
    except ConfigError as e:
        print(f"vmwebd: configuration error: {e}", file=sys.stderr)
        return 2
    # spyne logs every fault through the stdlib at ERROR; our SOAP stack already logs them once,
    # with the right level, through twisted.logger.
    import logging

    logging.getLogger("spyne").setLevel(logging.CRITICAL)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(args.log_level))
    observer = logs.make_observer(args.log_target, socket_path=args.journal_socket or None)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])], redirectStandardIO=False)

    from twisted.internet import reactor

    from vmwebd.node import Node
    from vmwebd.sdnotify import Notifier

    notifier = Notifier()
    node = Node(config, reactor, fsync=not args.no_fsync)
    exit_code = [0]

    def started(_):
        notifier.status(f"serving {config.host.id} on {node.api_url}")
        notifier.ready()
        interval = notifier.watchdog_interval()
        if interval:
            wd = task.LoopingCall(notifier.watchdog)
            wd.clock = reactor
            wd.start(interval / 2, now=True)

    def failed(f):
        if f.check(VmwebError):
            print(f"vmwebd: cannot start host {config.host.id}: {f.value}", file=sys.stderr)
        else:
            log.failure("vmwebd failed to start", failure=f)
        exit_code[0] = 1
        reactor.stop()

    @defer.inlineCallbacks
    def shutdown():
        notifier.stopping()
        yield node.stop()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.callWhenRunning(lambda: node.start().addCallbacks(started, failed))
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    sys.exit(main())
