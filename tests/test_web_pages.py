"""The cluster and VM pages, search and filter, and the confirmation before destructive actions,
in a real headless Chromium against an in-process node (the browser runs in a thread while the
reactor serves the pages), plus the same rules over plain HTTP without a script.

The pages are captured at laptop (1366×768) and phone (390×844) sizes under
``docs/screenshots/``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from procs import ADMIN, REPO, password_of
from test_web import _chromium, css, screen, wait_for
from test_web_views import Browserless
from vmwebd.dom.records import HostRec, MigrationRec, VClusterRec, VmRec, status_of

pytestmark = pytest.mark.slow

SHOTS = REPO / "docs" / "screenshots"
LAPTOP = (1366, 768)
PHONE = (390, 844)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, with a fresh profile."""
    profile = tempfile.mkdtemp(prefix="vmweb-chromium-")
    driver = _chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def login(d, base: str, name: str) -> None:
    """Logs ``name`` in (a fresh session) and waits for the owner view."""
    d.delete_all_cookies()
    d.get(base + "/login")
    css(d, "#login-name")[0].send_keys(name)
    css(d, "#login-password")[0].send_keys(ADMIN[1] if name == ADMIN[0] else password_of(name))
    css(d, "#login-submit")[0].click()
    wait_for(d, lambda d: d.current_url == base + "/owner", f"{name}'s owner view")


def snap(d, name: str, max_height: int = 2400) -> list[Path]:
    """Saves the page as docs/screenshots/NAME-laptop.png and NAME-phone.png (the whole page's
    height, up to ``max_height``, at each width); the phone's must not scroll sideways."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    out = []
    for size, mobile, suffix in ((LAPTOP, False, "laptop"), (PHONE, True, "phone")):
        screen(d, size, mobile)
        if mobile:
            width = d.execute_script("return document.documentElement.scrollWidth")
            assert width <= size[0], f"{name} is {width} px wide on a phone"
        height = min(max_height, d.execute_script("return document.documentElement.scrollHeight"))
        screen(d, (size[0], max(size[1], height)), mobile)
        path = SHOTS / f"{name}-{suffix}.png"
        d.save_screenshot(str(path))
        out.append(path)
    screen(d, LAPTOP)
    return out


def main_text(d) -> str:
    return css(d, "main")[0].text


def flashes(d) -> list[str]:
    return [e.text for e in css(d, "#flashes .flash")]


def row_ids(d, selector: str = "tr[data-vm]") -> list[str]:
    return [e.get_attribute("data-vm") for e in css(d, selector)]


def in_thread(fn, *args):
    """Runs a blocking browser story off the reactor thread (the node serves meanwhile)."""
    return threads.deferToThread(fn, *args)


@pytest_twisted.inlineCallbacks
def make_cluster(node, name: str, owner: str, count: int):
    """Creates a cluster and waits until its VMs run."""
    yield node.manager.create(name, "lab", owner, count)
    yield node.domsvc.wait_for(
        lambda: all(
            (st := status_of(node.domsvc.dom, vm)) is not None and st.state == "running"
            for vm in node.domsvc.dom.all(VmRec)
            if vm.cluster == name
        ),
        30,
    )


# -- cluster and VM pages ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_links_reach_the_cluster_and_vm_pages_which_show_everything_at_a_glance(start_node, browser):
    """From the owner view a cluster's name opens its page (state, owner, template, network, its VMs with
    host, IP, MAC and resources) and a VM's name opens the VM's page (state, desired, host, addresses,
    vCPUs, memory, restarts, the host's words, its migrations); the host view links VMs there too."""
    h = yield start_node()
    node = h.node
    yield make_cluster(node, "lab1", "alice", 3)
    yield node.domsvc.put(
        MigrationRec(
            id="m1",
            vm="lab1/pc1",
            source="host9",
            dest="host1",
            phase="done",
            mode="live",
            requested_by="alice",
            started_at=1_796_000_000_000,
            bytes=70 << 20,
            total_ms=950,
            downtime_ms=257,
        )
    )
    base = f"http://{node.api_address}"
    vms = {v.name: v for v in node.domsvc.dom.all(VmRec) if v.cluster == "lab1"}

    def story():
        d = browser
        login(d, base, "alice")
        css(d, "article[data-cluster='lab1'] h3 a")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/cluster/lab1", "the cluster page")
        assert css(d, "h1")[0].text == "Cluster lab1"
        wait_for(d, lambda d: css(d, "[data-k='c:lab1:state']")[0].text == "active", "lab1 active")
        facts = css(d, "dl.facts")[0].text
        for needle in ("alice", "lab", "isolated", "3/3 running"):
            assert needle in facts, (needle, facts)
        assert row_ids(d) == ["lab1/pc0", "lab1/pc1", "lab1/pc2"]
        row = css(d, "tr[data-vm='lab1/pc2']")[0].text
        for needle in (vms["pc2"].ip, vms["pc2"].mac, "host1", "running", "512 MiB"):
            assert needle in row, (needle, row)
        assert css(d, "#destroy-submit") and css(d, "#scale-submit")
        snap(d, "cluster-page")

        css(d, "tr[data-vm='lab1/pc1'] td a")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/vm/lab1/pc1", "the VM page")
        assert css(d, "h1")[0].text == "VM lab1/pc1"
        facts = css(d, "dl.facts")[0].text
        for needle in (
            "running",
            "host1",
            vms["pc1"].ip,
            vms["pc1"].mac,
            "Restarts",
            "Host says",
            "vCPUs",
            "512 MiB",
        ):
            assert needle in facts, (needle, facts)
        moves = [e.text for e in css(d, "tr[data-migration]")]
        assert len(moves) == 1 and "host9" in moves[0] and "257 ms" in moves[0] and "done" in moves[0], moves
        assert css(d, "#vm-power")[0].text == "Stop" and css(d, "#migrate-submit")
        snap(d, "vm-page")
        css(d, ".crumbs a[href='/cluster/lab1']")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/cluster/lab1", "back to the cluster page")

        d.get(base + "/hosts")
        css(d, "article.host a.vm-id[href='/vm/lab1/pc0']")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/vm/lab1/pc0", "the VM page from the host view")
        assert "This VM has not moved." in main_text(d)

    yield in_thread(story)


@pytest_twisted.inlineCallbacks
def test_another_users_cluster_and_vm_pages_are_refused_saying_why(start_node, browser):
    """Bob asking for alice's cluster or VM page gets a 403 page naming why and nothing of hers;
    a cluster that does not exist is a 404; the admin sees alice's pages."""
    h = yield start_node()
    node = h.node
    yield make_cluster(node, "alices", "alice", 1)
    base = f"http://{node.api_address}"
    vm = next(v for v in node.domsvc.dom.all(VmRec) if v.cluster == "alices")

    def plain():
        bob = Browserless(node.api_address)
        assert bob.login("bob", password_of("bob")).status_code == 303
        for path in ("/cluster/alices", "/vm/alices/pc0"):
            r = bob.s.get(base + path, timeout=10)
            assert r.status_code == 403, (path, r.status_code)
            assert "belongs to another user" in r.text and "alices" in r.text
            assert vm.ip not in r.text and vm.mac not in r.text
        assert bob.s.get(base + "/cluster/nosuch", timeout=10).status_code == 404
        assert bob.s.get(base + "/vm/alices/pc0/more", timeout=10).status_code == 404
        admin = Browserless(node.api_address)
        admin.login(*ADMIN)
        r = admin.s.get(base + "/vm/alices/pc0", timeout=10)
        assert r.status_code == 200 and vm.ip in r.text

    def story():
        d = browser
        login(d, base, "bob")
        d.get(base + "/cluster/alices")
        text = main_text(d)
        assert "user 'bob' may not see or change cluster 'alices': it belongs to another user" in text, text
        assert css(d, "nav a[href='/owner']")  # still logged in, with the navigation
        snap(d, "cluster-page-refused")

    yield in_thread(plain)
    yield in_thread(story)


# -- search and filter ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_filters_on_the_owner_and_host_views_hide_what_does_not_match(start_node, browser):
    """Typing a name, picking an owner, a host or a state leaves only matching clusters, VMs and hosts
    on the page (with the script, a picked option applies at once); the same query works without
    a script, and the live updates keep the filter."""
    h = yield start_node()
    node = h.node
    yield make_cluster(node, "lab1", "alice", 2)
    yield make_cluster(node, "web1", "bob", 1)
    yield node.domsvc.put(HostRec(id="host9", liveness="left", cpus=4, memory_mib=8192))
    base = f"http://{node.api_address}"
    pc1 = node.domsvc.dom.get(VmRec, "lab1/pc1")

    def plain():
        b = Browserless(node.api_address)
        b.login(*ADMIN)
        page = b.s.get(base + "/owner", params={"q": "web"}, timeout=10).text
        assert 'data-vm="web1/pc0"' in page and 'data-vm="lab1/pc0"' not in page
        assert "1 of 3 VMs match" in page
        page = b.s.get(base + "/owner", params={"q": pc1.ip}, timeout=10).text
        assert re.findall(r'data-vm="([^"]+)"', page) == ["lab1/pc1"]
        page = b.s.get(base + "/owner", params={"host": "host9"}, timeout=10).text
        assert "No cluster or VM matches the filter." in page and "data-vm=" not in page
        page = b.s.get(base + "/hosts", params={"state": "left"}, timeout=10).text
        assert re.findall(r'data-host="([^"]+)"', page) == ["host9"]
        # Markup in the query comes back as text in the search box.
        page = b.s.get(base + "/owner", params={"q": '"><script>x</script>'}, timeout=10).text
        assert "<script>x" not in page and 'value="&quot;&gt;&lt;script&gt;x&lt;/script&gt;"' in page

    def story():
        d = browser
        login(d, base, ADMIN[0])
        assert sorted(row_ids(d)) == ["lab1/pc0", "lab1/pc1", "web1/pc0"]
        css(d, "#filter-q")[0].send_keys("lab1/pc1\n")
        wait_for(d, lambda d: row_ids(d) == ["lab1/pc1"], "only lab1/pc1 left by the search")
        assert not css(d, "article[data-cluster='web1']") and not css(d, "section[data-user='bob']")
        assert css(d, "#filter-count")[0].text == "1 of 3 VMs match"
        css(d, "#filter-clear")[0].click()
        wait_for(d, lambda d: len(row_ids(d)) == 3, "all rows back once the filter is cleared")
        from selenium.webdriver.support.ui import Select

        Select(css(d, "#filter-owner")[0]).select_by_value("bob")  # applies at once
        wait_for(d, lambda d: row_ids(d) == ["web1/pc0"], "only bob's VM")
        assert d.current_url == base + "/owner?q=&owner=bob&host=&state="
        polls = int(css(d, "body")[0].get_attribute("data-polls") or 0)
        wait_for(
            d,
            lambda d: int(css(d, "body")[0].get_attribute("data-polls") or 0) > polls + 1,
            "the page to poll its live state",
        )
        assert row_ids(d) == ["web1/pc0"]
        snap(d, "owner-view-filtered", max_height=900)

        d.get(base + "/hosts")
        assert [e.get_attribute("data-host") for e in css(d, "article.host")] == ["host1", "host9"]
        Select(css(d, "#filter-host")[0]).select_by_value("host9")
        wait_for(
            d,
            lambda d: [e.get_attribute("data-host") for e in css(d, "article.host")] == ["host9"],
            "only host9 on the host view",
        )
        Select(css(d, "#filter-host")[0]).select_by_value("")
        css(d, "#filter-q")[0].send_keys("web1\n")
        wait_for(
            d,
            lambda d: [e.text for e in css(d, "article.host .vm-id")] == ["web1/pc0"],
            "only web1's VM on the host view",
        )
        snap(d, "host-view-filtered")

    yield in_thread(plain)
    yield in_thread(story)


# -- confirmation before destroying -----------------------------------------------------------------


def confirm_page(d, question: str):
    wait_for(d, lambda d: css(d, "#confirm-question"), "the confirmation page")
    assert css(d, "#confirm-question")[0].text == question, css(d, "#confirm-question")[0].text


@pytest_twisted.inlineCallbacks
def test_destroy_scale_down_and_stop_ask_first_and_cancel_changes_nothing(start_node, browser):
    """Destroy, a scale down and a VM's stop each show a page naming what will be lost; Cancel
    leaves everything as it was, confirming does it; a scale up does not ask."""
    h = yield start_node()
    node = h.node
    dom = node.domsvc.dom
    yield make_cluster(node, "lab1", "alice", 4)
    base = f"http://{node.api_address}"

    def story():
        d = browser
        login(d, base, "alice")
        # Destroy, from the owner view: cancel, then from the cluster page: confirm.
        css(d, "article[data-cluster='lab1'] form[action='/action/destroy'] button")[0].click()
        confirm_page(d, "Destroy cluster lab1 and its 4 VMs?")
        assert "pc0, pc1, pc2, pc3" in main_text(d)
        snap(d, "confirm-destroy")
        css(d, "#confirm-cancel")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/owner", "back on the owner view")
        assert dom.get(VClusterRec, "lab1").state != "destroying"
        assert len([v for v in dom.all(VmRec) if v.cluster == "lab1" and v.desired == "running"]) == 4

        # A scale down names the VMs it removes; cancel, then confirm.
        d.get(base + "/cluster/lab1")
        count = css(d, "#scale-count")[0]
        count.clear()
        count.send_keys("2")
        css(d, "#scale-submit")[0].click()
        confirm_page(d, "Scale cluster lab1 down from 4 to 2 VMs?")
        assert "lab1/pc2, lab1/pc3" in main_text(d)
        snap(d, "confirm-scale-down")
        css(d, "#confirm-cancel")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/cluster/lab1", "back on the cluster page")
        assert dom.get(VClusterRec, "lab1").count == 4
        count = css(d, "#scale-count")[0]
        count.clear()
        count.send_keys("3")
        css(d, "#scale-submit")[0].click()
        confirm_page(d, "Scale cluster lab1 down from 4 to 3 VMs?")
        css(d, "#confirm-yes")[0].click()
        wait_for(
            d,
            lambda d: (
                d.current_url == base + "/cluster/lab1" and row_ids(d) == ["lab1/pc0", "lab1/pc1", "lab1/pc2"]
            ),
            "lab1 down to 3 VMs on its page",
        )
        assert dom.get(VClusterRec, "lab1").count == 3
        # Up again: nothing is lost, nothing is asked.
        count = css(d, "#scale-count")[0]
        count.clear()
        count.send_keys("4")
        css(d, "#scale-submit")[0].click()
        wait_for(d, lambda d: len(row_ids(d)) == 4, "lab1 back to 4 VMs without a question")
        assert not css(d, "#confirm-question")

        # Stop a VM from its page: cancel, then confirm.
        d.get(base + "/vm/lab1/pc0")
        css(d, "#vm-power")[0].click()
        confirm_page(d, "Stop VM pc0 of cluster lab1?")
        snap(d, "confirm-stop")
        css(d, "#confirm-cancel")[0].click()
        wait_for(d, lambda d: d.current_url == base + "/vm/lab1/pc0", "back on the VM page")
        assert dom.get(VmRec, "lab1/pc0").desired == "running"
        css(d, "#vm-power")[0].click()
        confirm_page(d, "Stop VM pc0 of cluster lab1?")
        css(d, "#confirm-yes")[0].click()
        wait_for(
            d,
            lambda d: (
                d.current_url == base + "/vm/lab1/pc0"
                and css(d, "[data-k='v:lab1/pc0:state']")[0].text == "shutoff"
            ),
            "pc0 shut off",
        )
        assert css(d, "#vm-power")[0].text == "Start"

        d.get(base + "/cluster/lab1")
        css(d, "#destroy-submit")[0].click()
        confirm_page(d, "Destroy cluster lab1 and its 4 VMs?")
        css(d, "#confirm-yes")[0].click()
        wait_for(
            d,
            lambda d: d.current_url == base + "/owner" and not css(d, "article[data-cluster='lab1']"),
            "lab1 gone from the owner view",
        )
        assert any("lab1" in f for f in flashes(d)), flashes(d)

    yield in_thread(story)
    yield node.domsvc.wait_for(lambda: dom.get(VClusterRec, "lab1") is None, 30)
    assert dom.get(VClusterRec, "lab1") is None


def ed25519_line(comment: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return (
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        + " "
        + comment
    )


def form_fields(page: str, question_id: str = "confirm-question") -> dict:
    """The hidden fields of the confirmation page's form."""
    form = re.search(r'<form[^>]*class="confirm-form".*?</form>', page, re.S).group(0)
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))


@pytest_twisted.inlineCallbacks
def test_drain_evacuate_user_delete_and_key_removal_ask_first_without_a_script(start_node):
    """Over plain HTTP (no script): draining or evacuating a host, deleting a user and removing an SSH
    key first answer with a page naming what is lost, which changes nothing; posting its form does
    it; another user's destroy is refused at the question already."""
    from vmwebd.settings import drained_hosts

    h = yield start_node()
    node = h.node
    dom = node.domsvc.dom
    yield make_cluster(node, "lab1", "alice", 1)
    vm = next(v for v in dom.all(VmRec) if v.cluster == "lab1")
    yield make_cluster(node, "gone1", "alice", 1)
    moved = next(v for v in dom.all(VmRec) if v.cluster == "gone1")
    node.migrations.replace_grace_s = 3600
    yield node.domsvc.put(
        HostRec(id="host9", liveness="left", cpus=4, memory_mib=8192),
        dataclasses.replace(moved, host="host9"),
    )
    base = f"http://{node.api_address}"
    key = ed25519_line("alice@laptop")

    def ask(b, action, **data):
        page = b.s.post(
            base + f"/action/{action}",
            timeout=30,
            data={"csrf": b.csrf(), "confirm": "ask", "back": "/hosts", **data},
        )
        assert page.status_code == 200
        return page.text

    def act(b, action, page):
        return b.s.post(base + f"/action/{action}", data=form_fields(page), timeout=30).text

    def story():
        admin = Browserless(node.api_address)
        admin.login(*ADMIN)
        page = ask(admin, "drain", host="host1")
        assert "Drain host host1 and move its 1 VM away?" in page and vm.id in page
        assert 'href="/hosts" class="button secondary" id="confirm-cancel"' in page
        assert "host1" not in drained_hosts(dom)
        fields = form_fields(page)
        assert "confirm" not in fields and fields["host"] == "host1" and fields["back"] == "/hosts"
        assert "Host host1 is draining" in act(admin, "drain", page)
        assert "host1" in drained_hosts(dom)
        admin.s.post(base + "/action/undrain", data={"csrf": admin.csrf(), "host": "host1"}, timeout=30)

        page = ask(admin, "evacuate", host="host9")
        assert "Evacuate host host9 and re-place its 1 VM?" in page and "gone1/pc0" in page
        assert dom.get(VmRec, moved.id).host == "host9"
        assert "1 VMs re-placed" in act(admin, "evacuate", page)
        assert dom.get(VmRec, moved.id).host == "host1"

        page = ask(admin, "user/delete", name="carol")
        assert "Delete user carol?" in page and "carol can no longer log in" in page
        from vmwebd.dom.records import UserRec

        assert dom.get(UserRec, "carol") is not None
        assert "User carol deleted." in act(admin, "user/delete", page)
        assert dom.get(UserRec, "carol") is None

        alice = Browserless(node.api_address)
        alice.login("alice", password_of("alice"))
        alice.s.post(
            base + "/action/user/key/add",
            timeout=30,
            data={"csrf": alice.csrf(), "name": "alice", "key": key, "back": "/owner"},
        )
        fingerprint = node.access.ssh_keys(node_principal("alice"), "alice")[0].fingerprint
        page = ask(alice, "user/key/remove", name="alice", fingerprint=fingerprint)
        assert f"Remove SSH key {fingerprint} from alice?" in page and "alice@laptop" in page
        assert len(node.access.ssh_keys(node_principal("alice"), "alice")) == 1
        assert f"SSH key {fingerprint} removed from alice." in act(alice, "user/key/remove", page)
        assert node.access.ssh_keys(node_principal("alice"), "alice") == []

        # Bob's question about alice's cluster is refused as the action would be.
        bob = Browserless(node.api_address)
        bob.login("bob", password_of("bob"))
        page = bob.s.post(
            base + "/action/destroy",
            timeout=30,
            data={"csrf": bob.csrf(), "confirm": "ask", "cluster": "lab1", "back": "/owner"},
        ).text
        assert "confirm-question" not in page and "may not see or change cluster" in page
        assert dom.get(VClusterRec, "lab1").state != "destroying"

    yield in_thread(story)


def node_principal(name: str):
    from vmwebd.auth import Principal

    return Principal(name, "user")
