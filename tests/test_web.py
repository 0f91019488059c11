"""The web pages in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium),
against a grid of two real vmwebd processes.

A user logs in on host A's page, creates a cluster there, watches it come up without a reload,
sees it on host B's page, scales it there, and destroys it; the views are saved as screenshots
under ``tests/.screenshots/`` (laptop and phone sizes). The security tests use the same browser.
A second grid serves its pages over https (``api-tls="grid"``) to a browser that trusts its CA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
from lxml import etree

from tests.procs import ADMIN, create_users, password_of
from tests.test_peers_process import Grid, wait_until

pytestmark = pytest.mark.slow

SHOTS = Path(__file__).resolve().parent / ".screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
]
WAIT = 30.0
LAPTOP = (1280, 900)
PHONE = (390, 844)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two vmwebd processes forming one grid (mutual TLS, gossip); accounts alice (quota 6) and bob."""
    g = Grid(tmp_path_factory.mktemp("webgrid"), 2)
    try:
        wait_until(
            lambda: all(
                set(g.liveness(i).values()) == {"alive"} and len(g.liveness(i)) == 2 for i in range(2)
            ),
            30,
            "two hosts to see each other alive",
        )
        create_users(g.client(0), ("alice", "bob"), quota=6)
        yield g
    finally:
        g.close()


def _chromium(profile: str, env: dict | None = None):
    """A headless Chromium on a fresh profile directory (``env``: chromedriver's and so the
    browser's environment)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are needed (scripts/bootstrap.sh installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=env), options=opts)
    driver.set_page_load_timeout(WAIT)
    screen(driver)
    SHOTS.mkdir(exist_ok=True)
    return driver


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


def url(grid, i: int, path: str) -> str:
    return f"http://{grid.daemons[i].address}{path}"


def wait_for(driver, pred, what: str, timeout: float = WAIT):
    """Waits (bounded) until ``pred(driver)`` is true; fails naming ``what``."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # A page that is being replaced (a form just posted, a live update) can drop an element between
    # finding it and reading it: that is "not yet", not a failure, so the wait polls again.
    wait = WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    try:
        return wait.until(lambda d: pred(d))
    except TimeoutException as e:
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what} (at {driver.current_url})"
        ) from e


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def login(driver, grid, i: int, name: str, password: str | None = None):
    """Logs ``name`` in on host ``i``'s login page and waits for the owner view."""
    driver.get(url(grid, i, "/login"))
    css(driver, "#login-name")[0].send_keys(name)
    css(driver, "#login-password")[0].send_keys(password_of(name) if password is None else password)
    css(driver, "#login-submit")[0].click()
    wait_for(
        driver, lambda d: d.current_url.endswith("/owner") or css(d, ".flash.error"), "the login to answer"
    )


def flashes(driver) -> list[str]:
    return [e.text for e in css(driver, "#flashes .flash")]


def vm_states(driver, cluster: str) -> list[str]:
    return [e.text for e in css(driver, f'article[data-cluster="{cluster}"] tbody .badge')]


def all_running(driver, cluster: str, n: int) -> bool:
    states = vm_states(driver, cluster)
    return len(states) == n and set(states) == {"running"}


def screen(driver, size=LAPTOP, mobile: bool = False) -> None:
    """Makes the page's viewport ``size`` (a phone's, with ``mobile``: the viewport meta applies)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile},
    )


def shot(driver, name: str, size=LAPTOP, mobile: bool = False) -> Path:
    """Saves the whole page (up to 4000 px tall) at ``size``'s width as tests/.screenshots/NAME.png."""
    screen(driver, size, mobile)
    height = driver.execute_script("return Math.min(4000, document.documentElement.scrollHeight)")
    screen(driver, (size[0], max(size[1], height)), mobile)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    screen(driver, size, mobile)
    return path


def submit(driver, form_selector: str, **fields):
    """Fills the named fields of a form and submits it."""
    form = css(driver, form_selector)[0]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        field = form.find_element(By.NAME, name)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(str(value))
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def session_cookies(driver) -> dict:
    return {c["name"]: c["value"] for c in driver.get_cookies()}


# -- the user's story ------------------------------------------------------------------------------


def test_user_builds_watches_scales_and_destroys_a_cluster_across_two_hosts(grid, browser):
    """Alice creates a cluster on host A's page, sees it come up on host B's page without a reload, scales it there, destroys it, and every view is captured."""
    d = browser
    # Host B's owner page is open first, empty; it must pick the cluster up by itself.
    login(d, grid, 1, "alice")
    assert d.current_url == url(grid, 1, "/owner")
    assert css(d, ".who .user")[0].text == "alice"
    assert "Settings" not in [a.text for a in css(d, "nav a")]
    tab_b = d.current_window_handle
    d.execute_script("window.vmwebMarker = 'no reload';")

    d.switch_to.new_window("tab")
    login(d, grid, 0, "alice")
    submit(d, "form[action='/action/create']", name="web1", template="lab", count=2)
    wait_for(d, lambda d: any("web1" in f for f in flashes(d)), "the create action's message")
    wait_for(d, lambda d: all_running(d, "web1", 2), "web1's 2 VMs running on host A's page")
    shot(d, "owner-view-host1")

    d.switch_to.window(tab_b)
    wait_for(d, lambda d: all_running(d, "web1", 2), "web1 to appear, running, on host B's page")
    assert d.execute_script("return window.vmwebMarker") == "no reload"
    assert int(d.find_element("tag name", "body").get_attribute("data-polls")) > 1

    submit(d, "article[data-cluster='web1'] form[action='/action/scale']", count=3)
    wait_for(d, lambda d: all_running(d, "web1", 3), "web1 scaled to 3 running VMs on host B")
    assert any("web1" in f and "3" in f for f in flashes(d)), flashes(d)
    shot(d, "owner-view-host2")

    d.get(url(grid, 1, "/hosts"))
    wait_for(d, lambda d: len(css(d, "article.host")) == 2, "both hosts on the host view")
    chips = [e.text for e in css(d, "article.host .vm-id")]
    assert sorted(chips) == ["web1/pc0", "web1/pc1", "web1/pc2"], chips
    assert {e.text for e in css(d, "article.host .host-head .badge")} == {"alive"}
    shot(d, "host-view")

    d.get(url(grid, 1, "/dom"))
    xml = css(d, "#dom-xml")[0].text
    assert 'id="web1"' in xml and "password-hash" not in xml and "scrypt" not in xml
    shot(d, "dom-view")
    download = requests.get(url(grid, 1, "/dom.xml"), cookies=session_cookies(d), timeout=10)
    assert download.status_code == 200
    assert download.headers["Content-Disposition"].startswith("attachment;")
    root = etree.fromstring(download.content)
    assert root.find("{urn:vmweb:dom:1}vclusters/{urn:vmweb:dom:1}vcluster").get("id") == "web1"
    assert b"password-hash" not in download.content

    screen(d, PHONE, mobile=True)
    for view in ("owner", "hosts"):
        d.get(url(grid, 1, f"/{view}"))
        assert d.execute_script("return document.documentElement.scrollWidth") <= PHONE[0], view
        shot(d, f"{view.rstrip('s')}-view-phone", PHONE, mobile=True)
    screen(d)

    # Destroy on host A: host B's page (in the other tab) drops it without a reload.
    d.get(url(grid, 1, "/owner"))
    d.execute_script("window.vmwebMarker = 'still no reload';")
    d.switch_to.window(d.window_handles[-1])
    d.get(url(grid, 0, "/owner"))
    submit(d, "article[data-cluster='web1'] form[action='/action/destroy']")
    wait_for(d, lambda d: css(d, "#confirm-yes"), "the page asking to confirm the destroy")
    css(d, "#confirm-yes")[0].click()
    wait_for(d, lambda d: not css(d, "article[data-cluster='web1']"), "web1 gone from host A's page")
    d.switch_to.window(tab_b)
    wait_for(d, lambda d: not css(d, "article[data-cluster='web1']"), "web1 gone from host B's page")
    assert d.execute_script("return window.vmwebMarker") == "still no reload"
    assert grid.client(1).call("ListClusters", None) in ([], None)


def test_admin_changes_a_setting_that_reaches_the_other_host(grid, browser):
    """The admin's settings page shows settings, pools and gossip timing; a change made there is read back at the other host."""
    d = browser
    login(d, grid, 0, *ADMIN)
    d.get(url(grid, 0, "/settings"))
    text = css(d, "main")[0].text
    for needle in (
        "placement",
        "cpu_overcommit",
        "Address pools",
        "10.77.0.0/16",
        "gossip interval",
        "probe interval",
        "consensus members",
    ):
        assert needle in text, needle
    submit(d, "form:has(#setting-placement)", value="pack")
    wait_for(d, lambda d: any("placement is now pack" in f for f in flashes(d)), "the setting's message")
    shot(d, "settings-view")
    wait_until(
        lambda: {s["key"]: s["value"] for s in grid.client(1).call("GetSettings")}["placement"] == "pack",
        10,
        "host2 to read placement=pack",
    )
    grid.client(1).call("SetSetting", "placement", "spread")
    # the admin's owner view has the account forms
    d.get(url(grid, 0, "/owner"))
    assert css(d, "#user-create") and {e.text for e in css(d, "table.users tbody tr td:first-child")} >= {
        "admin",
        "alice",
        "bob",
    }
    shot(d, "owner-view-admin")


# -- security -----------------------------------------------------------------------------------------


def test_wrong_password_gets_no_session(grid, browser):
    """A wrong password stays on the login page with a message that does not say which part was wrong, and sets no session."""
    d = browser
    d.delete_all_cookies()
    login(d, grid, 0, "alice", "not-alices-password")
    assert d.current_url == url(grid, 0, "/login")
    assert flashes(d) == ["wrong user name or password"]
    assert not any(n.startswith("vmweb-session") for n in session_cookies(d))
    shot(d, "login-refused")
    d.get(url(grid, 0, "/owner"))
    assert d.current_url == url(grid, 0, "/login")


def test_pages_and_actions_need_a_session(grid):
    """Without a session cookie: pages redirect to the login, the JSON and the XML are refused, an action changes nothing."""
    grid.client(0).call("CreateCluster", "keep1", "lab", "alice", 1)
    try:
        s = requests.Session()
        r = s.get(url(grid, 0, "/owner"), allow_redirects=False, timeout=10)
        assert (r.status_code, r.headers["Location"]) == (303, "/login")
        assert s.get(url(grid, 0, "/state.json"), timeout=10).status_code == 401
        assert s.get(url(grid, 0, "/dom.xml"), timeout=10).status_code == 403
        r = s.post(url(grid, 0, "/action/destroy"), data={"cluster": "keep1", "csrf": "guess"}, timeout=10)
        assert r.status_code == 403
        forged = {"vmweb-session-host1": "forged-token"}
        r = s.post(
            url(grid, 0, "/action/destroy"),
            data={"cluster": "keep1", "csrf": "guess"},
            cookies=forged,
            timeout=10,
        )
        assert r.status_code == 403
        assert grid.client(0).call("GetCluster", "keep1")["state"] != "destroying"
    finally:
        grid.client(0).call("DestroyCluster", "keep1")


def test_another_users_cluster_is_neither_shown_nor_touched(grid, browser):
    """Bob's pages do not list alice's cluster, and his own valid form aimed at it is refused with a message."""
    d = browser
    grid.client(0).call("CreateCluster", "alices", "lab", "alice", 1)
    try:
        d.delete_all_cookies()
        login(d, grid, 1, "bob")
        assert not css(d, "article[data-cluster='alices']")
        assert "alices" not in d.page_source
        state = requests.get(url(grid, 1, "/state.json"), cookies=session_cookies(d), timeout=10).json()
        assert not any("alices" in k for k in state["cells"])
        # Bob's own session and CSRF token, in a form aimed at alice's cluster.
        d.execute_script("""var f = document.createElement('form');
            f.method = 'post'; f.action = '/action/destroy';
            [['csrf', document.querySelector('input[name=csrf]').value], ['cluster', 'alices'],
             ['back', '/owner']].forEach(function (kv) {
              var i = document.createElement('input'); i.type = 'hidden'; i.name = kv[0]; i.value = kv[1];
              f.appendChild(i); });
            document.body.appendChild(f); f.submit();""")
        wait_for(d, lambda d: flashes(d), "a message about the refused destroy")
        assert any("'bob' may not" in f and "'alices'" in f for f in flashes(d)), flashes(d)
        assert grid.client(0).call("GetCluster", "alices")["state"] != "destroying"
        d.get(url(grid, 1, "/dom"))
        assert "alices" not in css(d, "#dom-xml")[0].text
        d.get(url(grid, 1, "/hosts"))
        assert "alices" not in css(d, "main")[0].text
        assert "VMs of other users" in css(d, "main")[0].text
    finally:
        grid.client(0).call("DestroyCluster", "alices")


def test_form_without_its_csrf_token_is_refused(grid, browser):
    """A logged-in user's form posted without its CSRF token, with a wrong one, or from another origin changes nothing."""
    d = browser
    grid.client(0).call("CreateCluster", "csrf1", "lab", "alice", 1)
    try:
        d.delete_all_cookies()
        login(d, grid, 0, "alice")
        cookies = session_cookies(d)
        token = css(d, "form[action='/action/destroy'] input[name=csrf]")[0].get_attribute("value")
        target = url(grid, 0, "/action/destroy")
        cases = [
            ({"cluster": "csrf1"}, {}),
            ({"cluster": "csrf1", "csrf": "x" * len(token)}, {}),
            ({"cluster": "csrf1", "csrf": token}, {"Origin": "http://evil.example"}),
        ]
        for data, headers in cases:
            r = requests.post(
                target, data=data, cookies=cookies, headers=headers, allow_redirects=False, timeout=10
            )
            assert r.status_code == 403, (data, headers, r.status_code)
        # The browser itself, with the token field removed from the page's form:
        d.execute_script("""document.querySelectorAll("article[data-cluster='csrf1'] form[action='/action/destroy'] "
                            + "input[name=csrf]").forEach(function (e) { e.remove(); });""")
        css(d, "article[data-cluster='csrf1'] form[action='/action/destroy'] button")[0].click()
        wait_for(
            d, lambda d: "security token" in d.find_element("tag name", "main").text, "the CSRF refusal page"
        )
        shot(d, "csrf-refused")
        assert grid.client(0).call("GetCluster", "csrf1")["state"] != "destroying"
    finally:
        grid.client(0).call("DestroyCluster", "csrf1")


HOSTILE = '<img src=x onerror="window.vmwebXss=1"><script>window.vmwebXss=2</script>'


def test_html_in_names_is_shown_escaped(grid, browser):
    """Markup typed as a cluster name, a user name and a login name comes back as visible text and never runs."""
    d = browser
    d.delete_all_cookies()
    login(d, grid, 0, *ADMIN)
    submit(d, "form[action='/action/create']", name=HOSTILE, template="lab", count=1)
    # Each wait is for that refusal's own words with the text itself, literally: a looser wait can
    # be met by the page being replaced, and a read after it can see neither page.
    wait_for(
        d,
        lambda d: any(HOSTILE in f and "cluster" in f for f in flashes(d)),
        "the refusal of a cluster named with markup, showing the name as text",
    )
    submit(d, "form[action='/action/user/create']", name=HOSTILE, password="long-enough-pw")
    wait_for(
        d,
        lambda d: any(HOSTILE in f and "user name" in f for f in flashes(d)),
        "the refusal of a user named with markup, showing the name as text",
    )
    assert not css(d, "#flashes img") and not css(d, "#flashes script")
    shot(d, "escaped-names")
    # A tampered form: an owner name with markup (the page only offers real accounts).
    token = css(d, "form[action='/action/create'] input[name=csrf]")[0].get_attribute("value")
    r = requests.post(
        url(grid, 0, "/action/create"),
        cookies=session_cookies(d),
        data={"csrf": token, "name": "ok1", "template": "lab", "owner": HOSTILE, "count": "1"},
        timeout=10,
    )
    assert r.status_code == 200 and "&lt;img src=x" in r.text and HOSTILE not in r.text
    d.get(url(grid, 0, "/owner"))
    # The login form gives the name back as the input's value, not as markup.
    d.delete_all_cookies()
    login(d, grid, 0, '"><script>window.vmwebXss=3</script>', "wrong-password")
    assert css(d, "#login-name")[0].get_attribute("value") == '"><script>window.vmwebXss=3</script>'
    assert d.execute_script("return window.vmwebXss") is None
    assert grid.client(0).call("ListClusters", None) in ([], None)


def test_non_admin_gets_no_settings(grid, browser):
    """A user's settings page is refused (403), the settings action too, and the setting stays as it was."""
    d = browser
    d.delete_all_cookies()
    login(d, grid, 0, "alice")
    assert "Settings" not in [a.text for a in css(d, "nav a")]
    r = requests.get(url(grid, 0, "/settings"), cookies=session_cookies(d), timeout=10)
    assert r.status_code == 403 and "for admins" in r.text
    d.get(url(grid, 0, "/settings"))
    assert "for admins" in css(d, "main")[0].text
    shot(d, "settings-refused")
    d.get(url(grid, 0, "/owner"))
    token = css(d, "form[action='/action/create'] input[name=csrf]")[0].get_attribute("value")
    r = requests.post(
        url(grid, 0, "/action/setting"),
        cookies=session_cookies(d),
        data={"csrf": token, "key": "placement", "value": "pack", "back": "/owner"},
        timeout=10,
    )
    assert r.status_code == 200 and "changing system settings is for admins" in r.text
    assert {s["key"]: s["value"] for s in grid.client(0).call("GetSettings")}["placement"] == "spread"


def test_no_password_reaches_a_log(grid):
    """After all of the above, neither daemon's log holds a password or a hash."""
    for daemon in grid.daemons:
        log = daemon.log()
        for secret in (ADMIN[1], password_of("alice"), password_of("bob"), "scrypt$"):
            assert secret not in log, (daemon.log_path, secret)


# -- over TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_grid(tmp_path_factory):
    """Two vmwebd processes serving their pages over https with their grid certificates."""
    g = Grid(tmp_path_factory.mktemp("webgrid-tls"), 2, api_tls="grid")
    try:
        wait_until(
            lambda: all(
                set(g.liveness(i).values()) == {"alive"} and len(g.liveness(i)) == 2 for i in range(2)
            ),
            30,
            "two TLS hosts to see each other alive",
        )
        create_users(g.client(0), ("alice",), quota=6)
        yield g
    finally:
        g.close()


@pytest.fixture(scope="module")
def tls_browser(tls_grid):
    """A headless Chromium that trusts the TLS grid's CA the way a user's browser would: the CA is
    an authority in the NSS database of the browser's home (no flag to ignore certificate errors)."""
    certutil = shutil.which("certutil")
    if certutil is None:
        pytest.fail(
            "certutil is needed to make Chromium trust the test CA (Debian's libnss3-tools; "
            "scripts/bootstrap.sh installs it)"
        )
    home = tempfile.mkdtemp(prefix="vmweb-chromium-home-")
    nssdb = Path(home) / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    for args in (
        ["-N", "--empty-password"],
        ["-A", "-t", "C,,", "-n", "vmweb test grid CA", "-i", str(tls_grid.ca)],
    ):
        subprocess.run([certutil, "-d", f"sql:{nssdb}", *args], check=True, capture_output=True, timeout=30)
    driver = _chromium(str(Path(home) / "profile"), env={**os.environ, "HOME": home})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(home, ignore_errors=True)


def test_login_and_pages_over_https(tls_grid, tls_browser):
    """Over https, with the grid CA trusted: alice logs in, her session cookie is Secure and
    HttpOnly, the host view links the other host by its https URL, and her actions work."""
    d = tls_browser
    base = [tls_grid.daemons[i].url for i in range(2)]
    assert all(b.startswith("https://") for b in base)
    d.get(base[0] + "/login")
    assert css(d, "#login-name"), d.page_source[:300]  # the page itself, not a certificate warning
    css(d, "#login-name")[0].send_keys("alice")
    css(d, "#login-password")[0].send_keys(password_of("alice"))
    css(d, "#login-submit")[0].click()
    wait_for(d, lambda d: d.current_url == base[0] + "/owner", "the owner view over https")
    assert css(d, ".who .user")[0].text == "alice"
    cookie = next(c for c in d.get_cookies() if c["name"] == "vmweb-session-host1")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie
    # A form posted over https passes the CSRF and Origin checks and reaches the grid.
    submit(d, "form[action='/action/create']", name="tls1", template="lab", count=1)
    wait_for(d, lambda d: all_running(d, "tls1", 1), "tls1's VM running on the https page")
    shot(d, "owner-view-https")
    d.get(base[0] + "/hosts")
    wait_for(d, lambda d: len(css(d, "article.host")) == 2, "both hosts on the https host view")
    links = [a.get_attribute("href") for a in css(d, "article.host .host-head a")]
    assert links == [base[1] + "/hosts"], links
    css(d, "article.host .host-head a")[0].click()
    wait_for(d, lambda d: d.current_url == base[1] + "/login", "host2's https login page (another session)")
    assert css(d, "#login-name")
    assert tls_grid.client(0).call("DestroyCluster", "tls1") == "destroyed"
