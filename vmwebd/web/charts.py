"""A host's page (``/host/H``): its load, used memory and VM count over the last hours, drawn as
charts, from the samples of :mod:`vmwebd.history` (this host's, or asked of the host they are of).

Each chart is first an SVG drawn here (so the page shows it without JavaScript); with scripts,
``static/charts.js`` draws the same series with uPlot (a small charting library kept in
``static/``, its licence beside it) from ``/history.json?host=H`` and redraws them every 30 s.
Every value goes through :func:`~vmwebd.web.html.el`, which escapes it.
"""

from __future__ import annotations

import datetime
from urllib.parse import quote

from vmwebd.web.html import Markup, el, frag

#: The SVG's drawing box (it scales to the width of its figure).
W, H = 360, 150
PAD_L, PAD_R, PAD_T, PAD_B = 54, 8, 10, 22
#: The time axis spans at least this long (a few samples on a fresh host are not a full width).
MIN_SPAN_S = 600

#: What each chart shows: key (``data-series``, the sample's field), title, unit.
SERIES = (("load", "Load (1 min)", ""), ("mem", "Memory used", "MiB"), ("vms", "VMs", ""))


def host_href(host: str) -> str:
    """The URL of a host's page."""
    return f"/host/{quote(host, safe='')}"


def history_url(host: str) -> str:
    return f"/history.json?host={quote(host, safe='')}"


def _hhmm(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M")


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def _fmt(v: float, unit: str) -> str:
    if unit == "MiB":
        return f"{v / 1024:.1f} GiB" if v >= 1024 else f"{int(v)} MiB"
    return _num(v)


def svg_chart(times: list[int], values: list[float], ymax: float, unit: str, label: str) -> Markup:
    """A line and area chart of ``values`` at ``times`` (seconds), y from 0 to at least ``ymax``,
    with its top value and the first and last time written on the axes (UTC)."""
    top = max([ymax, *values]) if values else ymax
    top = top if top > 0 else 1
    if not times:
        return el(
            "svg",
            el(
                "text",
                "No samples yet",
                x=str(W // 2),
                y=str(H // 2),
                class_="chart-empty",
                text_anchor="middle",
            ),
            viewBox=f"0 0 {W} {H}",
            class_="chart-svg",
            role="img",
            aria_label=f"{label}: no samples yet",
        )
    t1 = times[-1]
    t0 = min(times[0], t1 - MIN_SPAN_S)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def x(t):
        return PAD_L + pw * (t - t0) / (t1 - t0)

    def y(v):
        return PAD_T + ph * (1 - v / top)

    pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, values))
    area = f"{x(times[0]):.1f},{y(0):.1f} {pts} {x(times[-1]):.1f},{y(0):.1f}"
    base = PAD_T + ph
    return el(
        "svg",
        el("line", x1=str(PAD_L), y1=str(PAD_T), x2=str(W - PAD_R), y2=str(PAD_T), class_="chart-grid"),
        el("line", x1=str(PAD_L), y1=f"{base:.1f}", x2=str(W - PAD_R), y2=f"{base:.1f}", class_="chart-axis"),
        el(
            "text",
            _fmt(top, unit),
            x=str(PAD_L - 4),
            y=str(PAD_T + 4),
            text_anchor="end",
            class_="chart-tick",
        ),
        el("text", "0", x=str(PAD_L - 4), y=f"{base + 4:.1f}", text_anchor="end", class_="chart-tick"),
        el("text", _hhmm(t0), x=str(PAD_L), y=str(H - 4), class_="chart-tick"),
        el(
            "text", f"{_hhmm(t1)} UTC", x=str(W - PAD_R), y=str(H - 4), text_anchor="end", class_="chart-tick"
        ),
        el("polygon", points=area, class_="chart-area"),
        el("polyline", points=pts, class_="chart-line"),
        viewBox=f"0 0 {W} {H}",
        class_="chart-svg",
        role="img",
        aria_label=f"{label}: {len(times)} samples, last {_fmt(values[-1], unit)}",
    )


def host_page(ctx, host_id: str, samples, error: str | None) -> tuple[str, Markup]:
    """Host ``host_id``'s facts and its charts (``samples``: :class:`vmwebd.history.Sample`, oldest
    first; ``error``: why there are none from that host)."""
    from vmwebd.web.views import _mib, api_url, badge

    h = next((h for h in ctx.mgr.hosts() if h.id == host_id), None)
    k = f"h:{h.id}"
    times = [s.t for s in samples]
    series = {
        "load": [s.load1 for s in samples],
        "mem": [s.mem_used_mib for s in samples],
        "vms": [s.vms for s in samples],
    }
    # The y axes: load up to the host's CPUs, memory up to its memory, VMs to the most seen.
    ymax = {
        "load": float(h.cpus or 1),
        "mem": float(h.memory_mib or 1),
        "vms": float(max(series["vms"], default=0) or 1),
    }
    figures = []
    for key, title, unit in SERIES:
        last = _fmt(series[key][-1], unit) if samples else "–"
        figures.append(
            el(
                "figure",
                el("figcaption", title, " ", el("span", last, class_="chart-last", data_last=key)),
                el("div", svg_chart(times, series[key], ymax[key], unit, title), class_="chart-fallback"),
                el("div", class_="chart-js"),
                class_="chart",
                data_series=key,
                data_ymax=_num(ymax[key]),
                data_unit=unit,
            )
        )
    span = ""
    if len(times) >= 2:
        mins = (times[-1] - times[0]) // 60
        span = (
            f"{len(times)} samples over {mins // 60} h {mins % 60} min"
            if mins >= 60
            else f"{len(times)} samples over {mins} min"
        )
    elif times:
        span = "1 sample so far"
    note = (
        el("p", f"Not shown: {error}", class_="flash error", role="alert")
        if error
        else el(
            "p",
            f"One sample every 30 s, kept for 6 hours by host {h.id}; {span}.",
            class_="meta",
            data_span="1",
        )
    )
    link = (
        el("a", "open this host's pages", href=f"{api_url(h.api)}/host/{quote(h.id, safe='')}")
        if h.api and h.id != ctx.host_id
        else None
    )
    facts = el(
        "dl",
        el("dt", "State"),
        el("dd", badge(h.liveness, f"{k}:liveness")),
        el("dt", "CPUs"),
        el("dd", str(h.cpus)),
        el("dt", "Memory"),
        el("dd", _mib(h.memory_mib)),
        el("dt", "Load now"),
        el("dd", el("span", f"{h.load1:.2f}", data_k=f"{k}:load")),
        el("dt", "VMs now"),
        el("dd", el("span", str(h.vms), data_k=f"{k}:vms")),
        class_="facts",
    )
    crumbs = el(
        "div",
        el("a", "Hosts", href="/hosts"),
        el("span", "›", aria_hidden="true"),
        el("span", h.id),
        class_="crumbs",
        role="navigation",
        aria_label="breadcrumb",
    )
    body = frag(
        crumbs,
        el("section", el("div", facts, link, class_="host-page-head"), class_="card"),
        el(
            "section",
            el("h2", "Last hours"),
            note,
            el("div", *figures, class_="charts"),
            class_="card history",
            id="history",
            data_history=history_url(h.id),
            data_host=h.id,
        ),
    )
    return f"Host {h.id}", body


__all__ = ["host_page", "host_href", "history_url", "svg_chart"]
