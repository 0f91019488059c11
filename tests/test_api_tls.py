"""The user API over TLS (``listen/@api-tls``), with real ``vmwebd`` processes and real TLS.

One daemon serves its API with its grid certificate (``grid``), another with a certificate from
another CA given as files (``files``), a third plain HTTP on a non-loopback address (``off``):
zeep and the ``vmweb`` command line talk to them as users do.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import requests

from procs import ADMIN, REPO, Daemon, admin_client, child_env, free_port
from vmwebd.apitls import is_loopback
from vmwebd.client import ApiClient, ApiFault, ApiTlsError
from vmwebd.demo import write_host_config
from vmwebd.gossip import pki

pytestmark = pytest.mark.slow

CLI_TIMEOUT = 120.0


def _daemon(directory, api_tls: str, listen_host: str = "127.0.0.1", listen: str = "", **kw) -> Daemon:
    """A one-host daemon serving its API with ``api_tls``; its grid certificate (SAN 127.0.0.1)
    is in ``directory/pki``."""
    from procs import bootstrap_admin

    pki.init_ca(directory / "ca", grid_name="tls-test")
    pki.issue_host_cert(directory / "ca", "host1", directory / "pki", ["127.0.0.1"])
    api_port = free_port()
    cfg = write_host_config(
        directory,
        "host1",
        api_port,
        free_port(),
        8,
        16384,
        api_tls=api_tls,
        extra=f'<peers cert-dir="{directory / "pki"}" timing="local"/>',
        **kw,
    )
    if listen_host != "127.0.0.1" or listen:
        text = cfg.read_text().replace(f'api="127.0.0.1:{api_port}"', f'api="{listen_host}:{api_port}"')
        cfg.write_text(text.replace(f'api-tls="{api_tls}"', f'api-tls="{api_tls}" {listen}'))
    bootstrap_admin(directory / "state")
    return Daemon(cfg, api_port=api_port, scheme="http" if api_tls == "off" else "https")


@pytest.fixture(scope="module")
def grid_tls(tmp_path_factory):
    """A daemon serving its user API with its grid certificate."""
    d = _daemon(tmp_path_factory.mktemp("tls-grid"), "grid")
    try:
        d.start()
        d.ca = d.config.parent / "ca" / "ca.crt"
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA nobody here uses: its certificate is a wrong trust anchor for every daemon."""
    directory = tmp_path_factory.mktemp("other-ca")
    return pki.init_ca(directory, grid_name="someone-else").cert


def vmweb(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``vmweb ARGS`` as the test admin, to completion (bounded); VMWEB_CA only if given."""
    environment = child_env(VMWEB_USER=ADMIN[0], VMWEB_PASSWORD=ADMIN[1], **env)
    if "VMWEB_CA" not in env:
        environment.pop("VMWEB_CA", None)
    return subprocess.run(
        [sys.executable, "-m", "vmwebd.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO,
        env=environment,
    )


# -- api-tls="grid" ---------------------------------------------------------------------------------


def test_soap_over_https_with_the_grid_ca(grid_tls):
    """zeep trusting the grid CA calls the API over https; the WSDL and the host record say https."""
    client = admin_client(grid_tls.url, ca=grid_tls.ca)
    assert client.url.startswith("https://")
    assert {t["name"] for t in client.call("ListTemplates")} >= {"hpc", "lab"}
    assert [h["api"] for h in client.call("ListHosts")] == [grid_tls.url]
    wsdl = requests.get(grid_tls.url + "/soap?wsdl", verify=str(grid_tls.ca), timeout=10)
    assert f'location="{grid_tls.url}/soap"' in wsdl.text
    assert "plain HTTP" not in grid_tls.log()


def test_client_that_does_not_trust_the_ca_is_refused(grid_tls, other_ca):
    """Without the grid CA (system store, or another CA) the client stops at the certificate, with
    an error naming the host; the password is never sent."""
    for ca in (None, other_ca):
        with pytest.raises(ApiTlsError) as info:
            admin_client(grid_tls.url, ca=ca)
        e = info.value
        assert e.certificate and e.host == grid_tls.url
        assert str(e) == (
            f"cannot verify the TLS certificate of {grid_tls.url}: "
            "certificate verify failed: unable to get local issuer certificate"
        )
    assert "login refused" not in grid_tls.log() and "logged in" not in grid_tls.log()


def test_certificate_must_name_the_host_dialled(grid_tls):
    """The grid CA is trusted, but 'localhost' is not a name in the certificate (127.0.0.1 is)."""
    with pytest.raises(ApiTlsError) as info:
        admin_client(f"https://localhost:{grid_tls.api_port}", ca=grid_tls.ca)
    assert "Hostname mismatch" in str(info.value) and "localhost" in str(info.value)


def test_plain_http_to_the_tls_port_fails(grid_tls):
    """Plain HTTP on the TLS port gets no answer: no page, no WSDL, no SOAP."""
    for url in (f"http://{grid_tls.address}/soap?wsdl", f"http://{grid_tls.address}/login"):
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):
        admin_client(grid_tls.address)  # a bare host:port means http


def test_basic_auth_is_still_enforced_over_tls(grid_tls):
    """Over TLS a wrong password, or none, is Client.NotAuthorized (HTTP 401), as over HTTP."""
    for user, password in (("admin", "not-the-password"), (None, None)):
        client = ApiClient(grid_tls.url, user=user, password=password, ca=grid_tls.ca)
        with pytest.raises(ApiFault) as info:
            client.call("ListClusters", None)
        assert info.value.code == "Client.NotAuthorized"
    r = requests.post(
        grid_tls.url + "/soap",
        data=b"<x/>",
        verify=str(grid_tls.ca),
        timeout=10,
        headers={"Content-Type": "text/xml"},
    )
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")


def _cookie_header(response, name: str) -> str:
    found = [
        v for k, v in response.raw.headers.items() if k.lower() == "set-cookie" and v.startswith(name + "=")
    ]
    assert len(found) == 1, response.raw.headers
    return found[0]


def test_web_login_cookies_are_secure_over_tls(grid_tls):
    """The login form's cookie and the session cookie carry Secure (and HttpOnly, SameSite=Strict)
    when the pages are served over TLS; the session works."""
    s = requests.Session()
    s.trust_env = False  # $REQUESTS_CA_BUNDLE would replace the session's verify
    s.verify = str(grid_tls.ca)
    page = s.get(grid_tls.url + "/login", timeout=10)
    login_cookie = _cookie_header(page, "vmweb-login-host1")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = s.post(
        grid_tls.url + "/login",
        data={"name": ADMIN[0], "password": ADMIN[1], "csrf": token},
        allow_redirects=False,
        timeout=30,
    )
    assert (r.status_code, r.headers["Location"]) == (303, "/owner"), r.text[:500]
    session_cookie = _cookie_header(r, "vmweb-session-host1")
    for header in (login_cookie, session_cookie):
        flags = [f.strip().lower() for f in header.split(";")[1:]]
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags, header
    owner = s.get(grid_tls.url + "/owner", allow_redirects=False, timeout=10)
    assert owner.status_code == 200 and "admin" in owner.text
    # An Origin check that knows the scheme: the page's own https origin passes, http does not.
    token = re.search(r'name="csrf" value="([^"]+)"', owner.text).group(1)
    for origin, code in ((f"http://{grid_tls.address}", 403), (grid_tls.url, 303)):
        r = s.post(
            grid_tls.url + "/logout",
            data={"csrf": token},
            headers={"Origin": origin},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == code, (origin, r.status_code)


def test_cli_over_https(grid_tls, other_ca):
    """`vmweb --host https://… --ca FILE` works, as does VMWEB_CA; without the CA, or with another,
    it exits 2 with one line naming the host and saying what to do; http to the TLS port hints https."""
    ok = vmweb("--host", grid_tls.url, "--ca", str(grid_tls.ca), "templates")
    assert ok.returncode == 0 and "hpc" in ok.stdout, ok
    ok = vmweb("--host", grid_tls.url, "hosts", VMWEB_CA=str(grid_tls.ca))
    assert ok.returncode == 0 and grid_tls.url in ok.stdout, ok
    for extra in ([], ["--ca", str(other_ca)]):
        bad = vmweb("--host", grid_tls.url, *extra, "templates")
        assert bad.returncode == 2, bad
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.startswith(
            f"vmweb: cannot verify the TLS certificate of {grid_tls.url}: certificate verify failed"
        ), bad.stderr
        assert "--ca FILE or set VMWEB_CA" in bad.stderr
    plain = vmweb("--host", grid_tls.address, "templates")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert (
        f"cannot reach vmwebd at {grid_tls.address}" in plain.stderr and "https://HOST:PORT" in plain.stderr
    )
    missing = vmweb("--host", grid_tls.url, "--ca", str(grid_tls.ca) + ".nope", "templates")
    assert (
        missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    )
    wrong_scheme = vmweb("--host", "ftp://127.0.0.1:1", "templates")
    assert wrong_scheme.returncode == 2 and "https://host:port" in wrong_scheme.stderr


# -- api-tls="files" and "off" ----------------------------------------------------------------------


def test_files_mode_serves_the_admins_certificate(tmp_path):
    """api-tls="files": the certificate chain and key the admin gave (here from a 'public' CA
    with an intermediate-less chain file) is what clients see; the grid CA does not verify it."""
    public = pki.init_ca(tmp_path / "public-ca", grid_name="public")
    pki.issue_host_cert(public.directory, "www", tmp_path / "web", ["127.0.0.1"])
    chain = tmp_path / "web" / "chain.pem"
    chain.write_bytes((tmp_path / "web" / "host.crt").read_bytes() + public.cert.read_bytes())
    d = _daemon(
        tmp_path / "h", "files", listen=f'api-cert="{chain}" api-key="{tmp_path / "web" / "host.key"}"'
    )
    try:
        d.start()
        client = admin_client(d.url, ca=public.cert)
        assert client.call("ListHosts")[0]["api"] == d.url
        with pytest.raises(ApiTlsError):
            admin_client(d.url, ca=d.config.parent / "ca" / "ca.crt")
        ok = vmweb("--host", d.url, "--ca", str(public.cert), "templates")
        assert ok.returncode == 0, ok
    finally:
        d.close()


def test_plain_http_off_loopback_is_logged_as_a_warning(tmp_path):
    """api-tls="off" on a non-loopback address works, but the daemon warns in its log."""
    d = _daemon(tmp_path / "h", "off", listen_host="0.0.0.0")
    try:
        d.start()
        assert (
            f"the user API on 0.0.0.0:{d.api_port} is plain HTTP: passwords and session cookies "
            "cross the network in clear" in d.log()
        )
        assert admin_client(d.address).call("ListTemplates")
    finally:
        d.close()


def test_loopback_addresses():
    """Only loopback listen addresses count as safe for plain HTTP."""
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "host1.lab", "192.168.1.2"))
