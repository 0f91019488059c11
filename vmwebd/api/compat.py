"""Compatibility fixes that make spyne 2.14.0 (its last release, 2019) serve over current Twisted.

Call :func:`apply` once before importing ``spyne.server.twisted``; it is cheap and idempotent, so
every module that builds a spyne resource may call it. Each fix below was found by serving a spyne
``Application`` through ``spyne.server.twisted.TwistedWebResource`` on a loopback port and calling
it with zeep (``tests/test_soap_stack.py`` keeps doing that):

1. ``twisted.python.constants`` was split out of Twisted into the ``constantly`` package (Twisted
   22.x removed the alias). ``spyne.server.twisted`` imports ``spyne.util._twisted_ws``, which does
   ``from twisted.python.constants import Flags, FlagConstant``, so the import fails with
   ``ModuleNotFoundError``. Fix: alias the module name to ``constantly`` (same API).

2. ``spyne.server.twisted.http._reconstruct_url`` (used for ``GET ?wsdl``) joins ``str`` with the
   ``bytes`` that Twisted returns on Python 3 (``request.uri``, header values), so every WSDL
   request fails with ``TypeError: sequence item 3: expected str instance, bytes found`` (HTTP
   500). Fix: a replacement that decodes first (and compares ``X-Forwarded-Proto`` as text).

3. ``TwistedHttpTransportContext.get_request_method`` / ``get_request_content_type`` return
   ``bytes`` (``b"POST"``), but ``Soap11.create_in_document`` compares the verb with ``"POST"`` and
   feeds the content type to ``cgi.parse_header``; every SOAP call is refused with HTTP 405
   ``Client.RequestNotAllowed``. Fix: return them decoded as ``str``.

4. ``MethodContext.close`` runs a full ``gc.collect()`` at the end of any request when the last
   one is over ``spyne.const.MIN_GC_INTERVAL`` (1 s) old, to return file descriptors of uploads.
   Every peer message is a SOAP request, so a daemon paid a full collection every second; with
   the replica of a 10,000-VM grid in memory one costs ~35 ms (measured on 2026-12-02), and a
   profile of a busy daemon showed 14% of its time there. We hand spyne no files (bodies are
   bytes, see below). Fix: ``MIN_GC_INTERVAL`` set to infinity; Python's own collector runs as usual.

Not patched, because :mod:`vmwebd.api.soap` runs calls through spyne's transport itself rather than
through ``TwistedWebResource.handle_rpc``: that method hands Soap11 a body Twisted keeps in a
temporary file (100,000 bytes and more, or any chunked body) as an ``mmap``, which
``_parse_xml_string`` joins as text (``TypeError: sequence item 0: expected str instance, mmap.mmap
found``); and it writes answers through a pull producer that finishes the request only on a later
pull, so a connection lost in between logs ``Producer was not unregistered``, and one lost before
the answer makes it raise on the dead request. A bare ``TwistedWebResource`` still has both faults.

Two more concern the Python version, and must be in place before spyne is first imported:
:func:`prepare_imports` installs them, and ``vmwebd/api/__init__.py`` calls it, so importing any
module of this package first is enough (code importing spyne directly imports ``vmwebd.api``
before it).

5. spyne bundles an old ``six`` (``spyne.util.six``, with names of spyne's own that the released
   six lacks) whose ``six.moves`` importer implements only ``find_module``, which the import
   system stopped calling in Python 3.12: every spyne import fails with ``No module named
   'spyne.util.six.moves'``. Fix: a finder ahead of it that answers ``find_spec`` for the names
   that importer knows and loads them through it (its ``load_module``). Installed on every Python
   version, so 3.11 runs the same code as 3.12 and 3.13.

6. spyne imports ``cgi``, removed from the standard library in Python 3.13. Fix: the
   ``legacy-cgi`` package (a dependency on 3.13 and later) provides the same module; nothing to
   patch here, but :func:`prepare_imports` fails early with a message naming it when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_applied = False
_prepared = False
_SIX_MOVES = "spyne.util.six.moves"


def prepare_imports() -> None:
    """Fixes 1, 5 and 6: what must hold before spyne is first imported (idempotent)."""
    global _prepared
    if _prepared:
        return
    _alias_twisted_constants()
    _install_six_moves_finder()
    try:
        import cgi  # noqa: F401  (spyne needs it; the standard library's until 3.12)
    except ImportError:
        raise ImportError(
            "spyne needs the cgi module, removed from Python 3.13's standard "
            "library: install the legacy-cgi package (pip install legacy-cgi)"
        ) from None
    _prepared = True


def _install_six_moves_finder() -> None:
    if not any(isinstance(f, _SixMovesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SixMovesFinder())


class _SixMovesFinder(importlib.abc.MetaPathFinder):
    """``find_spec`` for the ``spyne.util.six.moves[.X]`` modules spyne's six knows."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_SIX_MOVES):
            return None
        six = sys.modules.get("spyne.util.six")
        importer = getattr(six, "_importer", None)
        if importer is None or fullname not in getattr(importer, "known_modules", {}):
            return None
        return importlib.util.spec_from_loader(fullname, _SixMovesLoader(importer))


class _SixMovesLoader(importlib.abc.Loader):
    def __init__(self, importer):
        self.importer = importer

    def create_module(self, spec):
        return self.importer.load_module(spec.name)

    def exec_module(self, module) -> None:
        pass


def apply() -> None:
    """Install the fixes above; safe to call any number of times, from any module."""
    global _applied
    if _applied:
        return
    prepare_imports()
    # Import only after the alias exists: this import is what fix 1 repairs.
    from spyne.server.twisted import http as spyne_http

    spyne_http._reconstruct_url = _reconstruct_url
    from spyne import const as spyne_const

    spyne_const.MIN_GC_INTERVAL = float("inf")
    ctx_cls = spyne_http.TwistedHttpTransportContext
    ctx_cls.get_request_method = _get_request_method
    ctx_cls.get_request_content_type = _get_request_content_type
    _applied = True


def _alias_twisted_constants() -> None:
    try:
        import twisted.python.constants  # noqa: F401  (an older Twisted still ships it)
    except ImportError:
        import constantly

        sys.modules["twisted.python.constants"] = constantly


def _text(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def _reconstruct_url(request) -> str:
    """The URL the client used, honouring X-Forwarded-{Host,Port,Proto} like spyne meant to."""
    server_name = _text(request.getHeader(b"x-forwarded-host"))
    server_port = _text(request.getHeader(b"x-forwarded-port"))
    if server_port is not None:
        try:
            server_port = int(server_port)
        except ValueError:
            server_port = None
    proto = _text(request.getHeader(b"x-forwarded-proto"))
    is_secure = proto == "https" if proto is not None else bool(request.isSecure())
    if server_name is None:
        server_name = _text(request.getRequestHostname())
    if server_port is None:
        server_port = request.getHost().port
    if (is_secure, server_port) not in ((True, 443), (False, 80)):
        server_name = f"{server_name}:{server_port}"
    scheme = "https" if is_secure else "http"
    return f"{scheme}://{server_name}{_text(request.uri)}"


def _get_request_method(self) -> str:
    return _text(self.req.method)


def _get_request_content_type(self) -> str | None:
    return _text(self.req.getHeader(b"content-type"))
