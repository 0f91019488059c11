"""The four views (owner, host, DOM, settings), the login page and the live state, as HTML.

Every function takes what it shows and returns :class:`~vmwebd.web.html.Markup`; all text goes
through :func:`~vmwebd.web.html.el`, which escapes it. Elements whose text changes while a
cluster comes up carry ``data-k`` keys; :func:`live_state` gives the current value of each key,
and ``static/vmweb.js`` polls it and updates them in place (see :mod:`vmwebd.web.site`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from urllib.parse import quote

from vmwebd.dom.records import LeaseRec, VmRec
from vmwebd.settings import SETTINGS, all_settings
from vmwebd.templates import min_count
from vmwebd.web.charts import host_href
from vmwebd.web.filters import HOST_STATES, VM_STATES, Filter, filter_form
from vmwebd.web.html import Markup, el, frag

NAV = [("/owner", "Owners"), ("/hosts", "Hosts"), ("/dom", "DOM"), ("/settings", "Settings")]


def api_url(api: str) -> str:
    """A host's base URL from its DOM record's ``api``: ``https://host:port`` as is (TLS), a bare
    ``host:port`` is plain HTTP."""
    return api if api.startswith(("https://", "http://")) else f"http://{api}"


def _mib(n) -> str:
    n = int(n or 0)
    return f"{n / 1024:.1f} GiB" if n >= 1024 else f"{n} MiB"


def _pct(used, total) -> int:
    return max(0, min(100, round(100 * used / total))) if total else 0


def meter(used, total, label: str, key: str | None = None) -> Markup:
    """A bar with its text (``label`` like "3 of 8 VMs"); with ``key``, both follow the live state."""
    return el(
        "span",
        _bar(_pct(used, total), key),
        el("span", label, data_k=key, class_="meter-label"),
        class_="meter-wrap",
    )


def _bar(pct: int, key: str | None = None) -> Markup:
    # The width is a class (w0..w100 in steps of 5), not an inline style: the CSP forbids those.
    return el("span", el("span", class_=bar_class(pct), data_w=f"{key}:w" if key else None), class_="meter")


def bar_class(pct: int) -> str:
    step = min(100, 5 * round(pct / 5))
    return f"fill w{step}" + (" hot" if pct >= 90 else "")


def badge(state: str, key: str | None = None) -> Markup:
    return el("span", state, class_="badge", data_state=state, data_k=key)


def csrf_field(csrf: str) -> Markup:
    return el("input", type="hidden", name="csrf", value=csrf)


def post_form(
    action: str, csrf: str, *fields, back: str | None = None, class_: str = "inline", confirm: bool = False
) -> Markup:
    """A POST form with its CSRF token; with ``confirm``, the action first answers with a page
    asking to confirm what it would destroy (see :mod:`vmwebd.web.confirm`)."""
    return el(
        "form",
        csrf_field(csrf),
        el("input", type="hidden", name="back", value=back) if back else None,
        el("input", type="hidden", name="confirm", value="ask") if confirm else None,
        *fields,
        method="post",
        action=action,
        class_=class_,
    )


def cluster_href(cluster: str) -> str:
    """The URL of a cluster's page."""
    return f"/cluster/{quote(cluster, safe='')}"


def vm_href(cluster: str, vm: str) -> str:
    """The URL of a VM's page."""
    return f"/vm/{quote(cluster, safe='')}/{quote(vm, safe='')}"


def page(
    title: str,
    host_id: str,
    body: Markup,
    principal=None,
    csrf: str | None = None,
    current: str = "",
    flashes=(),
    live: bool = False,
    styles=(),
    scripts=(),
) -> Markup:
    """The whole page around ``body``: header with navigation and the user, flash messages
    (``styles``, ``scripts``: more of our own static files the page needs)."""
    nav = []
    if principal is not None:
        for href, label in NAV:
            if href == "/settings" and not principal.is_admin:
                continue
            nav.append(
                el(
                    "a",
                    label,
                    href=href,
                    class_="current" if href == current else None,
                    aria_current="page" if href == current else None,
                )
            )
    who = None
    if principal is not None:
        who = el(
            "div",
            el("span", principal.name, class_="user"),
            el("span", principal.role, class_="role"),
            post_form("/logout", csrf, el("button", "Log out", type="submit", class_="link")),
            class_="who",
        )
    flash_html = [
        el("p", text, class_=f"flash {kind}", role="alert" if kind == "error" else "status")
        for kind, text in flashes
    ]
    return Markup("<!DOCTYPE html>\n") + el(
        "html",
        el(
            "head",
            el("meta", charset="utf-8"),
            el("meta", name="viewport", content="width=device-width, initial-scale=1"),
            el("title", f"{title} · vmweb · {host_id}"),
            el("link", rel="stylesheet", href="/static/vmweb.css"),
            *[el("link", rel="stylesheet", href=href) for href in styles],
            el("script", src="/static/vmweb.js", defer=True) if live else None,
            *[el("script", src=src, defer=True) for src in scripts],
        ),
        el(
            "body",
            el(
                "header",
                el(
                    "a",
                    el("strong", "vmweb"),
                    " ",
                    el("span", host_id, class_="host"),
                    href="/owner",
                    class_="brand",
                ),
                el("nav", *nav) if nav else None,
                who,
            ),
            el("main", el("div", *flash_html, id="flashes"), el("h1", title), body),
            data_live="/state.json" if live else None,
        ),
        lang="en",
    )


# -- login ---------------------------------------------------------------------------------------
def login_page(host_id: str, csrf: str, name: str = "", flashes=()) -> Markup:
    form = el(
        "form",
        el("input", type="hidden", name="csrf", value=csrf),
        el(
            "label",
            "User name",
            el(
                "input",
                name="name",
                value=name,
                autocomplete="username",
                required=True,
                autofocus=not name,
                id="login-name",
            ),
        ),
        el(
            "label",
            "Password",
            el(
                "input",
                name="password",
                type="password",
                required=True,
                autocomplete="current-password",
                autofocus=bool(name),
                id="login-password",
            ),
        ),
        el("button", "Log in", type="submit", id="login-submit"),
        method="post",
        action="/login",
        class_="card login",
    )
    return page(
        "Log in",
        host_id,
        frag(el("p", f"Host {host_id} of a vmweb grid. Any host's page shows the whole grid."), form),
        flashes=flashes,
    )


# -- owner view ----------------------------------------------------------------------------------
def owner_view(ctx) -> Markup:
    """Users, their clusters with VMs and resources used, and the forms to act on them."""
    p, csrf, access, mgr = ctx.principal, ctx.csrf, ctx.access, ctx.mgr
    users = access.users(p)
    clusters = access.clusters(p)
    flt = Filter.from_query(ctx.query)
    by_owner: dict[str, list] = {}
    shown_vms: dict[str, set] = {}
    total = shown = 0
    for c in clusters:
        keep = {
            v.name
            for v in c.vms
            if flt.vm_matches(c.name, f"{c.name}/{v.name}", v.ip, v.mac, c.owner, v.host, v.state)
        }
        total += len(c.vms)
        shown += len(keep)
        if (
            keep
            or not flt.active
            or (
                not c.vms
                and not flt.host
                and not flt.state
                and flt.text_matches(c.name)
                and flt.owner in ("", c.owner)
            )
        ):
            by_owner.setdefault(c.owner, []).append(c)
            shown_vms[c.name] = keep
    known = {u.name for u in users}
    sections = [
        _user_section(u, by_owner.get(u.name, []), csrf, p, shown_vms)
        for u in users
        if not flt.active or u.name in by_owner
    ]
    for owner in sorted(set(by_owner) - known):  # only an admin sees such (account gone)
        sections.append(
            el(
                "section",
                el("h2", owner, " ", el("small", "(no account)")),
                *[_cluster_card(c, csrf, shown_vms.get(c.name)) for c in by_owner[owner]],
                class_="user",
            )
        )
    if not sections:
        sections.append(
            el(
                "p",
                "No cluster or VM matches the filter." if flt.active else "No clusters yet.",
                class_="empty",
            )
        )
    templates = sorted(mgr.templates().items())
    body = [
        _create_form(templates, users, p, csrf),
        filter_form(
            "/owner",
            flt,
            sorted({u.name for u in users} | set(by_owner)) if p.is_admin else [],
            [h.id for h in mgr.hosts()],
            VM_STATES,
            shown,
            total,
            "VMs",
        ),
        el("div", *sections, id="live", data_shape=shape_of(ctx)),
        _template_table(templates),
    ]
    if p.is_admin:
        body.append(_users_admin(users, csrf, p))
    else:
        body.append(_own_password_form(p, csrf))
    body.append(ssh_keys_section(access.ssh_keys(p, p.name), p.name, csrf))
    return frag(*body)


def ssh_keys_section(keys, user: str, csrf: str) -> Markup:
    """``user``'s SSH public keys (every VM of their clusters gets them) with a remove button
    each, and a form to add keys (one or several lines of an OpenSSH public key file)."""
    rows = [
        el(
            "tr",
            el("td", k.kind, data_label="Type"),
            el("td", el("code", k.fingerprint), class_="mac", data_label="Fingerprint"),
            el("td", k.comment, data_label="Comment"),
            el(
                "td",
                post_form(
                    "/action/user/key/remove",
                    csrf,
                    el("input", type="hidden", name="name", value=user),
                    el("input", type="hidden", name="fingerprint", value=k.fingerprint),
                    el(
                        "button",
                        "Remove",
                        type="submit",
                        class_="small danger",
                        aria_label=f"remove key {k.fingerprint}",
                    ),
                    back="/owner",
                    confirm=True,
                ),
                class_="row-actions",
            ),
            data_key=k.fingerprint,
        )
        for k in keys
    ]
    listing = (
        el(
            "div",
            el(
                "table",
                el("thead", el("tr", *[el("th", h) for h in ("Type", "Fingerprint", "Comment", "")])),
                el("tbody", *rows),
                class_="ssh-keys",
            ),
            class_="scroll",
        )
        if rows
        else el("p", "No SSH keys yet.", class_="empty")
    )
    add = post_form(
        "/action/user/key/add",
        csrf,
        el("input", type="hidden", name="name", value=user),
        el(
            "label",
            "Public key (the text of ~/.ssh/id_ed25519.pub; several lines allowed)",
            el(
                "textarea",
                name="key",
                rows="3",
                required=True,
                spellcheck="false",
                autocomplete="off",
                id="ssh-key",
                placeholder="ssh-ed25519 AAAA… you@laptop",
            ),
        ),
        el("button", "Add key", type="submit", id="ssh-key-add"),
        back="/owner",
        class_="card grid-form",
    )
    return el(
        "section",
        el("h2", "My SSH keys"),
        el("p", "Every VM of your clusters created from now on accepts these keys."),
        listing,
        add,
        class_="ssh-keys",
    )


def _create_form(templates, users, p, csrf) -> Markup:
    if p.is_admin:
        owner = el(
            "label",
            "Owner",
            el(
                "select",
                *[el("option", u.name, value=u.name, selected=u.name == p.name) for u in users],
                name="owner",
                id="create-owner",
            ),
        )
    else:
        owner = el(
            "label", "Owner", el("input", name="owner", value=p.name, readonly=True, id="create-owner")
        )
    return el(
        "section",
        el("h2", "New virtual cluster"),
        post_form(
            "/action/create",
            csrf,
            el(
                "label",
                "Name",
                el(
                    "input",
                    name="name",
                    required=True,
                    id="create-name",
                    placeholder="lab1",
                    autocomplete="off",
                    autocapitalize="none",
                    spellcheck="false",
                ),
            ),
            el(
                "label",
                "Template",
                el(
                    "select",
                    *[
                        el("option", f"{name} — {t.description}" if t.description else name, value=name)
                        for name, t in templates
                    ],
                    name="template",
                    id="create-template",
                ),
            ),
            owner,
            el(
                "label",
                "VMs",
                el(
                    "input",
                    name="count",
                    type="number",
                    min="1",
                    value="2",
                    required=True,
                    id="create-count",
                    inputmode="numeric",
                ),
            ),
            el("button", "Create", type="submit", id="create-submit"),
            back="/owner",
            class_="card grid-form",
        ),
        class_="create",
    )


def _template_table(templates) -> Markup:
    rows = []
    for name, t in templates:
        roles = ", ".join(
            f"{r.name}×{'rest' if r.is_rest else r.count} ({r.vcpus} vCPU, {_mib(r.memory_mib)})"
            for r in t.roles
        )
        rows.append(
            el(
                "tr",
                el("td", name),
                el("td", str(min_count(t))),
                el("td", roles),
                el("td", t.description, class_="desc"),
            )
        )
    return el(
        "details",
        el("summary", "Templates"),
        el(
            "div",
            el(
                "table",
                el(
                    "thead",
                    el(
                        "tr",
                        el("th", "Template"),
                        el("th", "Min VMs"),
                        el("th", "Roles"),
                        el("th", "Description"),
                    ),
                ),
                el("tbody", *rows),
            ),
            class_="scroll",
        ),
        class_="templates",
    )


def _user_section(u, clusters, csrf, p, shown_vms=None) -> Markup:
    head = el(
        "h2",
        u.name,
        " ",
        el("small", u.role),
        el(
            "span",
            meter(u.used_vms, u.quota_vms, f"{u.used_vms} of {u.quota_vms} VMs", f"u:{u.name}:used"),
            el(
                "span",
                f"{u.used_vcpus} vCPUs, {_mib(u.used_memory_mib)}",
                data_k=f"u:{u.name}:res",
                class_="res",
            ),
            class_="usage",
        ),
    )
    cards = [_cluster_card(c, csrf, (shown_vms or {}).get(c.name)) for c in clusters] or [
        el("p", "No clusters.", class_="empty")
    ]
    return el("section", head, *cards, class_="user", data_user=u.name)


def _cluster_card(c, csrf, shown: set | None = None) -> Markup:
    """A cluster with its VMs (only those named in ``shown``, when given: a filter's)."""
    live_vms = [v for v in c.vms if v.desired != "absent"]
    up = sum(1 for v in live_vms if v.state == "running")
    k = f"c:{c.name}"
    head = el(
        "div",
        el("h3", el("a", c.name, href=cluster_href(c.name)), class_="cluster-name"),
        badge(c.state, f"{k}:state"),
        el("span", f"{up}/{len(live_vms)} running", data_k=f"{k}:up", class_="up"),
        el("span", f"{c.template} · network {c.network} (id {c.vni})", class_="meta"),
        class_="cluster-head",
    )
    actions = el(
        "div",
        post_form(
            "/action/scale",
            csrf,
            el("input", type="hidden", name="cluster", value=c.name),
            el(
                "label",
                "VMs",
                el(
                    "input",
                    name="count",
                    type="number",
                    min="1",
                    value=str(c.count),
                    required=True,
                    class_="count",
                    inputmode="numeric",
                ),
            ),
            el("button", "Scale", type="submit"),
            back="/owner",
            confirm=True,
        ),
        post_form(
            "/action/destroy",
            csrf,
            el("input", type="hidden", name="cluster", value=c.name),
            el("button", "Destroy", type="submit", class_="danger"),
            back="/owner",
            confirm=True,
        ),
        class_="actions",
    )
    rows = [_vm_row(c.name, v, csrf) for v in c.vms if shown is None or v.name in shown]
    table = el(
        "div",
        el(
            "table",
            el(
                "thead",
                el(
                    "tr",
                    *[
                        el("th", h)
                        for h in ("VM", "Role", "Host", "State", "IP", "MAC", "vCPU", "Memory", "")
                    ],
                ),
            ),
            el("tbody", *rows),
            class_="vms",
        ),
        class_="scroll",
    )
    return el("article", head, actions, table, class_="cluster", data_cluster=c.name)


def _vm_row(cluster: str, v, csrf) -> Markup:
    k = f"v:{cluster}/{v.name}"
    if v.desired == "absent":
        action = el("span", "being removed", class_="meta")
    else:
        op = "stop" if v.desired == "running" else "start"
        action = frag(
            post_form(
                "/action/vm",
                csrf,
                el("input", type="hidden", name="cluster", value=cluster),
                el("input", type="hidden", name="vm", value=v.name),
                el("input", type="hidden", name="op", value=op),
                el("button", op.capitalize(), type="submit", class_="small"),
                back="/owner",
                confirm=op == "stop",
            ),
            post_form(
                "/action/migrate",
                csrf,
                el("input", type="hidden", name="cluster", value=cluster),
                el("input", type="hidden", name="vm", value=v.name),
                el(
                    "button",
                    "Migrate",
                    type="submit",
                    class_="small",
                    title="move this VM to the least loaded host that can take it",
                ),
                back="/owner",
            ),
        )
    return el(
        "tr",
        el("td", el("a", v.name, href=vm_href(cluster, v.name)), data_label="VM"),
        el("td", v.role, data_label="Role"),
        el("td", v.host, data_k=f"{k}:host", data_label="Host"),
        # The detail span is always there: the polling script fills it in when a VM gets
        # one later (a host not answering, a hypervisor error).
        el(
            "td",
            badge(v.state, f"{k}:state"),
            el("span", v.detail, class_="detail", data_k=f"{k}:detail"),
            data_label="State",
        ),
        el("td", v.ip, data_label="IP"),
        el("td", v.mac, class_="mac", data_label="MAC"),
        el("td", str(v.vcpus), data_label="vCPU"),
        el("td", _mib(v.memory_mib), data_label="Memory"),
        el("td", action, class_="row-actions"),
        data_vm=f"{cluster}/{v.name}",
    )


def _users_admin(users, csrf, p) -> Markup:
    rows = []
    for u in users:
        rows.append(
            el(
                "tr",
                el("td", u.name, data_label="User"),
                el("td", u.role, data_label="Role"),
                el(
                    "td",
                    post_form(
                        "/action/user/quota",
                        csrf,
                        el("input", type="hidden", name="name", value=u.name),
                        el(
                            "input",
                            name="quota",
                            type="number",
                            min="0",
                            value=str(u.quota_vms),
                            class_="count",
                            aria_label=f"quota of {u.name}",
                        ),
                        el("button", "Set", type="submit", class_="small"),
                        back="/owner",
                    ),
                    data_label="Quota (VMs)",
                ),
                el(
                    "td",
                    post_form(
                        "/action/user/password",
                        csrf,
                        el("input", type="hidden", name="name", value=u.name),
                        el(
                            "input",
                            name="password",
                            type="password",
                            minlength="8",
                            autocomplete="new-password",
                            aria_label=f"new password of {u.name}",
                        ),
                        el("button", "Set", type="submit", class_="small"),
                        back="/owner",
                    ),
                    data_label="New password",
                ),
                el(
                    "td",
                    post_form(
                        "/action/user/delete",
                        csrf,
                        el("input", type="hidden", name="name", value=u.name),
                        el("button", "Delete", type="submit", class_="small danger"),
                        back="/owner",
                        confirm=True,
                    )
                    if u.name != p.name
                    else None,
                ),
            )
        )
    create = post_form(
        "/action/user/create",
        csrf,
        el(
            "label",
            "Name",
            el(
                "input", name="name", required=True, id="user-name", autocomplete="off", autocapitalize="none"
            ),
        ),
        el(
            "label",
            "Password",
            el(
                "input",
                name="password",
                type="password",
                required=True,
                minlength="8",
                autocomplete="new-password",
                id="user-password",
            ),
        ),
        el(
            "label",
            "Role",
            el(
                "select",
                el("option", "user", value="user"),
                el("option", "admin", value="admin"),
                name="role",
            ),
        ),
        el("label", "Quota (VMs)", el("input", name="quota", type="number", min="0", value="16")),
        el("button", "Create user", type="submit", id="user-create"),
        back="/owner",
        class_="card grid-form",
    )
    return el(
        "section",
        el("h2", "User accounts"),
        create,
        el(
            "div",
            el(
                "table",
                el(
                    "thead",
                    el("tr", *[el("th", h) for h in ("User", "Role", "Quota (VMs)", "New password", "")]),
                ),
                el("tbody", *rows),
                class_="users",
            ),
            class_="scroll",
        ),
        class_="admin-users",
    )


def _own_password_form(p, csrf) -> Markup:
    return el(
        "section",
        el("h2", "My password"),
        post_form(
            "/action/user/password",
            csrf,
            el("input", type="hidden", name="name", value=p.name),
            el(
                "label",
                "New password",
                el(
                    "input",
                    name="password",
                    type="password",
                    minlength="8",
                    required=True,
                    autocomplete="new-password",
                ),
            ),
            el("button", "Change", type="submit"),
            back="/owner",
            class_="card grid-form",
        ),
    )


# -- host view -------------------------------------------------------------------------------------
def host_view(ctx) -> Markup:
    """Each host's liveness, capacity, load and VMs (a user sees the names of their own VMs only)."""
    p, mgr = ctx.principal, ctx.mgr
    hosts = mgr.hosts()
    flt = Filter.from_query(ctx.query)
    owner_of = {c.name: c.owner for c in ctx.access.clusters(p)}
    vms_by_host: dict[str, list] = {}
    for vm in sorted(ctx.dom.all(VmRec), key=lambda v: v.id):
        if vm.desired != "absent":
            vms_by_host.setdefault(vm.host, []).append(vm)
    cards = []
    for h in hosts:
        k = f"h:{h.id}"
        vms = vms_by_host.get(h.id, [])
        shown = [v for v in vms if p.is_admin or v.cluster in owner_of]
        hidden = len(vms) - len(shown)
        host_states = {h.liveness} | ({"draining"} if h.draining else set())
        states = {v.id: _vm_state(ctx, v) for v in shown}
        if flt.host and h.id != flt.host:
            continue
        if flt.active:
            picked = [
                v
                for v in shown
                if flt.text_matches(v.id, v.ip, v.mac, v.cluster, h.id)
                and flt.owner in ("", owner_of.get(v.cluster))
                and flt.state in ("", states[v.id], *host_states)
            ]
            if not picked and not (
                not flt.owner and flt.text_matches(h.id) and flt.state in ("", *host_states)
            ):
                continue
            shown = picked
        chips = [
            el(
                "li",
                el("a", v.id, href=vm_href(v.cluster, v.name), class_="vm-id"),
                " ",
                badge(states[v.id], f"v:{v.id}:state"),
            )
            for v in shown
        ]
        if hidden and not (flt.q or flt.owner or flt.state):
            chips.append(el("li", f"+{hidden} VMs of other users", class_="meta"))
        link = (
            el("a", "open this host's pages", href=f"{api_url(h.api)}/hosts")
            if h.api and h.id != ctx.host_id
            else (el("span", "this host", class_="meta") if h.id == ctx.host_id else None)
        )
        host_action = None
        if p.is_admin and h.liveness in ("alive", "suspect"):
            host_action = (
                _host_form("undrain", ctx.csrf, h.id, "Take new VMs again", "place new VMs here again")
                if h.draining
                else _host_form(
                    "drain",
                    ctx.csrf,
                    h.id,
                    "Drain for maintenance",
                    "move every VM off this host (live where possible) and place no new ones here",
                    confirm=True,
                )
            )
        elif p.is_admin and vms and h.liveness in ("dead", "left"):
            host_action = _host_form(
                "evacuate",
                ctx.csrf,
                h.id,
                f"Evacuate its {len(vms)} VMs",
                "re-place them on live hosts, same addresses; they boot afresh from "
                "their base image (their disk writes stay on this host)",
                "small danger",
                confirm=True,
            )
        cards.append(
            el(
                "article",
                el(
                    "div",
                    el("h2", h.id),
                    badge(h.liveness, f"{k}:liveness"),
                    badge("draining") if h.draining else None,
                    el("span", "consensus member" if h.member else "not a member", class_="meta"),
                    link,
                    class_="host-head",
                ),
                el(
                    "dl",
                    el("dt", "vCPUs"),
                    el("dd", meter(h.used_vcpus, h.cpus, f"{h.used_vcpus} of {h.cpus} CPUs", f"{k}:cpu")),
                    el("dt", "Memory"),
                    el(
                        "dd",
                        meter(
                            h.used_memory_mib,
                            h.memory_mib,
                            f"{_mib(h.used_memory_mib)} of {_mib(h.memory_mib)}",
                            f"{k}:mem",
                        ),
                    ),
                    el("dt", "Load"),
                    el("dd", el("span", f"{h.load1:.2f}", data_k=f"{k}:load")),
                    el("dt", "VMs"),
                    el("dd", el("span", str(h.vms), data_k=f"{k}:vms")),
                    el("dt", "API"),
                    el("dd", h.api or "?", class_="mac"),
                    el("dt", "History"),
                    el(
                        "dd",
                        el(
                            "a",
                            "Load, memory and VMs over the last hours",
                            href=host_href(h.id),
                            class_="history-link",
                        ),
                    ),
                    class_="facts",
                ),
                el("ul", *chips, class_="chips") if chips else el("p", "No VMs.", class_="empty"),
                host_action,
                class_="host card",
                data_host=h.id,
                id=f"host-{h.id}",
            )
        )
    search = filter_form(
        "/hosts",
        flt,
        sorted(set(owner_of.values())) if p.is_admin else [],
        [h.id for h in hosts],
        HOST_STATES + VM_STATES,
        len(cards),
        len(hosts),
        "hosts",
    )
    if not cards:
        cards.append(el("p", "No host matches the filter.", class_="empty"))
    ms = [
        m
        for m in ctx.access.migrations(p)
        if flt.text_matches(m.vm, m.source, m.dest)
        and flt.owner in ("", owner_of.get(m.vm.partition("/")[0]))
        and flt.host in ("", m.source, m.dest)
    ]
    return frag(
        search,
        el("div", *cards, id="live", data_shape=shape_of(ctx), class_="hosts"),
        _migrations_table(ctx, ms, empty="No migration matches the filter." if flt.active else None),
    )


def _host_form(
    action: str, csrf: str, host: str, label: str, title: str, class_: str = "small", confirm: bool = False
) -> Markup:
    """An admin's button acting on one host (``/action/ACTION``), back to the host view."""
    return post_form(
        f"/action/{action}",
        csrf,
        el("input", type="hidden", name="host", value=host),
        el("button", label, type="submit", class_=class_, title=title),
        back="/hosts",
        confirm=confirm,
    )


def _migrations_table(ctx, ms: list | None = None, limit: int = 20, empty: str | None = None) -> Markup:
    """The latest migrations the viewer may see (of ``ms`` when given): who moved what where,
    how, and what it cost."""
    ms = (ctx.access.migrations(ctx.principal) if ms is None else ms)[-limit:][::-1]
    if not ms:
        return el(
            "section",
            el("h2", "Migrations"),
            el("p", empty or "No VM has moved yet.", class_="empty"),
            class_="card migrations",
        )
    rows = [
        el(
            "tr",
            el("td", el("a", m.vm, href=vm_href(*m.vm.partition("/")[::2])), data_label="VM"),
            el("td", m.source, data_label="From"),
            el("td", m.dest, data_label="To"),
            el("td", m.mode, data_label="Mode"),
            el("td", badge(m.phase, f"m:{m.id}:phase"), data_label="Phase"),
            el("td", _mib(m.bytes // (1 << 20)) if m.bytes else "", data_label="Moved"),
            el("td", f"{m.total_ms} ms" if m.total_ms else "", data_label="Time"),
            el("td", f"{m.downtime_ms} ms" if m.downtime_ms else "", data_label="Downtime"),
            el("td", m.error or _waiting(ctx, m), class_="detail", data_label="Error"),
            data_migration=m.id,
        )
        for m in ms
    ]
    head = el(
        "tr",
        *[
            el("th", t, scope="col")
            for t in ("VM", "From", "To", "Mode", "Phase", "Moved", "Time", "Downtime", "Error")
        ],
    )
    return el(
        "section",
        el("h2", "Migrations"),
        el("div", el("table", el("thead", head), el("tbody", *rows), class_="vms"), class_="scroll"),
        class_="card migrations",
    )


def _waiting(ctx, m) -> str:
    """What a move under way waits on (its error cell is empty until it fails)."""
    waiting = ctx.access.migration_waiting(m)
    return f"waiting on {waiting}" if waiting else ""


def _vm_state(ctx, vm) -> str:
    from vmwebd.dom.records import status_of

    st = status_of(ctx.dom, vm)
    return st.state if st else "pending"


# -- DOM view --------------------------------------------------------------------------------------
def dom_view(ctx, xml: bytes) -> Markup:
    note = (
        "The whole cluster DOM, as every host holds it; password hashes are never shown."
        if ctx.principal.is_admin
        else "The cluster DOM as you may see it: the grid, your account and your clusters; "
        "password hashes are never shown."
    )
    return frag(
        el(
            "p",
            note,
            " ",
            el(
                "a",
                "Download the XML",
                href="/dom.xml",
                download="vmweb-dom.xml",
                class_="button",
                id="dom-download",
            ),
        ),
        el("pre", highlight_xml(xml.decode("utf-8")), class_="xml", id="dom-xml", tabindex="0"),
    )


_XML_TOKEN = re.compile(
    r"""(?P<pi><\?[^>]*\?>)|(?P<tag></?[^\s/>]+)|(?P<sp>\s+)(?P<attr>[^\s=/>]+)=(?P<val>"[^"]*"|'[^']*')"""
    r"""|(?P<end>/?>)|(?P<text>[^<]+)|(?P<other>.)""",
    re.S,
)


def highlight_xml(text: str) -> Markup:
    """The XML text with tags, attribute names and values in spans (every token escaped);
    versions (``v="..."``) are dimmed: they matter to merges, less to a reader."""
    out = []
    for m in _XML_TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "val":
            attr = m.group("attr")
            out.append(
                frag(
                    m.group("sp"),
                    el("span", attr, class_="xa" + (" xv" if attr == "v" else "")),
                    "=",
                    el("span", m.group("val"), class_="xs" + (" xv" if attr == "v" else "")),
                )
            )
        elif kind in ("tag", "end", "pi"):
            out.append(el("span", m.group(kind), class_="xt" if kind != "pi" else "xp"))
        else:
            out.append(m.group(kind))
    return frag(*out)


# -- settings --------------------------------------------------------------------------------------
def settings_view(ctx, cfg, gossip_cfg, members) -> Markup:
    """The settings page: the grid's settings (admins change them), this host's address pools
    from ``cfg``, its gossip timing ``gossip_cfg`` (None: no peers) and the consensus ``members``."""
    csrf = ctx.csrf
    values = all_settings(ctx.dom)
    rows = []
    for key, value in values.items():
        d = SETTINGS[key]
        if key == "placement":
            field = el(
                "select",
                *[el("option", o, value=o, selected=o == value) for o in ("spread", "pack")],
                name="value",
                id=f"setting-{key}",
            )
        elif key in ("restart_stopped", "balancer.enabled"):
            field = el(
                "select",
                *[el("option", o, value=o, selected=o == value) for o in ("true", "false")],
                name="value",
                id=f"setting-{key}",
            )
        else:
            field = el("input", name="value", value=value, id=f"setting-{key}", inputmode="decimal")
        rows.append(
            el(
                "tr",
                el("th", key, scope="row"),
                el(
                    "td",
                    post_form(
                        "/action/setting",
                        csrf,
                        el("input", type="hidden", name="key", value=key),
                        field,
                        el("button", "Save", type="submit", class_="small"),
                        back="/settings",
                    ),
                    data_label="Value",
                ),
                el("td", d.description, class_="desc"),
            )
        )
    leases = [rec.id for rec in ctx.dom.all(LeaseRec)]
    pool_rows = []
    for pool in cfg.ip_pools:
        usable = _usable(pool)
        used = sum(1 for i in leases if i.startswith(f"ip/{pool.name}/"))
        pool_rows.append(
            el(
                "tr",
                el("td", pool.name),
                el("td", str(pool.cidr)),
                el("td", " ".join(str(r) for r in pool.reserve) or "—"),
                el("td", meter(used, usable, f"{used} of {usable} leased")),
            )
        )
    vni_total = cfg.vni.last - cfg.vni.first + 1
    vni_used = sum(1 for i in leases if i.startswith("vni/"))
    macs = sum(1 for i in leases if i.startswith("mac/"))
    pools = el(
        "section",
        el("h2", "Address pools"),
        el(
            "div",
            el(
                "table",
                el(
                    "thead",
                    el("tr", el("th", "Pool"), el("th", "CIDR"), el("th", "Reserved"), el("th", "Leased")),
                ),
                el("tbody", *pool_rows),
            ),
            class_="scroll",
        ),
        el(
            "p",
            f"MAC prefix {cfg.mac.prefix} ({macs} leased) · network ids {cfg.vni.first}–{cfg.vni.last} "
            f"({vni_used} of {vni_total} leased)",
            class_="meta",
        ),
    )
    if gossip_cfg is not None:
        g = gossip_cfg
        facts = [
            ("timing preset", cfg.peers.timing),
            ("probe interval", f"{g.probe_interval} s"),
            ("probe timeout", f"{g.probe_timeout} s"),
            ("indirect checks", str(g.indirect_checks)),
            ("suspicion multiplier", str(g.suspicion_mult)),
            ("gossip interval", f"{g.gossip_interval} s"),
            ("fanout", str(g.fanout)),
            ("retransmit multiplier", str(g.retransmit_mult)),
            ("anti-entropy (push-pull) interval", f"{g.sync_interval} s"),
            ("consensus members", ", ".join(members)),
        ]
        gossip_html = el("dl", *[frag(el("dt", k), el("dd", v)) for k, v in facts], class_="facts")
    else:
        gossip_html = el("p", "This host runs alone (no cluster certificate): no gossip.", class_="meta")
    return frag(
        el(
            "section",
            el("h2", "System settings"),
            el("p", "Grid-wide, kept in the DOM: a change here reaches every host.", class_="meta"),
            el("div", el("table", el("tbody", *rows), class_="settings"), class_="scroll"),
        ),
        pools,
        el(
            "section",
            el("h2", "Peer protocol timing"),
            el(
                "p",
                f"From this host's configuration ({cfg.source or 'built in'}); every host has its own.",
                class_="meta",
            ),
            gossip_html,
        ),
    )


@functools.lru_cache(maxsize=64)
def _usable(pool) -> int:
    return sum(1 for _ in pool.addresses())


def forbidden_view(what: str) -> Markup:
    return el("p", what, class_="flash error", role="alert")


# -- live state ------------------------------------------------------------------------------------
def shape_of(ctx) -> str:
    """A digest of what the page's structure depends on (which clusters, VMs, hosts, users):
    when it changes, the script fetches the page and swaps the live part."""
    p = ctx.principal
    items = []
    for c in ctx.access.clusters(p):
        items.append(f"c {c.name} {c.count}")
        items += [f"v {c.name}/{v.name} {v.desired} {v.host}" for v in c.vms]
    for h in ctx.mgr.hosts():
        items.append(f"h {h.id} {h.liveness in ('dead', 'left')} {h.draining}")
    for u in ctx.access.users(p):
        items.append(f"u {u.name} {u.role} {u.quota_vms}")
    if p.is_admin:
        items += [f"vm {vm.id} {vm.host}" for vm in ctx.dom.all(VmRec) if vm.desired != "absent"]
    else:
        items.append(f"n {sum(1 for vm in ctx.dom.all(VmRec) if vm.desired != 'absent')}")
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


def live_state(ctx) -> dict:
    """``{"shape": ..., "cells": {data-k: text}}`` for the polling script."""
    p = ctx.principal
    cells: dict[str, str] = {}
    for c in ctx.access.clusters(p):
        live_vms = [v for v in c.vms if v.desired != "absent"]
        cells[f"c:{c.name}:state"] = c.state
        cells[f"c:{c.name}:up"] = (
            f"{sum(1 for v in live_vms if v.state == 'running')}/{len(live_vms)} running"
        )
        for v in c.vms:
            k = f"v:{c.name}/{v.name}"
            cells[f"{k}:state"] = v.state
            cells[f"{k}:host"] = v.host
            cells[f"{k}:detail"] = v.detail
    for u in ctx.access.users(p):
        cells[f"u:{u.name}:used"] = f"{u.used_vms} of {u.quota_vms} VMs"
        cells[f"u:{u.name}:used:w"] = bar_class(_pct(u.used_vms, u.quota_vms))
        cells[f"u:{u.name}:res"] = f"{u.used_vcpus} vCPUs, {_mib(u.used_memory_mib)}"
    for h in ctx.mgr.hosts():
        k = f"h:{h.id}"
        cells[f"{k}:liveness"] = h.liveness
        cells[f"{k}:cpu"] = f"{h.used_vcpus} of {h.cpus} CPUs"
        cells[f"{k}:cpu:w"] = bar_class(_pct(h.used_vcpus, h.cpus))
        cells[f"{k}:mem"] = f"{_mib(h.used_memory_mib)} of {_mib(h.memory_mib)}"
        cells[f"{k}:mem:w"] = bar_class(_pct(h.used_memory_mib, h.memory_mib))
        cells[f"{k}:load"] = f"{h.load1:.2f}"
        cells[f"{k}:vms"] = str(h.vms)
    if p.is_admin:
        from vmwebd.dom.records import status_of

        for vm in ctx.dom.all(VmRec):
            st = status_of(ctx.dom, vm)
            cells.setdefault(f"v:{vm.id}:state", st.state if st else "pending")
    return {"shape": shape_of(ctx), "cells": cells}


__all__ = [
    "page",
    "login_page",
    "owner_view",
    "host_view",
    "dom_view",
    "settings_view",
    "live_state",
    "shape_of",
]
