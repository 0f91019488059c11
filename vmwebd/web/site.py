"""The web pages of one host, on the user API's port, next to ``/soap``.

Routes (every page needs a session but ``/login`` and ``/static/*``):

==========================  =====================================================================
``GET  /``                  to ``/owner``
``GET|POST /login``         the login form; a successful POST starts a session
``POST /logout``            ends it
``GET  /owner``             Owner view: users, their clusters, VMs and resources used; actions
``GET  /hosts``             Host view: liveness, capacity, load and VMs of each host
``GET  /dom``, ``/dom.xml`` DOM view (readable) and the XML to download, hashes taken out
``GET  /settings``          System settings (admins only)
``GET  /cluster/NAME``      a cluster's page; ``/vm/CLUSTER/NAME`` a VM's (owner or admin; 403
                            naming why for anyone else), ``/vm/CLUSTER/NAME/console`` its
                            console tab (xterm.js on the ``/console/CLUSTER/NAME`` WebSocket:
                            :mod:`vmwebd.console.wire`, docs/console.md)
``GET  /host/H``            a host's page: its load, used memory and VM count over the last
                            hours as charts (:mod:`vmwebd.web.charts`; any logged-in user, as the
                            host view)
``GET  /history.json?host=H`` host H's samples as JSON (this host's own, or asked of H over the
                            peer endpoint: :mod:`vmwebd.history`); any logged-in user
``GET  /state.json``        what the polling script updates in place (``data-k`` keys)
``POST /action/NAME``       create, scale, destroy, vm, migrate, (un)drain, evacuate, user/...
                            (create, delete, password, quota, key/add, key/remove), ...; with
                            ``confirm=ask``, a destructive one first answers with a page to
                            confirm it (:mod:`vmwebd.web.confirm`)
``GET  /metrics``           Prometheus metrics (:mod:`vmwebd.metrics`, put beside the pages);
                            with ``<metrics auth="login">`` an admin's session counts as a login
==========================  =====================================================================

Security: the session cookie is HttpOnly and SameSite=Strict (Secure over TLS), its name carries
the host id; every POST needs the form's CSRF token (the session's; for the login form, a
double-submit cookie) and, when the browser sends one, an Origin of this very host; all text is
escaped (:mod:`vmwebd.web.html`) and a Content-Security-Policy allows no inline script or style.
Permissions are the SOAP API's (:class:`vmwebd.app.Application`): a page or an action never does
more than the same user could do over SOAP.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from vmwebd.auth import Principal, client_address
from vmwebd.dom.records import UserRec
from vmwebd.errors import InvalidArgument, NoSuchCluster, NoSuchVm, NotAuthorized, VmwebError
from vmwebd.history import HistoryUnavailable
from vmwebd.web import charts, confirm, pages, views
from vmwebd.web.session import Session, SessionStore, hash_digest

if TYPE_CHECKING:
    from vmwebd.app import Application
    from vmwebd.auth import Authenticator
    from vmwebd.cluster import ClusterManager
    from vmwebd.config import Config
    from vmwebd.dom.document import Dom
    from vmwebd.history import HistoryService

log = Logger()

CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
MAX_FORM_BYTES = 64 * 1024
ACTION_GRACE_SECONDS = 2.0  # an action slower than this answers "on its way"; the page follows it
PAGES = ("owner", "hosts", "dom", "settings")
# Where an action may send the browser back to, besides PAGES: a cluster's or a VM's page (names
# as the cluster and template rules allow them, so the Location header stays plain ASCII).
_BACK = re.compile(r"/cluster/[a-z][a-z0-9-]{0,23}|/vm/[a-z][a-z0-9-]{0,23}/[A-Za-z0-9_.-]{1,64}")
_STATIC_TYPES = {
    "css": b"text/css; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "txt": b"text/plain; charset=utf-8",
}
# The host page's charts: uPlot (kept in static/ with its licence, uPlot.LICENSE.txt) and ours.
_CHART_STYLES = ("/static/uPlot.min.css",)
_CHART_SCRIPTS = ("/static/uPlot.iife.min.js", "/static/charts.js")
# A VM's console tab: xterm.js 5.5.0 (kept in static/ with its licence, xterm.LICENSE.txt) and ours.
_CONSOLE_STYLES = ("/static/xterm.css",)
_CONSOLE_SCRIPTS = ("/static/xterm.js", "/static/console.js")


@dataclass
class Ctx:
    """What a view needs for one request of a logged-in user."""

    principal: Principal
    session: Session
    access: Application
    mgr: object
    dom: object
    host_id: str
    query: dict = field(default_factory=dict)  # the request's arguments (a view's filter)

    @property
    def csrf(self) -> str:
        return self.session.csrf


def _load_static() -> dict[str, tuple[bytes, bytes]]:
    out = {}
    for entry in resources.files("vmwebd.web").joinpath("static").iterdir():
        ext = entry.name.rpartition(".")[2]
        if ext in _STATIC_TYPES:
            out[entry.name] = (_STATIC_TYPES[ext], entry.read_bytes())
    return out


class WebRoot(Resource):
    """The root resource of the user API port: pages here, ``/soap`` put beside them.

    ``app`` does every operation a page or an action asks for, with its permission checks; the
    rest is what the pages read: this host's id, the replica ``dom``, the cluster ``manager``
    (hosts, templates), ``authn`` (logins), ``history`` (hosts' load samples), and for the
    settings page the host's ``config``, ``gossip_config()`` (None without peers) and the
    consensus ``members()``."""

    def __init__(
        self,
        app: Application,
        *,
        reactor: Any,
        host_id: str,
        dom: Dom,
        manager: ClusterManager,
        authn: Authenticator,
        history: HistoryService,
        config: Config,
        gossip_config: Callable[[], Any],
        members: Callable[[], Sequence[str]],
        grace: float = ACTION_GRACE_SECONDS,
    ):
        super().__init__()
        self.app = app
        self.reactor = reactor
        self.host_id = host_id
        self.dom = dom
        self.manager = manager
        self.authn = authn
        self.history = history
        self.config = config
        self.gossip_config = gossip_config
        self.members = members
        self.grace = grace
        self.sessions = SessionStore(reactor)
        self.cookie = f"vmweb-session-{host_id}".encode()
        self.login_cookie = f"vmweb-login-{host_id}".encode()
        self.static = _load_static()

    def getChild(self, path: bytes, request):
        return _Page(self, path)

    def logged_in(self, request) -> tuple[Session, UserRec] | None:
        """The session of this request and its user, or None (no cookie, expired, password
        changed: such a session is dropped)."""
        token = request.getCookie(self.cookie)
        session = self.sessions.get(token.decode("ascii", "replace") if token else None)
        if session is None:
            return None
        rec = self.dom.get(UserRec, session.user)
        if rec is None or hash_digest(rec.password_hash) != session.hash_digest:
            self.sessions.drop(session.token)
            return None
        return session, rec

    def session_user(self, request) -> Principal | None:
        """The logged-in user of this request (what other resources on this port, such as
        ``/metrics``, accept as a login), or None."""
        found = self.logged_in(request)
        return Principal(found[1].id, found[1].role) if found is not None else None


class _Page(Resource):
    isLeaf = True

    def __init__(self, root: WebRoot, name: bytes):
        super().__init__()
        self.root = root
        self.name = name.decode("utf-8", "replace")

    # -- plumbing --------------------------------------------------------------------------
    def render(self, request):
        request.setHeader(b"Content-Security-Policy", CSP)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"same-origin")
        request.setHeader(b"X-Frame-Options", b"DENY")
        rest = [p.decode("utf-8", "replace") for p in request.postpath]
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        try:
            if method == b"GET":
                return self._get(request, rest)
            if method == b"POST":
                return self._post(request, rest)
        except _Refused as r:
            return self._refused(request, r)
        request.setHeader(b"Allow", b"GET, HEAD, POST")
        return self._plain(request, 405, "method not allowed")

    def _get(self, request, rest):
        name = self.name
        if name == "" and not rest:
            return self._redirect(request, "/owner")
        if name == "static" and len(rest) == 1 and rest[0] in self.root.static:
            ctype, body = self.root.static[rest[0]]
            request.setHeader(b"Content-Type", ctype)
            request.setHeader(b"Cache-Control", b"no-cache")
            return body
        if name == "login" and not rest:
            return self._login_page(request)
        if name in PAGES and not rest:
            ctx = self._ctx(request)
            if ctx is None:
                return self._redirect(request, "/login")
            return self._view(request, ctx)
        if (name, len(rest)) in (("cluster", 1), ("vm", 2)) or (name == "vm" and rest[2:] == ["console"]):
            ctx = self._ctx(request)
            if ctx is None:
                return self._redirect(request, "/login")
            return self._detail(request, ctx, rest)
        if name == "host" and len(rest) == 1:
            ctx = self._ctx(request)
            if ctx is None:
                return self._redirect(request, "/login")
            return self._host_page(request, ctx, rest[0])
        if name == "history.json" and not rest:
            return self._history_json(request)
        if name == "dom.xml" and not rest:
            ctx = self._need_ctx(request)
            request.setHeader(b"Content-Type", b"application/xml; charset=utf-8")
            request.setHeader(
                b"Content-Disposition", f'attachment; filename="vmweb-dom-{self.root.host_id}.xml"'.encode()
            )
            request.setHeader(b"Cache-Control", b"no-store")
            return ctx.access.dom_xml(ctx.principal)
        if name == "state.json" and not rest:
            ctx = self._ctx(request)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            if ctx is None:
                request.setResponseCode(401)
                return b'{"error": "not logged in"}'
            return json.dumps(views.live_state(ctx)).encode()
        return self._plain(request, 404, "no such page")

    def _post(self, request, rest):
        size = request.content.seek(0, 2)
        request.content.seek(0)
        if size > MAX_FORM_BYTES:
            raise _Refused(413, "This form is too large.")
        self._check_origin(request)
        name = self.name
        if name == "login" and not rest:
            return self._login(request)
        ctx = self._need_ctx(request)
        if not ctx.session.csrf_ok(_field(request, "csrf")):
            log.info(
                "web: {what} by {user} refused: missing or wrong CSRF token",
                what=request.path,
                user=ctx.principal.name,
            )
            raise _Refused(
                403,
                "This form was not sent from this page (its security token is "
                "missing or out of date). Reload the page and try again.",
            )
        if name == "logout" and not rest:
            self.root.sessions.drop(ctx.session.token)
            request.addCookie(
                self.root.cookie,
                b"",
                path=b"/",
                max_age=b"0",
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure(),
            )
            return self._redirect(request, "/login")
        if name == "action" and rest:
            return self._action(request, ctx, "/".join(rest))
        return self._plain(request, 404, "no such action")

    def _check_origin(self, request) -> None:
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        host = request.getHeader(b"host") or b""
        scheme = b"https" if request.isSecure() else b"http"
        if origin != scheme + b"://" + host:
            raise _Refused(403, "This form was sent from another site.")

    def _ctx(self, request) -> Ctx | None:
        """The logged-in user of this request, or None (no cookie, expired, password changed)."""
        found = self.root.logged_in(request)
        if found is None:
            return None
        session, rec = found
        root = self.root
        return Ctx(
            Principal(rec.id, rec.role),
            session,
            root.app,
            root.manager,
            root.dom,
            root.host_id,
            request.args if request.method != b"POST" else {},
        )

    def _need_ctx(self, request) -> Ctx:
        ctx = self._ctx(request)
        if ctx is None:
            raise _Refused(403, "You are not logged in (or your session ended). Log in again.", login=True)
        return ctx

    def _html(self, request, markup, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return markup.encode("utf-8")

    def _plain(self, request, code: int, text: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return (text + "\n").encode()

    def _redirect(self, request, location: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", location.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return b""

    def _refused(self, request, r: "_Refused") -> bytes:
        body = views.forbidden_view(r.text)
        if r.login:
            from vmwebd.web.html import el, frag

            body = frag(body, el("p", el("a", "Log in", href="/login", class_="button")))
        return self._html(request, views.page("Refused", self.root.host_id, body), r.code)

    # -- pages -----------------------------------------------------------------------------
    def _view(self, request, ctx: Ctx):
        partial = request.getHeader(b"x-vmweb-partial") is not None
        flashes = [] if partial else ctx.session.take_flashes()
        name = self.name
        if name == "settings" and not ctx.principal.is_admin:
            body = views.forbidden_view(
                f"System settings are for admins; user {ctx.principal.name!r} is not one."
            )
            html = views.page(
                "System settings", ctx.host_id, body, ctx.principal, ctx.csrf, "/settings", flashes
            )
            return self._html(request, html, 403)
        if name == "owner":
            title, body = "Owners", views.owner_view(ctx)
        elif name == "hosts":
            title, body = "Hosts", views.host_view(ctx)
        elif name == "dom":
            title, body = "Cluster DOM", views.dom_view(ctx, ctx.access.dom_xml(ctx.principal))
        else:
            title, body = (
                "System settings",
                views.settings_view(ctx, self.root.config, self.root.gossip_config(), self.root.members()),
            )
        live = name in ("owner", "hosts")
        return self._html(
            request,
            views.page(title, ctx.host_id, body, ctx.principal, ctx.csrf, f"/{name}", flashes, live=live),
        )

    def _detail(self, request, ctx: Ctx, rest: list[str]):
        """A cluster's or a VM's page; another user's is refused (403) saying why, one that does
        not exist is 404."""
        partial = request.getHeader(b"x-vmweb-partial") is not None
        flashes = [] if partial else ctx.session.take_flashes()
        console = len(rest) == 3
        nonce = secrets.token_urlsafe(16) if console else ""
        try:
            if self.name == "cluster":
                title, body = pages.cluster_page(ctx, rest[0])
            elif console:
                title, body = pages.vm_console_page(ctx, rest[0], rest[1], nonce)
            else:
                title, body = pages.vm_page(ctx, rest[0], rest[1])
        except NotAuthorized as e:
            log.info(
                "web: {user} refused {path}: {why}", user=ctx.principal.name, path=request.path, why=e.message
            )
            from vmwebd.web.html import el, frag

            body = frag(
                views.forbidden_view(f"Refused: {e.message}."),
                el("p", el("a", "Back to the owner view", href="/owner", class_="button")),
            )
            return self._html(
                request,
                views.page("Refused", ctx.host_id, body, ctx.principal, ctx.csrf, flashes=flashes),
                403,
            )
        except (NoSuchCluster, NoSuchVm, InvalidArgument) as e:
            from vmwebd.web.html import el, frag

            body = frag(
                views.forbidden_view(e.message),
                el("p", el("a", "Back to the owner view", href="/owner", class_="button")),
            )
            return self._html(
                request,
                views.page("Not found", ctx.host_id, body, ctx.principal, ctx.csrf, flashes=flashes),
                404,
            )
        if console:
            # xterm.js draws with <style> elements it makes: only those carrying this response's
            # nonce (console.js stamps it on them) are allowed; the rest of the policy is the same.
            request.setHeader(
                b"Content-Security-Policy",
                CSP.replace(b"style-src 'self'", b"style-src 'self' 'nonce-" + nonce.encode() + b"'"),
            )
            return self._html(
                request,
                views.page(
                    title,
                    ctx.host_id,
                    body,
                    ctx.principal,
                    ctx.csrf,
                    "",
                    flashes,
                    styles=_CONSOLE_STYLES,
                    scripts=_CONSOLE_SCRIPTS,
                ),
            )
        return self._html(
            request, views.page(title, ctx.host_id, body, ctx.principal, ctx.csrf, "", flashes, live=True)
        )

    def _host_page(self, request, ctx: Ctx, host: str):
        """A host's page with its charts; the samples are this host's or asked of that host (a
        host that cannot be asked leaves the charts empty, the page saying why)."""
        partial = request.getHeader(b"x-vmweb-partial") is not None
        flashes = [] if partial else ctx.session.take_flashes()
        if host not in {h.id for h in ctx.mgr.hosts()}:
            from vmwebd.web.html import el, frag

            body = frag(
                views.forbidden_view(f"There is no host {host!r} in this grid."),
                el("p", el("a", "Back to the host view", href="/hosts", class_="button")),
            )
            return self._html(
                request,
                views.page("Not found", ctx.host_id, body, ctx.principal, ctx.csrf, flashes=flashes),
                404,
            )
        d = self.root.history.samples_of(host)

        def unavailable(f):
            f.trap(HistoryUnavailable)
            return f.value

        def render(result):
            samples, error = (
                ([], result.message) if isinstance(result, HistoryUnavailable) else (result, None)
            )
            title, body = charts.host_page(ctx, host, samples, error)
            return self._html(
                request,
                views.page(
                    title,
                    ctx.host_id,
                    body,
                    ctx.principal,
                    ctx.csrf,
                    "/hosts",
                    flashes,
                    live=True,
                    styles=_CHART_STYLES,
                    scripts=_CHART_SCRIPTS,
                ),
            )

        d.addCallbacks(lambda samples: samples, unavailable).addCallback(render)
        return _deliver(request, d)

    def _history_json(self, request):
        """``{"host", "interval_s", "samples": [[t, load1, mem_used_mib, vms], ...]}`` for any
        logged-in user (hosts are shown to every user); 401 without a session, 404 for a host
        not in the grid, 502 when that host cannot be asked (``{"error": why}``)."""
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        ctx = self._ctx(request)
        if ctx is None:
            request.setResponseCode(401)
            return b'{"error": "not logged in"}'
        host = _field(request, "host")
        if host not in {h.id for h in ctx.mgr.hosts()}:
            request.setResponseCode(404)
            return json.dumps({"error": f"there is no host {host!r} in this grid"}).encode()
        history = self.root.history

        def ok(samples):
            return json.dumps(
                {
                    "host": host,
                    "interval_s": history.ring.interval,
                    "samples": [s.as_list() for s in samples],
                },
                separators=(",", ":"),
            ).encode()

        def unavailable(f):
            f.trap(HistoryUnavailable)
            request.setResponseCode(502)
            return json.dumps({"error": f.value.message}).encode()

        return _deliver(request, history.samples_of(host).addCallbacks(ok, unavailable))

    def _login_page(self, request, name: str = "", flashes=(), code: int = 200):
        import re
        import secrets

        # Reuse the browser's current login token when it has one: a browser may load the login
        # page twice (a prerender, a reload in another tab) and must not be left showing a form
        # whose token no longer matches its cookie.
        have = (request.getCookie(self.root.login_cookie) or b"").decode("ascii", "replace")
        token = have if re.fullmatch(r"[A-Za-z0-9_-]{32}", have) else secrets.token_urlsafe(24)
        request.addCookie(
            self.root.login_cookie,
            token.encode(),
            path=b"/login",
            max_age=b"3600",
            httpOnly=True,
            sameSite="strict",
            secure=request.isSecure(),
        )
        return self._html(request, views.login_page(self.root.host_id, token, name, flashes), code)

    def _login(self, request):
        cookie = request.getCookie(self.root.login_cookie)
        sent = _field(request, "csrf")
        name, password = _field(request, "name"), _field(request, "password")
        if not cookie or not sent or not _same(cookie.decode("ascii", "replace"), sent):
            return self._login_page(
                request, name, [("error", "The login form was out of date; try again.")], 403
            )
        d = self.root.authn.authenticate(name, password, client_address(request))

        def ok(principal: Principal):
            rec = self.root.dom.get(UserRec, principal.name)
            session = self.root.sessions.create(principal.name, rec.password_hash)
            request.addCookie(
                self.root.cookie,
                session.token.encode(),
                path=b"/",
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure(),
            )
            request.addCookie(
                self.root.login_cookie,
                b"",
                path=b"/login",
                max_age=b"0",
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure(),
            )
            log.info(
                "web: user {user} logged in from {client}",
                user=principal.name,
                client=client_address(request),
            )
            return self._redirect(request, "/owner")

        def refused(f):
            f.trap(NotAuthorized)
            return self._login_page(request, name, [("error", f.value.message)], 200)

        d.addCallbacks(ok, refused)
        return _deliver(request, d)

    # -- actions ---------------------------------------------------------------------------
    def _action(self, request, ctx: Ctx, action: str):
        back = _field(request, "back")
        back = back if back in {f"/{p}" for p in PAGES} or _BACK.fullmatch(back) else "/owner"
        a, p = ctx.access, ctx.principal
        f = lambda k: _field(request, k)
        if f("confirm") == "ask":
            try:
                q = confirm.question(ctx, action, f)
            except VmwebError as e:
                ctx.session.flash("error", e.message)
                return self._redirect(request, back)
            if q is not None:
                fields = [
                    (k.decode("utf-8", "replace"), v.decode("utf-8", "replace"))
                    for k, vs in request.args.items()
                    for v in vs
                ]
                return self._html(
                    request,
                    views.page(
                        "Confirm",
                        ctx.host_id,
                        confirm.confirm_view(q, action, fields, ctx.csrf, back),
                        ctx.principal,
                        ctx.csrf,
                    ),
                )
        if action == "create":
            name = f("name")
            call = lambda: a.create_cluster(p, name, f("template"), f("owner"), _int(f("count"), "count"))
            done = lambda c: f"Cluster {c.name} recorded: {len(c.vms)} VMs are booting."
            slow = f"Creating cluster {name}…"
        elif action == "scale":
            name, count = f("cluster"), f("count")
            call = lambda: a.scale_cluster(p, name, _int(count, "count"))
            done = lambda c: f"Cluster {c.name} scaled to {c.count} VMs."
            slow = f"Scaling cluster {name} to {count} VMs…"
        elif action == "destroy":
            name = f("cluster")
            call = lambda: a.destroy_cluster(p, name)
            done = lambda ok: (
                f"Cluster {name} destroyed."
                if ok
                else (
                    f"Cluster {name} is being destroyed"
                    + (
                        f"; it waits for host(s) {', '.join(w)}, not alive (an admin can evacuate them "
                        "on the host view)."
                        if (w := self.root.manager.hosts_not_alive(name))
                        else "."
                    )
                )
            )
            slow = f"Destroying cluster {name}…"
        elif action == "vm":
            cluster, vm, op = f("cluster"), f("vm"), f("op")
            if op not in ("start", "stop"):
                op = "start"
            call = lambda: a.set_vm_power(p, cluster, vm, "running" if op == "start" else "stopped")
            done = lambda v: f"VM {vm} of {cluster} is {v.state}."
            slow = f"{'Starting' if op == 'start' else 'Stopping'} VM {vm} of {cluster}…"
        elif action == "migrate":
            cluster, vm = f("cluster"), f("vm")
            call = lambda: a.migrate_vm(p, cluster, vm, f("to") or None)
            done = lambda m: f"VM {vm} of {cluster} is moving from {m.source} to {m.dest} ({m.mode})."
            slow = f"Reserving a move of VM {vm} of {cluster}…"
        elif action in ("drain", "undrain"):
            host = f("host")
            if action == "drain":
                call = lambda: a.drain_host(p, host)
                done = lambda r: (
                    f"Host {host} is draining: {len(r[0])} VMs moving away"
                    + (f"; not movable now: {'; '.join(f'{vm}: {why}' for vm, why in r[1])}" if r[1] else "")
                    + "."
                )
                slow = f"Draining host {host}…"
            else:
                call = lambda: a.undrain_host(p, host)
                done = lambda _: f"Host {host} takes new VMs again."
                slow = f"Ending the drain of host {host}…"
        elif action == "evacuate":
            host = f("host")
            call = lambda: a.evacuate_host(p, host)
            done = lambda ms: _evacuated(host, ms)
            slow = f"Evacuating host {host}…"
        elif action == "setting":
            key = f("key")
            call = lambda: a.set_setting(p, key, f("value"))
            done = lambda rec: f"Setting {rec.id} is now {rec.value}."
            slow = f"Saving setting {key}…"
        elif action == "user/create":
            name = f("name")
            call = lambda: a.create_user(
                p,
                name,
                f("password"),
                f("role") or "user",
                _int(f("quota") or "16", "quota"),
            )
            done = lambda u: f"User {u.name} created ({u.role}, quota {u.quota_vms} VMs)."
            slow = f"Creating user {name}…"
        elif action == "user/delete":
            name = f("name")
            call = lambda: a.delete_user(p, name)
            done = lambda _: f"User {name} deleted."
            slow = f"Deleting user {name}…"
        elif action == "user/password":
            name = f("name")
            call = lambda: a.set_password(p, name, f("password"))

            def done(_):
                if name == p.name:  # the login making this request stays; the user's other logins end
                    rec = ctx.dom.get(UserRec, name)
                    if rec is not None:
                        ctx.session.hash_digest = hash_digest(rec.password_hash)
                return f"Password of {name} changed."

            slow = f"Changing the password of {name}…"
        elif action == "user/key/add":
            name = f("name")
            call = lambda: a.add_ssh_key_file(p, name, f("key"))
            done = lambda ks: (
                f"SSH key{'s' if len(ks) > 1 else ''} {', '.join(k.fingerprint for k in ks)} added to {name}."
            )
            slow = f"Adding SSH keys to {name}…"
        elif action == "user/key/remove":
            name = f("name")
            call = lambda: a.remove_ssh_key(p, name, f("fingerprint"))
            done = lambda k: f"SSH key {k.fingerprint} removed from {name}."
            slow = f"Removing an SSH key of {name}…"
        elif action == "user/quota":
            name = f("name")
            call = lambda: a.set_quota(p, name, _int(f("quota"), "quota"))
            done = lambda u: f"Quota of {u.name} is now {u.quota_vms} VMs."
            slow = f"Changing the quota of {name}…"
        else:
            return self._plain(request, 404, "no such action")
        log.info("web: {user} asks {action}", user=p.name, action=action)
        return self._run(request, ctx, defer.maybeDeferred(call), done, slow, back)

    def _run(self, request, ctx: Ctx, d: defer.Deferred, done, slow: str, back: str):
        """Answers with a redirect to ``back`` once ``d`` fires, or after a short grace with
        "on its way" (the page then follows the change live); the outcome lands in the session's
        flash messages either way."""
        answered = []
        gone = []
        request.notifyFinish().addBoth(gone.append)
        session = ctx.session

        def answer():
            if not answered and not gone:
                answered.append(1)
                request.write(self._redirect(request, back))
                request.finish()

        def slow_answer():
            if not answered:
                session.flash("ok", slow)
                answer()

        timer = self.root.reactor.callLater(self.root.grace, slow_answer)

        def ok(result):
            session.flash("ok", done(result))
            if timer.active():
                timer.cancel()
            answer()

        def failed(f):
            session.flash("error", _error_text(f))
            if timer.active():
                timer.cancel()
            answer()

        d.addCallbacks(ok, failed)
        return NOT_DONE_YET


class _Refused(Exception):
    def __init__(self, code: int, text: str, login: bool = False):
        super().__init__(text)
        self.code, self.text, self.login = code, text, login


def _field(request, name: str) -> str:
    values = request.args.get(name.encode()) if request.args else None
    if not values:
        return ""
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(name, "is not UTF-8 text") from None


def _int(text: str, field: str) -> int:
    try:
        return int(text.strip())
    except (ValueError, AttributeError):
        raise InvalidArgument(field, f"{text!r} is not a whole number") from None


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _error_text(f) -> str:
    if isinstance(f.value, VmwebError):
        return f.value.message
    incident = uuid.uuid4().hex[:12]
    log.failure("web action crashed (incident {incident})", failure=f, incident=incident)
    return f"Internal error (incident {incident}); see the daemon log."


def _deliver(request, d: defer.Deferred):
    """Writes what ``d`` fires with (bytes) as the response, unless the client went away."""
    gone = []
    request.notifyFinish().addBoth(gone.append)

    def write(body):
        if not gone:
            request.write(body)
            request.finish()

    def crashed(f):
        incident = uuid.uuid4().hex[:12]
        log.failure("web request crashed (incident {incident})", failure=f, incident=incident)
        if not gone:
            request.setResponseCode(500)
            request.write(f"internal error (incident {incident})\n".encode())
            request.finish()

    d.addCallback(write).addErrback(crashed)
    return NOT_DONE_YET


def _evacuated(host: str, ms: list) -> str:
    """What an evacuation did, in a sentence: VMs re-placed, moves to the host it failed."""
    placed = [m for m in ms if m.mode == "evacuate"]
    failed = [m.vm for m in ms if m.mode != "evacuate" and m.phase == "failed"]
    said = f"Host {host}: {len(placed)} VMs re-placed on live hosts, booting afresh" if placed else ""
    if failed:
        said += "; " if said else f"Host {host}: "
        said += f"the moves of {', '.join(failed)} to it failed (restored at their source)"
    return (said + ".") if said else f"Host {host} had no VMs to re-place."
