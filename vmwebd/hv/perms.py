"""Files an unprivileged QEMU must open: who QEMU runs as, and what it can reach.

On a stock host libvirtd runs QEMU as an unprivileged account (Debian: ``libvirt-qemu``, from
``user``/``group`` in qemu.conf), and with ``dynamic_ownership = 1`` it gives that account the
files a domain names — the overlay, every image of its backing chain it finds in the qcow2
headers, the seed ISO, the kernel and initrd — for as long as the domain runs. It never changes a
*directory*: QEMU must be able to search every directory on the way to those files. So:

* the storage directory belongs to QEMU's group with mode ``0710`` (group search, no listing);
* the base images vmweb writes itself (added or fetched by content) are ``0640`` and QEMU's group,
  so QEMU reads them even where ``dynamic_ownership`` is off; seeds are ``0644`` already;
* every other directory on the path must already let QEMU search it: vmweb does not open up
  directories it does not own (the default storage directory is inside the state directory,
  which the systemd unit makes ``0711``). One that does not is an :class:`AccessDenied` naming
  the directory and the account, reported in the status of the VMs that cannot start.

The account comes from libvirt itself: its capabilities name the DAC security model's base label
for QEMU domains (``+UID:+GID``). A libvirt that runs QEMU as root, or has no DAC model (the test
driver), needs none of this. Everything here blocks on the filesystem: run it off the reactor.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from vmwebd import xmlsafe

#: Mode of the storage directory: its owner (root) everything, QEMU's group search only.
STORAGE_DIR_MODE = 0o710
#: Mode of a base image vmweb wrote: its owner reads and writes, QEMU's group reads.
IMAGE_MODE = 0o640


@dataclass(frozen=True)
class QemuAccount:
    """The user and group QEMU runs as, and the groups that user is in."""

    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    def describe(self) -> str:
        """``libvirt-qemu (uid 999, gid 995)``: how messages name the account."""
        return f"{self.user} (uid {self.uid}, gid {self.gid})"


class AccessDenied(Exception):
    """QEMU's account cannot open ``path``; ``reason`` says which permission is missing."""

    def __init__(self, path: str, account: QemuAccount, reason: str):
        self.path, self.account, self.reason = path, account, reason
        super().__init__(f"QEMU runs as {account.describe()} and cannot open {path}: {reason}")


def account_from_label(label: str) -> QemuAccount | None:
    """The account of a DAC base label ``+UID:+GID`` (or ``user:group``); None for root."""
    user, _, group = label.partition(":")
    uid = _id(user, lambda n: pwd.getpwnam(n).pw_uid)
    gid = _id(group, lambda n: grp.getgrnam(n).gr_gid)
    if uid is None or gid is None or uid == 0:
        return None
    groups = {gid}
    try:
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        pass  # a uid with no passwd entry here: QEMU gets its primary group only
    return QemuAccount(uid, gid, frozenset(groups))


def _id(text: str, by_name) -> int | None:
    text = text.strip()
    if text.startswith("+"):
        return int(text[1:]) if text[1:].isdigit() else None
    if text.isdigit():
        return int(text)
    try:
        return by_name(text)
    except KeyError:
        return None


def account_from_capabilities(caps_xml: str, virt_type: str = "qemu") -> QemuAccount | None:
    """The account QEMU domains of ``virt_type`` run as, from libvirt's capabilities XML; None
    when it reports no DAC model (the test driver) or runs QEMU as root."""
    root = etree.fromstring(caps_xml.encode(), xmlsafe.parser())
    for model in root.iterfind("host/secmodel"):
        if (model.findtext("model") or "").strip() != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") == virt_type and label.text:
                return account_from_label(label.text)
    return None


def _allows(st: os.stat_result, account: QemuAccount, bits: int) -> bool:
    """Whether the mode in ``st`` grants ``bits`` (a mask of the "other" class: 4 read, 1 search)
    to ``account``, as the kernel decides it: owner class, else group class, else others."""
    if st.st_uid == account.uid:
        return st.st_mode & (bits << 6) == bits << 6
    if st.st_gid in account.groups:
        return st.st_mode & (bits << 3) == bits << 3
    return st.st_mode & bits == bits


def _describe(path: Path, st: os.stat_result) -> str:
    return f"{path} ({stat.filemode(st.st_mode)} uid {st.st_uid} gid {st.st_gid})"


def check_reachable(path: str | os.PathLike, account: QemuAccount, read: bool = True) -> None:
    """Raises AccessDenied naming the first directory on the way to ``path`` that ``account``
    cannot search, or ``path`` itself when ``read`` and it cannot read it."""
    target = Path(os.path.abspath(path))
    for d in reversed(target.parents):
        st = os.stat(d)
        if not _allows(st, account, 1):
            raise AccessDenied(
                str(target), account, f"directory {_describe(d, st)} gives it no search permission"
            )
    if read:
        st = os.stat(target)
        if not _allows(st, account, 4):
            raise AccessDenied(
                str(target), account, f"the file {_describe(target, st)} gives it no read permission"
            )


def share_dir(directory: str | os.PathLike, account: QemuAccount) -> None:
    """Gives QEMU's group search permission on ``directory`` (made if missing), which keeps its
    owner and loses every permission for others: ``STORAGE_DIR_MODE``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    st = os.stat(d)
    if st.st_gid != account.gid:
        os.chown(d, -1, account.gid)
    if stat.S_IMODE(st.st_mode) != STORAGE_DIR_MODE:
        os.chmod(d, STORAGE_DIR_MODE)


def share_file(path: str | os.PathLike, account: QemuAccount) -> None:
    """Lets QEMU's group read the file at ``path`` (a base image vmweb wrote): ``IMAGE_MODE``.

    A file libvirt has given to QEMU's user meanwhile (``dynamic_ownership``) is left as it is."""
    st = os.stat(path)
    if st.st_uid == account.uid:
        return
    if st.st_gid != account.gid:
        os.chown(path, -1, account.gid)
    if stat.S_IMODE(st.st_mode) != IMAGE_MODE:
        os.chmod(path, IMAGE_MODE)


__all__ = [
    "AccessDenied",
    "IMAGE_MODE",
    "QemuAccount",
    "STORAGE_DIR_MODE",
    "account_from_capabilities",
    "account_from_label",
    "check_reachable",
    "share_dir",
    "share_file",
]
