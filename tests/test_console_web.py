"""A VM's console tab in a real headless Chromium against in-process nodes: from the VM page's
Console tab, keys typed into xterm.js reach the VM's console and its answer shows; a reload
reconnects and shows the last output at once (the ring replays); a VM on another host is
reached through the host the browser is on. Screenshot: docs/screenshots/vm-console-laptop.png
(and -phone.png).

As in tests/test_console.py, each VM's console is a real shell on a real pty (the test driver
has no consoles).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import threads

from test_console import running_cluster, with_shells
from test_history import two_hosts  # noqa: F401  (a fixture)
from test_web import css, screen, wait_for
from test_web_pages import LAPTOP, PHONE, SHOTS, browser, login  # noqa: F401  (browser: a fixture)
from vmwebd.dom.records import VmRec, status_of

pytestmark = pytest.mark.slow


def screen_text(d) -> str:
    """What the terminal shows (xterm.js's rows, as text)."""
    rows = css(d, "#console .xterm-rows")
    return rows[0].text if rows else ""


def status(d) -> str:
    return css(d, "#console-status")[0].text


def type_keys(d, text: str) -> None:
    css(d, "#console .xterm-helper-textarea")[0].send_keys(text)


@pytest_twisted.inlineCallbacks
def test_the_console_tab_types_into_a_vm_on_another_host_and_replays_after_a_reload(two_hosts, browser):  # noqa: F811
    """alice, on host2's pages, opens the Console tab of her VM running on host1, types a
    command and reads its answer; after a reload the answer is there before she types; the page
    loads no style or script from elsewhere and breaks no Content-Security-Policy rule."""
    a, b = yield two_hosts()
    with_shells(a.node, b.node)
    vms = yield running_cluster(a.node, "lab1", "alice", 4)
    yield b.node.domsvc.wait_for(
        lambda: all(
            (st := status_of(b.node.domsvc.dom, vm)) is not None and st.state == "running" for vm in vms
        ),
        30,
    )
    vm = next(v for v in b.node.domsvc.dom.all(VmRec) if v.cluster == "lab1" and v.host == "host1")
    base = f"http://{b.node.api_address}"

    def story():
        d = browser
        login(d, base, "alice")
        d.get(f"{base}/vm/lab1/{vm.name}")
        css(d, "#tab-console")[0].click()
        wait_for(d, lambda d: d.current_url.endswith(f"/vm/lab1/{vm.name}/console"), "the console tab")
        wait_for(d, lambda d: status(d).startswith("Connected to lab1/"), "the console to connect")
        type_keys(d, "echo hello from $((40+2))\n")
        wait_for(d, lambda d: "hello from 42" in screen_text(d), "the answer on the screen")
        type_keys(d, "printf '\\033[1;32mgreen\\033[0m <b>not bold</b>\\n'\n")
        wait_for(d, lambda d: "<b>not bold</b>" in screen_text(d), "markup shown as text")
        assert not css(d, "#console b"), "console output became markup"
        assert a.node.consoles.open_streams == 1 and b.node.consoles.open_streams == 0
        for size, mobile, suffix in ((LAPTOP, False, "laptop"), (PHONE, True, "phone")):
            screen(d, size, mobile)
            if mobile:
                width = d.execute_script("return document.documentElement.scrollWidth")
                assert width <= size[0], f"the console page is {width} px wide on a phone"
            d.save_screenshot(str(SHOTS / f"vm-console-{suffix}.png"))
        screen(d, LAPTOP)
        d.refresh()
        wait_for(d, lambda d: status(d).startswith("Connected to lab1/"), "the console to reconnect")
        wait_for(d, lambda d: "hello from 42" in screen_text(d), "the ring replayed after the reload")
        logs = [e["message"] for e in d.get_log("browser")]
        assert not [m for m in logs if "Content Security Policy" in m or "Refused" in m], logs

    yield threads.deferToThread(story)
