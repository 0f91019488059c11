"""vmweb on a stock host: libvirtd runs QEMU as ``libvirt-qemu`` (the real-host tier; see tests/lab).

One libvirtd in network namespaces with the distribution's qemu.conf defaults for the account and
its DAC rules (``user``/``group`` libvirt-qemu, ``dynamic_ownership = 1``), and a vmwebd beside it
laid out as the systemd unit lays out a stock host: a state directory made with the unit's
``StateDirectoryMode=``, owned by root, holding the storage directory (base images, overlays,
seeds) and the consoles, the daemon's defaults. Checked: a cluster made with ``vmweb`` boots a
real guest whose QEMU runs as libvirt-qemu and reads its seed; the storage directory and the base
image are QEMU's group's, no more; and when a directory on the way is closed to QEMU, a new VM is
in error with a message naming the image file, the directory and the account, while the running
guest is untouched.

Skipped where real hosts cannot run (see lab.hosts.lab_available) or there is no libvirt-qemu.
"""

from __future__ import annotations

import configparser
import os
import pwd
import stat

import pytest

from lab import REPO, wait_for
from lab.fixtures import guest_artifacts, lab1_unprivileged  # noqa: F401  (fixtures)
from lab.guest import make_base_image, read_serial, seed_applied
from lab.hosts import _netns_pids
from lab.vmweb import Grid, console

#: The state directory as the host sees it (in its bind-mounted /var/lib/libvirt, so it is this
#: host's own), with the daemon's default storage and console directories inside it.
STATE = "/var/lib/libvirt/vmwebd"
STORAGE = f"{STATE}/images"
CONSOLE = f"{STATE}/console"

TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<template name="tiny" description="Real TCG guests of the lab">
  <network mode="isolated" pool="lab"/>
  <role name="node" count="rest" vcpus="1" memory-mib="128" image="tiny"/>
</template>
"""


def unit_setting(name: str, default: str) -> int:
    """An octal setting of the shipped unit (``StateDirectoryMode``, ``UMask``)."""
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str
    unit.read(REPO / "systemd" / "vmwebd.service")
    return int(unit["Service"].get(name, default), 8)


def qemu_uids(host) -> list[int]:
    """The real uid of every QEMU process on ``host``."""
    uids = []
    for pid in _netns_pids(host.netns):
        try:
            if "qemu-system" not in os.readlink(f"/proc/{pid}/exe"):
                continue
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue  # gone meanwhile
        uids += [int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")]
    return uids


@pytest.fixture
def grid(lab1_unprivileged, guest_artifacts, tmp_path):  # noqa: F811
    lab = lab1_unprivileged
    (h1,) = lab.hosts
    state = h1.host_path(STATE)
    # As systemd makes the unit's StateDirectory (root's, its mode whatever the umask), and runs
    # the daemon with the unit's UMask.
    state.mkdir(mode=0o700)
    os.chmod(state, unit_setting("StateDirectoryMode", "0755"))
    g = Grid(
        lab,
        tmp_path,
        {"tiny": TEMPLATE},
        umask=unit_setting("UMask", "0022"),
        state_dir=STATE,
        storage_dir=STORAGE,
        console_dir=CONSOLE,
    )
    try:
        yield lab, g, tmp_path
    finally:
        g.close()


@pytest.fixture
def reachable_artifacts(guest_artifacts):  # noqa: F811
    """The guest's kernel and initramfs where QEMU's account can read them: the cache under the
    repository may sit below a directory only root may enter (a checkout in a private temporary
    directory), as a stock host's files would not."""
    import shutil
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    where = Path(tempfile.mkdtemp(prefix="vmweb-guest-", dir="/var/tmp"))
    try:
        where.chmod(0o755)
        out = SimpleNamespace(kernel=where / "vmlinux", initrd=where / "initrd.img")
        for src, dst in ((guest_artifacts.kernel, out.kernel), (guest_artifacts.initrd, out.initrd)):
            shutil.copyfile(src, dst)
            dst.chmod(0o644)
        yield out
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.slow
def test_a_guest_boots_with_qemu_as_libvirt_qemu_from_the_stock_layout(grid, reachable_artifacts):
    """A cluster's guest boots and reads its seed from a state directory made as the unit makes
    it, its QEMU running as libvirt-qemu; a VM whose image QEMU cannot reach is in error naming
    the file, the directory and the account."""
    lab, g, tmp = grid
    (h1,) = lab.hosts
    qemu = pwd.getpwnam("libvirt-qemu")
    base = tmp / "tiny-base.qcow2"
    make_base_image(base, 128)
    img, _ = g.vmweb(
        h1,
        "image",
        "add",
        "tiny",
        str(base),
        "--kernel",
        str(reachable_artifacts.kernel),
        "--initrd",
        str(reachable_artifacts.initrd),
        "--cmdline",
        "console=ttyS0 quiet",
    )
    assert img["hosts"] == ["h1"]

    c, r = g.vmweb(
        h1, "cluster", "create", "up", "--template", "tiny", "--owner", "admin", "--count", "1", check=False
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{g.logs()}"
    (vm,) = c["vms"]
    assert vm["state"] == "running", vm
    log = console(h1, f"up/{vm['name']}", CONSOLE)
    wait_for(
        lambda: any(line.startswith("VMWEB-GUEST-UP") for line in read_serial(log)), 90, "the guest to boot"
    )
    applied = wait_for(lambda: seed_applied(read_serial(log)), 90, "the guest to read its seed")
    assert applied["ip"].split("/")[0] == vm["ip"], applied
    uids = qemu_uids(h1)
    assert uids and set(uids) == {qemu.pw_uid}, uids

    # No more than QEMU needs: the storage directory is searchable by its group only, the base
    # image readable by its group (or given to its user by libvirt while a guest runs).
    st = os.stat(h1.host_path(STORAGE))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o710, 0, qemu.pw_gid)
    image = h1.host_path(f"{STORAGE}/tiny-{img['sha256'][:12]}.qcow2")  # its content name
    st = os.stat(image)
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)
    assert st.st_gid == qemu.pw_gid or st.st_uid == qemu.pw_uid, (st.st_uid, st.st_gid)

    # The bad case: the state directory closed to QEMU (as the unit made it before it let QEMU
    # through). A new VM is in error, saying what and for whom; the running guest goes on.
    os.chmod(h1.host_path(STATE), 0o700)
    c2, r2 = g.vmweb(
        h1, "cluster", "create", "shut", "--template", "tiny", "--owner", "admin", "--count", "1", check=False
    )
    assert r2.returncode == 3, f"{r2.stdout}\n{r2.stderr}"
    (bad,) = c2["vms"]
    assert bad["state"] == "error", bad
    assert f"QEMU runs as libvirt-qemu (uid {qemu.pw_uid}, gid {qemu.pw_gid})" in bad["detail"], bad
    assert f"{STORAGE}/" in bad["detail"] and f"directory {STATE} (drwx------" in bad["detail"], bad
    assert "Traceback" not in r2.stderr
    assert "failed on host h1" in r2.stderr and "libvirt-qemu" in r2.stderr, r2.stderr
    shown, _ = g.vmweb(h1, "cluster", "show", "up")
    assert [v["state"] for v in shown["vms"]] == ["running"]
