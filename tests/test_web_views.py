"""The web layer without a browser: the escaping HTML builder, hostile text from the DOM on the
pages, the login and session rules over plain HTTP, and the `vmweb user` commands (in-process node)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import requests
from twisted.internet import threads

from procs import ADMIN, REPO, child_env, password_of
from vmwebd.web.html import Markup, el, esc, frag
from vmwebd.web.views import highlight_xml

HOSTILE = '<script>alert("x")</script>&\'"'


def test_builder_escapes_text_and_attributes_and_keeps_markup():
    """Text and attribute values are escaped, Markup built by el() is not escaped twice."""
    html = el("p", HOSTILE, el("b", "ok"), title=HOSTILE, class_="c", data_k="a:b", hidden=True, alt=None)
    assert html == (
        '<p title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;" class="c" '
        'data-k="a:b" hidden>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;'
        '<b>ok</b></p>'
    )
    assert esc(Markup("<i>")) == "<i>" and esc("<i>") == "&lt;i&gt;"
    assert frag("<a>", None, ["<b>", el("br")]) == "&lt;a&gt;&lt;b&gt;<br>"


def test_dom_highlighting_keeps_every_character_escaped():
    """The DOM view's highlighter wraps tokens in spans, and the text a reader sees is the XML exactly."""
    xml = '<?xml version="1.0"?>\n<dom a="1&amp;2">\n  <t description="&lt;script&gt;"/>\n</dom>'
    html = highlight_xml(xml)
    assert "<script" not in html
    assert (
        re.sub(r"<[^>]+>", "", html)
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", '"')
        .replace("&#x27;", "'")
        .replace("&amp;", "&")
        == xml
    )


def write_hostile_template(directory: Path) -> Path:
    """A templates dir whose one template has markup in its description."""
    directory.mkdir(parents=True, exist_ok=True)
    src = (REPO / "conf" / "templates" / "lab.xml").read_text()
    text = re.sub(
        r'description="[^"]*"',
        'description="&lt;script&gt;window.pwned=1&lt;/script&gt; &amp; more"',
        src,
        count=1,
    )
    (directory / "lab.xml").write_text(text)
    return directory


class Browserless:
    """A requests session logged in on a node's pages (blocking: call from a thread)."""

    def __init__(self, address: str):
        self.base = f"http://{address}"
        self.s = requests.Session()

    def login(self, name: str, password: str) -> requests.Response:
        page = self.s.get(self.base + "/login", timeout=10)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        return self.s.post(
            self.base + "/login",
            data={"csrf": token, "name": name, "password": password},
            allow_redirects=False,
            timeout=10,
        )

    def csrf(self) -> str:
        page = self.s.get(self.base + "/owner", timeout=10)
        return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


@pytest_twisted.inlineCallbacks
def test_template_description_with_markup_is_shown_as_text(start_node, tmp_path):
    """A template description holding a script tag appears on the owner view as text, in the select and the table."""
    h = yield start_node(templates_dir=write_hostile_template(tmp_path / "templates"))

    def fetch():
        b = Browserless(h.node.api_address)
        assert b.login("alice", password_of("alice")).status_code == 303
        return b.s.get(b.base + "/owner", timeout=10)

    page = yield threads.deferToThread(fetch)
    assert page.status_code == 200
    assert "<script>window.pwned" not in page.text
    assert page.text.count("&lt;script&gt;window.pwned=1&lt;/script&gt; &amp; more") == 2
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"


@pytest_twisted.inlineCallbacks
def test_login_sets_a_strict_httponly_cookie_and_logout_ends_the_session(start_node):
    """Login gives a fresh HttpOnly SameSite=Strict session cookie; logout (with its token) ends it server-side."""
    h = yield start_node()

    def story():
        b = Browserless(h.node.api_address)
        before = b.s.cookies.get("vmweb-session-host1")
        r = b.login("bob", password_of("bob"))
        assert (r.status_code, r.headers["Location"]) == (303, "/owner")
        cookie = [c for c in r.headers["Set-Cookie"].split(", ") if c.startswith("vmweb-session-host1=")][0]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        token = b.s.cookies.get("vmweb-session-host1")
        assert token and token != before
        stolen = dict(b.s.cookies)
        r = b.s.post(b.base + "/logout", data={"csrf": b.csrf()}, allow_redirects=False, timeout=10)
        assert (r.status_code, r.headers["Location"]) == (303, "/login")
        # The old cookie is worthless now, even replayed.
        r = requests.get(b.base + "/owner", cookies=stolen, allow_redirects=False, timeout=10)
        assert (r.status_code, r.headers["Location"]) == (303, "/login")
        # A login form posted without the login page's own token is refused.
        r = requests.post(
            b.base + "/login",
            data={"name": "bob", "password": password_of("bob")},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 403 and "vmweb-session" not in r.headers.get("Set-Cookie", "")

    yield threads.deferToThread(story)


@pytest_twisted.inlineCallbacks
def test_a_password_change_ends_the_users_other_sessions(start_node):
    """Once carol's password changes (here by an admin over SOAP), her open web session is over."""
    h = yield start_node()
    b = Browserless(h.node.api_address)
    yield threads.deferToThread(b.login, "carol", password_of("carol"))
    yield h.call("SetPassword", "carol", "carols-new-password")
    r = yield threads.deferToThread(b.s.get, b.base + "/state.json", timeout=10)
    assert r.status_code == 401


@pytest_twisted.inlineCallbacks
def test_a_user_changes_their_own_password_on_the_page(start_node):
    """Dave's own password form works (the new password logs in over SOAP); his form for alice's password is refused."""
    h = yield start_node()

    def story():
        b = Browserless(h.node.api_address)
        b.login("dave", password_of("dave"))
        page = b.s.post(
            b.base + "/action/user/password",
            timeout=10,
            data={"csrf": b.csrf(), "name": "dave", "password": "daves-new-password", "back": "/owner"},
        )
        assert "Password of dave changed." in page.text and page.url.endswith("/owner")  # still logged in
        b2 = Browserless(h.node.api_address)
        b2.login("dave", "daves-new-password")
        page = b2.s.post(
            b2.base + "/action/user/password",
            timeout=10,
            data={"csrf": b2.csrf(), "name": "alice", "password": "hijack-attempt", "back": "/owner"},
        )
        assert "may only change their own password" in page.text

    yield threads.deferToThread(story)
    assert (yield h.as_user("dave", "daves-new-password").call("ListUsers"))[0]["name"] == "dave"
    assert (yield h.as_user("alice").call("ListUsers"))[0]["name"] == "alice"


def vmweb(address: str, *args: str, env=None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmwebd.cli", "--host", address, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=child_env(**(env or {})),
    )


@pytest_twisted.inlineCallbacks
def test_cli_user_commands_and_credentials(start_node, tmp_path):
    """`vmweb user create/list/passwd/quota/delete` work for an admin, from env, a credentials file or options."""
    h = yield start_node()
    addr = h.node.api_address
    creds = tmp_path / "creds"
    creds.write_text(f"{ADMIN[0]}:{ADMIN[1]}\n")

    def story():
        made = vmweb(addr, "--credentials", str(creds), "user", "create", "erin", "--quota", "3")
        assert made.returncode == 0, made.stderr
        password = made.stdout.strip().splitlines()[-1].removeprefix("password: ")
        assert len(password) >= 16
        listed = vmweb(addr, "user", "list", env={"VMWEB_CREDENTIALS": str(creds)})
        assert [line.split()[:3] for line in listed.stdout.splitlines()][-1] == ["erin", "user", "3"]
        own = vmweb(addr, "--user", "erin", "--password", password, "user", "list")
        assert own.returncode == 0 and len(own.stdout.splitlines()) == 2, own
        changed = vmweb(
            addr,
            "user",
            "passwd",
            "erin",
            "--password-stdin",
            stdin="erins-own-password\n",
            env={"VMWEB_USER": "erin", "VMWEB_PASSWORD": password},
        )
        assert changed.returncode == 0, changed.stderr
        refused = vmweb(
            addr,
            "user",
            "quota",
            "erin",
            "99",
            env={"VMWEB_USER": "erin", "VMWEB_PASSWORD": "erins-own-password"},
        )
        assert refused.returncode == 1 and refused.stderr.startswith("vmweb: Client.NotAuthorized:")
        assert vmweb(addr, "--credentials", str(creds), "user", "quota", "erin", "5").returncode == 0
        assert vmweb(addr, "--credentials", str(creds), "user", "delete", "erin").returncode == 0
        anonymous = vmweb(addr, "clusters")
        assert anonymous.returncode == 1 and "VMWEB_CREDENTIALS" in anonymous.stderr
        boot = vmweb(addr, "user", "bootstrap", "root", "--state-dir", str(tmp_path / "state"))
        assert boot.returncode == 0 and (tmp_path / "state" / "bootstrap-admin").exists()
        assert (
            boot.stdout.split("password ")[-1].strip()
            not in (tmp_path / "state" / "bootstrap-admin").read_text()
        )

    yield threads.deferToThread(story)


@pytest_twisted.inlineCallbacks
def test_host_view_lists_migrations_escaped_and_only_the_users_own(start_node):
    """The host view shows migrations (phase, bytes, downtime, what a move under way waits on);
    a user sees only their clusters' moves, and an error text holding markup is shown as text."""
    from vmwebd.dom.records import MigrationRec, VClusterRec

    h = yield start_node()
    yield h.node.domsvc.put(VClusterRec(id="bobs", owner="bob"), VClusterRec(id="alices", owner="alice"))
    yield h.node.domsvc.put(
        MigrationRec(
            id="m1",
            vm="bobs/pc0",
            source="host1",
            dest="host2",
            phase="done",
            mode="live",
            bytes=70 << 20,
            total_ms=950,
            downtime_ms=257,
            started_at=1,
        ),
        MigrationRec(
            id="m2",
            vm="alices/pc0",
            source="host1",
            dest="host2",
            phase="failed",
            mode="cold",
            error="phase prepare: <img src=x onerror=alert(1)>",
            started_at=2,
        ),
        MigrationRec(
            id="m3",
            vm="bobs/pc1",
            source="host1",
            dest="host2",
            phase="prepare",
            mode="cold",
            started_at=int(h.node.migrations.now_ms()),
        ),
    )

    def fetch(user):
        b = Browserless(h.node.api_address)
        assert b.login(user, password_of(user) if user != "admin" else ADMIN[1]).status_code == 303
        return b.s.get(b.base + "/hosts", timeout=10).text

    bob = yield threads.deferToThread(fetch, "bob")
    assert "bobs/pc0" in bob and "257 ms" in bob and "alices/pc0" not in bob
    # A move under way says what it waits on (host2 is no host the failure detector knows).
    assert "waiting on host host2 to prepare (base image, network, an empty overlay); it is unknown" in bob
    admin = yield threads.deferToThread(fetch, "admin")
    assert "alices/pc0" in admin and "bobs/pc0" in admin
    assert "<img src=x" not in admin and "&lt;img src=x onerror=alert(1)&gt;" in admin


@pytest_twisted.inlineCallbacks
def test_admin_evacuates_a_host_that_left_from_the_host_view(start_node):
    """A host that left still holds a VM: only an admin's host view offers to evacuate it, and the
    button (with its CSRF token) puts the VM back on a live host, where it runs again."""
    import dataclasses

    from vmwebd.dom.records import HostRec, VmRec, status_of

    h = yield start_node()
    node = h.node
    yield node.manager.create("evw", "lab", "bob", 1)
    vm = next(v for v in node.domsvc.dom.all(VmRec) if v.cluster == "evw")
    yield node.domsvc.put(
        HostRec(id="host9", liveness="left", cpus=4, memory_mib=8192), dataclasses.replace(vm, host="host9")
    )

    def page(user):
        b = Browserless(node.api_address)
        assert b.login(user, password_of(user) if user != "admin" else ADMIN[1]).status_code == 303
        return b, b.s.get(b.base + "/hosts", timeout=10).text

    _, bob = yield threads.deferToThread(page, "bob")
    assert "evw/pc0" in bob and "/action/evacuate" not in bob
    admin, text = yield threads.deferToThread(page, "admin")
    form = re.search(r'<form[^>]*action="/action/evacuate".*?</form>', text, re.S).group(0)
    assert 'value="host9"' in form and "Evacuate its 1 VMs" in form
    token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    r = yield threads.deferToThread(
        admin.s.post,
        admin.base + "/action/evacuate",
        data={"csrf": token, "host": "host9", "back": "/hosts"},
        timeout=30,
    )
    assert r.status_code == 200 and "1 VMs re-placed" in r.text, r.text[:2000]
    moved = node.domsvc.dom.get(VmRec, vm.id)
    assert moved.host == "host1" and (moved.ip, moved.mac) == (vm.ip, vm.mac)
    yield node.domsvc.wait_for(
        lambda: (
            (st := status_of(node.domsvc.dom, node.domsvc.dom.get(VmRec, vm.id))) is not None
            and st.state == "running"
        ),
        30,
    )
    assert status_of(node.domsvc.dom, node.domsvc.dom.get(VmRec, vm.id)).state == "running"


@pytest_twisted.inlineCallbacks
def test_destroy_waiting_on_a_departed_host_says_so_and_evacuation_finishes_it(start_node):
    """A cluster whose VM is on a host that left: its destroy answers at once naming that host;
    evacuating the host deletes the VM (its addresses given back) and the cluster goes."""
    import dataclasses

    from vmwebd.dom.records import HostRec, LeaseRec, VClusterRec, VmRec

    h = yield start_node()
    node = h.node
    yield node.manager.create("evd", "lab", "bob", 2)
    vm = sorted((v for v in node.domsvc.dom.all(VmRec) if v.cluster == "evd"), key=lambda v: v.id)[0]
    yield node.domsvc.put(
        HostRec(id="host9", liveness="left", cpus=4, memory_mib=8192), dataclasses.replace(vm, host="host9")
    )
    b = Browserless(node.api_address)
    assert (yield threads.deferToThread(b.login, "bob", password_of("bob"))).status_code == 303
    token = yield threads.deferToThread(b.csrf)
    r = yield threads.deferToThread(
        b.s.post,
        b.base + "/action/destroy",
        data={"csrf": token, "cluster": "evd", "back": "/owner"},
        timeout=60,
    )
    assert r.status_code == 200 and "waits for host(s) host9, not alive" in r.text, r.text[:3000]
    assert node.domsvc.dom.get(VClusterRec, "evd").state == "destroying"
    moves = yield node.migrations.evacuate("host9", requested_by="admin")
    assert moves == []  # nothing to re-place: its one VM was being removed
    yield node.domsvc.wait_for(lambda: node.domsvc.dom.get(VClusterRec, "evd") is None, 30)
    assert node.domsvc.dom.get(VClusterRec, "evd") is None
    assert not [
        lease.id for lease in node.domsvc.dom.all(LeaseRec) if vm.ip in lease.id or vm.mac in lease.id
    ]


@pytest_twisted.inlineCallbacks
def test_admin_drains_and_undrains_a_host_from_the_host_view(start_node):
    """Only an admin's host view offers Drain; on a grid of one host its VM has nowhere to go, and
    the answer says so; the host is shown draining, takes no new VM, and Undrain ends that."""
    from vmwebd.errors import NoCapacity

    h = yield start_node()
    node = h.node
    yield node.manager.create("drw", "lab", "bob", 1)

    def login(user):
        b = Browserless(node.api_address)
        assert b.login(user, password_of(user) if user != "admin" else ADMIN[1]).status_code == 303
        return b

    bob = yield threads.deferToThread(login, "bob")
    text = (yield threads.deferToThread(bob.s.get, bob.base + "/hosts", timeout=10)).text
    assert "/action/drain" not in text
    admin = yield threads.deferToThread(login, "admin")
    text = (yield threads.deferToThread(admin.s.get, admin.base + "/hosts", timeout=10)).text
    form = re.search(r'<form[^>]*action="/action/drain".*?</form>', text, re.S).group(0)
    token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    r = yield threads.deferToThread(
        admin.s.post,
        admin.base + "/action/drain",
        data={"csrf": token, "host": "host1", "back": "/hosts"},
        timeout=30,
    )
    assert "Host host1 is draining: 0 VMs moving away; not movable now: drw/pc0: " in r.text, r.text[:3000]
    assert 'data-state="draining"' in r.text and "/action/undrain" in r.text
    with pytest.raises(NoCapacity):
        yield node.manager.create("drw2", "lab", "bob", 1)
    r = yield threads.deferToThread(
        admin.s.post,
        admin.base + "/action/undrain",
        data={"csrf": token, "host": "host1", "back": "/hosts"},
        timeout=30,
    )
    assert "Host host1 takes new VMs again." in r.text and 'data-state="draining"' not in r.text
    c = yield node.manager.create("drw2", "lab", "bob", 1)
    assert [v.host for v in c.vms] == ["host1"]


@pytest_twisted.inlineCallbacks
def test_a_pending_vm_says_on_the_page_which_host_it_waits_for_and_why(start_node):
    """A VM placed on a host that is no longer alive shows, on the owner page and in the page's
    live data, its host, that host's state and what to do."""
    import dataclasses

    from vmwebd.dom.records import HostRec, VmRec

    h = yield start_node()
    node = h.node
    node.migrations.replace_grace_s = 3600  # keep it where it is for this test
    yield node.manager.create("pw", "lab", "bob", 1)
    vm = next(v for v in node.domsvc.dom.all(VmRec) if v.cluster == "pw")
    # Re-made for host9 (a new creation token: nothing reported for it yet), which then left.
    yield node.domsvc.put(
        HostRec(id="host9", liveness="left", cpus=4, memory_mib=8192),
        dataclasses.replace(vm, host="host9", token="0badc0de"),
    )

    def fetch():
        b = Browserless(node.api_address)
        assert b.login("bob", password_of("bob")).status_code == 303
        return b.s.get(b.base + "/owner", timeout=10).text, b.s.get(b.base + "/state.json", timeout=10).json()

    page, live = yield threads.deferToThread(fetch)
    why = "host host9 is left; a VM that never ran there is placed on a live host automatically"
    span = re.search(r'<span class="detail" data-k="v:pw/pc0:detail">([^<]*)</span>', page)
    assert span and why in span.group(1), page[:3000]
    assert why in live["cells"]["v:pw/pc0:detail"] and live["cells"]["v:pw/pc0:state"] == "pending"


def test_the_evacuation_notice_names_the_moves_it_failed():
    """The notice after Evacuate counts the VMs re-placed and names the moves to the dead host
    that it failed (their source restores those VMs)."""
    from vmwebd.dom.records import MigrationRec
    from vmwebd.web.site import _evacuated

    def move(vm, mode, phase):
        return MigrationRec(id=vm, vm=vm, source="host1", dest="host3", phase=phase, mode=mode)

    assert _evacuated("host3", []) == "Host host3 had no VMs to re-place."
    assert _evacuated("host3", [move("c/a", "evacuate", "done")]) == (
        "Host host3: 1 VMs re-placed on live hosts, booting afresh."
    )
    assert _evacuated("host3", [move("c/b", "cold", "failed"), move("c/a", "evacuate", "done")]) == (
        "Host host3: 1 VMs re-placed on live hosts, booting afresh; the moves of c/b to it failed "
        "(restored at their source)."
    )
    assert _evacuated("host3", [move("c/b", "cold", "failed")]) == (
        "Host host3: the moves of c/b to it failed (restored at their source)."
    )
