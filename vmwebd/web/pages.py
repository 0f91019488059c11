"""A page per cluster (``/cluster/NAME``) and per VM (``/vm/CLUSTER/NAME``).

Both read what the owner view reads (:meth:`vmwebd.app.Application.cluster`: the owner or an admin,
:class:`~vmwebd.errors.NotAuthorized` for anyone else) and the VM page adds the VM's migration
records from the DOM. Like the other views, every value goes through
:func:`~vmwebd.web.html.el`; elements that change while a VM comes up carry the same ``data-k``
keys as the owner view, so the polling script keeps them current.
"""

from __future__ import annotations

import datetime
from urllib.parse import quote

from vmwebd.errors import NoSuchVm
from vmwebd.web.html import Markup, el, frag
from vmwebd.web.views import _mib, badge, cluster_href, post_form, shape_of, vm_href


def _crumbs(*parts) -> Markup:
    """Where the page sits: ``Owners › alice › lab1 › pc0`` (links given as (text, href))."""
    out = []
    for i, part in enumerate(parts):
        if i:
            out.append(el("span", "›", aria_hidden="true"))
        out.append(el("a", part[0], href=part[1]) if isinstance(part, tuple) else el("span", part))
    return el("div", *out, class_="crumbs", role="navigation", aria_label="breadcrumb")


def _facts(*pairs) -> Markup:
    return el("dl", *[frag(el("dt", k), el("dd", v)) for k, v in pairs if v is not None], class_="facts")


def _host_href(host: str) -> str:
    """The host view filtered to one host."""
    return f"/hosts?host={quote(host, safe='')}"


def cluster_page(ctx, name: str) -> tuple[str, Markup]:
    """The cluster's state, owner, template, network, its VMs, and the scale and destroy forms."""
    c = ctx.access.cluster(ctx.principal, name)
    csrf = ctx.csrf
    here = cluster_href(c.name)
    k = f"c:{c.name}"
    live_vms = [v for v in c.vms if v.desired != "absent"]
    up = sum(1 for v in live_vms if v.state == "running")
    facts = _facts(
        ("State", badge(c.state, f"{k}:state")),
        ("Running", el("span", f"{up}/{len(live_vms)} running", data_k=f"{k}:up")),
        ("Owner", c.owner),
        ("Template", c.template),
        ("Network", c.network),
        ("Network id", str(c.vni) if c.vni else None),
        ("Bridge", el("span", c.bridge, class_="mac") if c.bridge else None),
        ("VMs asked for", str(c.count)),
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
                    id="scale-count",
                ),
            ),
            el("button", "Scale", type="submit", id="scale-submit"),
            back=here,
            confirm=True,
        ),
        post_form(
            "/action/destroy",
            csrf,
            el("input", type="hidden", name="cluster", value=c.name),
            el("button", f"Destroy {c.name}", type="submit", class_="danger", id="destroy-submit"),
            back="/owner",
            confirm=True,
        ),
        class_="actions",
    )
    rows = []
    for v in c.vms:
        vk = f"v:{c.name}/{v.name}"
        rows.append(
            el(
                "tr",
                el("td", el("a", v.name, href=vm_href(c.name, v.name)), data_label="VM"),
                el("td", v.role, data_label="Role"),
                el("td", el("a", v.host, href=_host_href(v.host), data_k=f"{vk}:host"), data_label="Host"),
                el(
                    "td",
                    badge(v.state, f"{vk}:state"),
                    el("span", " being removed", class_="meta") if v.desired == "absent" else None,
                    el("span", v.detail, class_="detail", data_k=f"{vk}:detail"),
                    data_label="State",
                ),
                el("td", v.ip, data_label="IP"),
                el("td", v.mac, class_="mac", data_label="MAC"),
                el("td", str(v.vcpus), data_label="vCPU"),
                el("td", _mib(v.memory_mib), data_label="Memory"),
                data_vm=f"{c.name}/{v.name}",
            )
        )
    table = (
        el(
            "div",
            el(
                "table",
                el(
                    "thead",
                    el(
                        "tr",
                        *[
                            el("th", h, scope="col")
                            for h in ("VM", "Role", "Host", "State", "IP", "MAC", "vCPU", "Memory")
                        ],
                    ),
                ),
                el("tbody", *rows),
                class_="vms",
            ),
            class_="scroll",
        )
        if rows
        else el("p", "No VMs.", class_="empty")
    )
    vcpus = sum(v.vcpus for v in live_vms)
    memory = sum(v.memory_mib for v in live_vms)
    body = frag(
        _crumbs(("Owners", "/owner"), c.owner, c.name),
        el(
            "div",
            el("section", facts, actions, class_="card", data_cluster=c.name),
            el(
                "section",
                el("h2", "VMs", " ", el("small", f"{len(live_vms)} VMs, {vcpus} vCPUs, {_mib(memory)}")),
                table,
            ),
            id="live",
            data_shape=shape_of(ctx),
        ),
    )
    return f"Cluster {c.name}", body


def _when(ms: int) -> str:
    """A wall-clock time in milliseconds since the epoch, in UTC to the second."""
    if not ms:
        return ""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def vm_page(ctx, cluster: str, name: str) -> tuple[str, Markup]:
    """A VM's state, place, addresses and resources, the host's words about it, its migrations,
    and the start/stop and migrate forms."""
    c = ctx.access.cluster(ctx.principal, cluster)
    v = next((v for v in c.vms if v.name == name), None)
    if v is None:
        raise NoSuchVm(c.name, name)
    csrf = ctx.csrf
    vm_id = f"{c.name}/{v.name}"
    here = vm_href(c.name, v.name)
    k = f"v:{vm_id}"
    facts = _facts(
        ("State", badge(v.state, f"{k}:state")),
        ("Desired", v.desired),
        ("Host", el("a", v.host, href=_host_href(v.host), data_k=f"{k}:host")),
        ("Cluster", el("a", c.name, href=cluster_href(c.name))),
        ("Role", v.role),
        ("IP address", el("span", v.ip, class_="mac")),
        ("MAC address", el("span", v.mac, class_="mac")),
        ("vCPUs", str(v.vcpus)),
        ("Memory", _mib(v.memory_mib)),
        ("Restarts", str(v.restarts)),
        ("Host says", el("span", v.detail, class_="detail-text", data_k=f"{k}:detail")),
    )
    if v.desired == "absent":
        actions = el("p", "This VM is being removed.", class_="meta")
    else:
        op = "stop" if v.desired == "running" else "start"
        targets = [
            h.id for h in ctx.mgr.hosts() if h.id != v.host and h.liveness == "alive" and not h.draining
        ]
        actions = el(
            "div",
            post_form(
                "/action/vm",
                csrf,
                el("input", type="hidden", name="cluster", value=c.name),
                el("input", type="hidden", name="vm", value=v.name),
                el("input", type="hidden", name="op", value=op),
                el(
                    "button",
                    op.capitalize(),
                    type="submit",
                    id="vm-power",
                    class_="danger" if op == "stop" else None,
                ),
                back=here,
                confirm=op == "stop",
            ),
            post_form(
                "/action/migrate",
                csrf,
                el("input", type="hidden", name="cluster", value=c.name),
                el("input", type="hidden", name="vm", value=v.name),
                el(
                    "label",
                    "To",
                    el(
                        "select",
                        el("option", "least loaded host", value=""),
                        *[el("option", t, value=t) for t in targets],
                        name="to",
                        id="migrate-to",
                    ),
                ),
                el("button", "Migrate", type="submit", id="migrate-submit"),
                back=here,
            ),
            class_="actions",
        )
    moves = [m for m in ctx.access.migrations(ctx.principal) if m.vm == vm_id][::-1]
    if moves:
        rows = [
            el(
                "tr",
                el("td", _when(m.started_at), data_label="Started"),
                el("td", m.source, data_label="From"),
                el("td", m.dest, data_label="To"),
                el("td", m.mode, data_label="Mode"),
                el("td", badge(m.phase), data_label="Phase"),
                el("td", _mib(m.bytes // (1 << 20)) if m.bytes else "", data_label="Moved"),
                el("td", f"{m.total_ms} ms" if m.total_ms else "", data_label="Time"),
                el("td", f"{m.downtime_ms} ms" if m.downtime_ms else "", data_label="Downtime"),
                el("td", m.requested_by, data_label="Asked by"),
                el("td", el("span", m.error, class_="detail"), data_label="Error"),
                data_migration=m.id,
            )
            for m in moves
        ]
        head = el(
            "tr",
            *[
                el("th", t, scope="col")
                for t in (
                    "Started",
                    "From",
                    "To",
                    "Mode",
                    "Phase",
                    "Moved",
                    "Time",
                    "Downtime",
                    "Asked by",
                    "Error",
                )
            ],
        )
        history = el("div", el("table", el("thead", head), el("tbody", *rows), class_="vms"), class_="scroll")
    else:
        history = el("p", "This VM has not moved.", class_="empty")
    body = frag(
        _crumbs(("Owners", "/owner"), c.owner, (c.name, cluster_href(c.name)), v.name),
        vm_tabs(c.name, v.name, "overview"),
        el(
            "div",
            el("section", facts, actions, class_="card", data_vm=vm_id),
            el("section", el("h2", "Migrations"), history, class_="card migrations"),
            id="live",
            data_shape=shape_of(ctx),
        ),
    )
    return f"VM {vm_id}", body


def console_href(cluster: str, vm: str) -> str:
    """The URL of a VM's console tab."""
    return vm_href(cluster, vm) + "/console"


def vm_tabs(cluster: str, vm: str, current: str) -> Markup:
    """The VM page's tabs: its overview and its console."""
    tabs = []
    for key, label, href in (
        ("overview", "Overview", vm_href(cluster, vm)),
        ("console", "Console", console_href(cluster, vm)),
    ):
        tabs.append(
            el(
                "a",
                label,
                href=href,
                class_="tab current" if key == current else "tab",
                aria_current="page" if key == current else None,
                id=f"tab-{key}",
            )
        )
    return el("nav", *tabs, class_="tabs", aria_label="VM")


def vm_console_page(ctx, cluster: str, name: str, style_nonce: str) -> tuple[str, Markup]:
    """A VM's serial console in the browser: an xterm.js terminal (static/xterm.js, with
    static/console.js) on the ``/console/CLUSTER/VM`` WebSocket. What the guest prints only
    ever reaches the terminal as bytes over that socket, never this HTML. Same rights as the
    VM's page."""
    c = ctx.access.cluster(ctx.principal, cluster)
    v = next((v for v in c.vms if v.name == name), None)
    if v is None:
        raise NoSuchVm(c.name, name)
    vm_id = f"{c.name}/{v.name}"
    ws_path = f"/console/{quote(c.name, safe='')}/{quote(v.name, safe='')}"
    if v.state == "running":
        status = f"Connecting to the console of {vm_id} through host {ctx.host_id}…"
    else:
        status = f"VM {vm_id} is not running (its state is {v.state}): its console opens once it runs."
    body = frag(
        _crumbs(
            ("Owners", "/owner"),
            c.owner,
            (c.name, cluster_href(c.name)),
            (v.name, vm_href(c.name, v.name)),
            "console",
        ),
        vm_tabs(c.name, v.name, "console"),
        el(
            "section",
            el("p", status, id="console-status", class_="console-status", role="status"),
            el(
                "div",
                class_="console-box",
                id="console",
                data_console=ws_path,
                data_style_nonce=style_nonce,
                data_vm=vm_id,
            ),
            el(
                "noscript",
                el(
                    "p",
                    "The console needs JavaScript. From a shell: ",
                    el("code", f"vmweb vm console {c.name} {v.name}"),
                    ".",
                    class_="flash error",
                ),
            ),
            el(
                "p",
                "Keys go to the VM (Ctrl-C included). On connecting, the last 64 KiB the console "
                "printed are shown first; a reload reconnects. From a shell: ",
                el("code", f"vmweb vm console {c.name} {v.name}"),
                " (Ctrl-] leaves).",
                class_="meta",
            ),
            el("p", el("button", "Reconnect", type="button", id="console-reconnect", hidden=True)),
            class_="card console-card",
        ),
    )
    return f"Console of {vm_id}", body
