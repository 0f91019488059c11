"""A host's charts in a real headless Chromium: logged in at host2, the host view links host1's
page, whose three charts (load, used memory, VMs) uPlot draws from host1's samples, asked of
host1 over the peer endpoint. Captured at laptop (1366×768) and phone (390×844) sizes as
``docs/screenshots/host-charts-*.png``."""

from __future__ import annotations

import math
import random
import re

import pytest
import pytest_twisted

from test_dead_hosts import until
from test_history import two_hosts  # noqa: F401  (a fixture)
from test_web import css, screen, wait_for
from test_web_pages import LAPTOP, PHONE, SHOTS, browser, in_thread, login  # noqa: F401  (browser: a fixture)
from vmwebd.history import Sample

pytestmark = pytest.mark.slow


def six_hours(end: int) -> list[Sample]:
    """Six hours of made-up samples 30 s apart ending at ``end``: a working day's load with
    noise, VMs coming and going, memory following them (deterministic)."""
    rng = random.Random(3)
    out = []
    for i in range(719):
        t = end - (719 - i) * 30
        vms = 0 if i < 60 else 2 if i < 200 else 5 if i < 420 else 3 if i < 600 else 4
        load = max(0.0, 0.4 + vms * 0.45 + 0.8 * math.sin(i / 35) ** 2 + rng.uniform(-0.25, 0.25))
        mem = 900 + vms * 1024 + rng.randint(-60, 60)
        out.append(Sample(t, round(load, 2), mem, vms))
    return out


def fits(d) -> bool:
    """Every chart uPlot drew is as wide as its figure, or narrower."""
    return d.execute_script(
        "return Array.prototype.every.call(document.querySelectorAll('figure.chart'), function (f) {"
        "  var u = f.querySelector('.uplot'); return u && u.offsetWidth <= f.clientWidth; })"
    )


@pytest_twisted.inlineCallbacks
def test_the_host_view_links_a_host_page_whose_charts_show_that_hosts_samples(two_hosts, browser):  # noqa: F811
    """At host2, the host view's link for host1 opens host1's page; uPlot draws its three charts
    from host1's 720 samples (the server's SVG hidden behind them), at laptop and phone sizes,
    without scrolling sideways on the phone; without scripts, the server's SVG charts show instead."""
    a, b = yield two_hosts()
    ring = a.node.history.ring
    yield until(lambda: len(ring) >= 1, 10, "host1's first sample")
    a.node.history.stop()
    # For a picture of a working day, made-up samples stand in for the one or two real ones (a
    # test host's load is this machine's; test_history checks real samples travel).
    real = ring.samples()
    ring._samples.clear()
    made = six_hours(real[-1].t) + [Sample(real[-1].t, 3.1, 4990, 4)]
    for x in made:
        assert ring.add(x)
    assert len(ring) == 720
    base = f"http://{b.node.api_address}"

    def story():
        d = browser
        login(d, base, "alice")
        d.get(base + "/hosts")
        css(d, "article[data-host='host1'] a.history-link")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/host/host1", "host1's page")
        assert css(d, "h1")[0].text == "Host host1"
        wait_for(d, lambda d: css(d, "#history")[0].get_attribute("data-drawn") == "720", "the charts drawn")
        figs = css(d, "figure.chart")
        assert [f.get_attribute("data-series") for f in figs] == ["load", "mem", "vms"]
        assert len(css(d, "figure.chart .uplot canvas")) == 3
        assert all(not f.is_displayed() for f in css(d, ".chart-fallback"))
        assert css(d, "figure[data-series='vms'] [data-last]")[0].text == str(made[-1].vms)
        assert re.search(r"720 samples over (5 h 59|6 h [0-9]+) min", css(d, "[data-span]")[0].text)
        SHOTS.mkdir(parents=True, exist_ok=True)
        for size, mobile, suffix in ((LAPTOP, False, "laptop"), (PHONE, True, "phone")):
            screen(d, size, mobile)
            wait_for(d, fits, f"the charts to fit the {suffix}'s width")
            width = d.execute_script("return document.documentElement.scrollWidth")
            assert width <= size[0], f"the host page is {width} px wide on a {suffix}"
            height = d.execute_script("return document.documentElement.scrollHeight")
            screen(d, (size[0], max(size[1], min(2400, height))), mobile)
            wait_for(d, fits, f"the charts to fit the {suffix}'s width")
            d.save_screenshot(str(SHOTS / f"host-charts-{suffix}.png"))
        screen(d, LAPTOP)
        # Without JavaScript the server's SVG charts are the page's.
        d.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
        try:
            d.get(base + "/host/host1")
            wait_for(d, lambda d: css(d, "h1")[0].text == "Host host1", "host1's page without scripts")
            svgs = css(d, ".chart-fallback svg")
            assert len(svgs) == 3 and all(x.is_displayed() for x in svgs) and not css(d, ".uplot")
            assert [x.get_attribute("aria-label") for x in svgs][0] == "Load (1 min): 720 samples, last 3.1"
            d.save_screenshot(str(SHOTS / "host-charts-nojs-laptop.png"))
        finally:
            d.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})

    yield in_thread(story)
