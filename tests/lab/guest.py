"""A tiny real guest for the real-host tier: a Debian kernel and a busybox initramfs.

The kernel comes from Debian's ``linux-image-6.1.0-N-amd64`` package, fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed); only ``vmlinuz`` and the
nine virtio modules are kept, plus the uncompressed ELF ``vmlinux`` taken out of ``vmlinuz``, which
QEMU boots through its PVH entry (first serial line after ~4 s under TCG instead of ~12 s). The initramfs (about 1.3 MB) is written here in Python as a gzipped
``newc`` cpio archive: the static busybox, the modules and an ``/init`` script that

1. mounts proc, sys and dev and loads the virtio modules;
2. prints ``VMWEB-GUEST-UP name=<vmweb.name>`` on the serial console (``console=ttyS0``);
3. with ``guestip=A.B.C.D/NN`` on the kernel command line, puts that address on eth0
   (``VMWEB-NET-UP ip=...``);
4. with ``vmweb.token=<hex>``, writes 4 MiB of ``yes <token>`` (the token and a newline, repeated)
   to ``/dev/vda`` at byte offset 64 MiB, syncs and prints
   ``VMWEB-DISK-WRITTEN token=<token> bytes=<n>``;
5. prints ``VMWEB-TICK <n>`` every second forever, n from 1 (a reboot would start again at 1).

Everything is cached in ``<repo>/.cache/guest``; :func:`build_guest` is idempotent and safe to call
from several processes at once (a file lock).
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from . import CACHE

#: Load order matters: each needs the ones before it.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
           "failover", "net_failover", "virtio_net", "virtio_blk")

#: Where the guest writes its pattern, and how much.
PATTERN_OFFSET = 64 * 1024 * 1024
PATTERN_BYTES = 4 * 1024 * 1024

BUSYBOX = Path("/bin/busybox")

INIT = r"""#!/bin/sh
# vmweb lab guest: see tests/lab/guest.py
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# Kernel messages on the console would cut into our lines.
echo 1 > /proc/sys/kernel/printk
NAME=; TOKEN=; GUESTIP=
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmweb.name=*) NAME="${a#vmweb.name=}" ;;
    vmweb.token=*) TOKEN="${a#vmweb.token=}" ;;
    guestip=*) GUESTIP="${a#guestip=}" ;;
  esac
done
for m in @MODULES@; do
  insmod "/lib/modules/$m.ko" || echo "VMWEB-GUEST-WARN insmod $m failed"
done
echo "VMWEB-GUEST-UP name=$NAME"
ip link set lo up
if [ -n "$GUESTIP" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  ip addr add "$GUESTIP" dev eth0 && ip link set eth0 up && echo "VMWEB-NET-UP ip=$GUESTIP"
fi
if [ -n "$TOKEN" ]; then
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  if [ -b /dev/vda ]; then
    yes "$TOKEN" | head -c @BYTES@ > /tmp/pattern
    n=$(wc -c < /tmp/pattern)
    dd if=/tmp/pattern of=/dev/vda bs=65536 seek=@SEEK@ conv=notrunc 2>/dev/null
    sync
    want=$(md5sum < /tmp/pattern)
    got=$(dd if=/dev/vda bs=65536 skip=@SEEK@ count=$((n / 65536)) 2>/dev/null | md5sum)
    rm -f /tmp/pattern
    if [ "$want" = "$got" ]; then
      echo "VMWEB-DISK-WRITTEN token=$TOKEN bytes=$n"
    else
      echo "VMWEB-DISK-MISMATCH token=$TOKEN bytes=$n"
    fi
  else
    echo "VMWEB-DISK-MISSING"
  fi
fi
n=1
while true; do
  echo "VMWEB-TICK $n"
  n=$((n+1))
  sleep 1
done
""".replace("@MODULES@", " ".join(MODULES)).replace("@BYTES@", str(PATTERN_BYTES)) \
   .replace("@SEEK@", str(PATTERN_OFFSET // 65536))

#: Bumped with any change to what goes into the initramfs (the init text is hashed too).
LAYOUT = 1


@dataclass(frozen=True)
class GuestArtifacts:
    kernel: Path
    initrd: Path


def pattern(token: str, size: int = PATTERN_BYTES) -> bytes:
    """The bytes the guest writes at :data:`PATTERN_OFFSET` for ``token``."""
    unit = (token + "\n").encode()
    return (unit * (size // len(unit) + 1))[:size]


def _run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run(argv, **kw)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({e.returncode}): {e.stderr.strip()}") from e


def _kernel_packages() -> list[str]:
    """The installable ``linux-image-6.1.0-N-amd64`` names, newest ABI first."""
    def search():
        out = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"]).stdout
        names = [line.split(" ", 1)[0] for line in out.splitlines() if line.strip()]
        return sorted(names, key=lambda n: int(n.split("-")[3]), reverse=True)

    names = search()
    if not names:   # apt's lists were never fetched on this machine
        _run(["apt-get", "update", "-qq"])
        names = search()
    if not names:
        raise RuntimeError("apt-cache knows no linux-image-6.1.0-*-amd64 package")
    return names


def _fetch_kernel(dest: Path) -> str:
    """Downloads and unpacks the newest kernel package; keeps vmlinuz and the modules in dest."""
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp = Path(tmp)
        errors = []
        for name in _kernel_packages()[:3]:
            r = subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", name],
                               cwd=tmp, capture_output=True, text=True)
            if r.returncode == 0:
                break
            errors.append(f"{name}: {r.stderr.strip()[-300:]}")
        else:
            raise RuntimeError("apt-get download of a kernel failed: " + "; ".join(errors))
        deb = next(tmp.glob("*.deb"))
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        (modules_out := dest / "modules").mkdir(exist_ok=True)
        tree = next((root / "lib" / "modules").iterdir())
        for m in MODULES:
            found = [p for p in tree.rglob(m + ".ko*") if p.name.split(".ko")[0] == m]
            if not found:
                raise RuntimeError(f"{name} has no module {m}")
            src = found[0]
            data = src.read_bytes()
            if src.name.endswith(".ko.xz"):
                data = lzma.decompress(data)
            elif src.name.endswith(".ko.zst"):
                data = _run(["zstd", "-dc", str(src)], text=False).stdout
            (modules_out / (m + ".ko")).write_bytes(data)
        shutil.copyfile(vmlinuz, dest / "vmlinuz")
        return name


class _Cpio:
    """A ``newc`` cpio archive, written in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(namez), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + namez)
        self.buf.write(b"\0" * (-(110 + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, 0o040755)

    def file(self, name, data: bytes, perm=0o644):
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name, target: str):
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _initramfs(modules_dir: Path) -> bytes:
    c = _Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root",
              "etc", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    for m in MODULES:
        c.file(f"lib/modules/{m}.ko", (modules_dir / f"{m}.ko").read_bytes())
    c.file("init", INIT.encode(), 0o755)
    return gzip.compress(c.finish(), compresslevel=6, mtime=0)


def _is_static(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    data = path.read_bytes()[:4096]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off:off + 4], "little") == 3:     # PT_INTERP
            return False
    return True


def _pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, if it is xz-compressed and has a PVH entry
    (Xen ELF note 18). QEMU boots such an ELF directly: under TCG that skips the ~8 s the
    bzImage spends decompressing itself before its first message."""
    at = bzimage.find(b"\xfd7zXZ\x00")
    if at < 0:
        return None
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[at:])
    except lzma.LZMAError:
        return None
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return None
    u16 = lambda o: int.from_bytes(elf[o:o + 2], "little")      # noqa: E731
    u32 = lambda o: int.from_bytes(elf[o:o + 4], "little")      # noqa: E731
    u64 = lambda o: int.from_bytes(elf[o:o + 8], "little")      # noqa: E731
    phoff, phentsize, phnum = u64(0x20), u16(0x36), u16(0x38)
    for i in range(phnum):
        ph = phoff + i * phentsize
        if u32(ph) != 4:                                        # PT_NOTE
            continue
        off, end = u64(ph + 8), u64(ph + 8) + u64(ph + 32)
        while off + 12 <= end:
            namesz, descsz, ntype = u32(off), u32(off + 4), u32(off + 8)
            name = elf[off + 12:off + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:                  # XEN_ELFNOTE_PHYS32_ENTRY
                return elf
            off += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return None


def build_guest(cache_dir: Path | None = None) -> GuestArtifacts:
    """The guest's kernel and initramfs, built once and cached (idempotent, process-safe)."""
    cache_dir = Path(cache_dir) if cache_dir else CACHE / "guest"
    cache_dir.mkdir(parents=True, exist_ok=True)
    kernel, initrd, stamp = cache_dir / "vmlinuz", cache_dir / "initrd.img", cache_dir / "guest.json"
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is missing or not static: install busybox-static")
    want = hashlib.sha256(f"{LAYOUT}\n{INIT}".encode() + BUSYBOX.read_bytes()).hexdigest()[:16]
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            have = json.loads(stamp.read_text())
        except (OSError, ValueError):
            have = {}
        modules = cache_dir / "modules"
        if not (kernel.exists() and all((modules / f"{m}.ko").exists() for m in MODULES)):
            have = {"kernel_package": _fetch_kernel(cache_dir)}
        if "kernel" not in have:
            elf = _pvh_vmlinux(kernel.read_bytes())
            have["kernel"] = "vmlinux" if elf else "vmlinuz"
            if elf:
                (cache_dir / "vmlinux.tmp").write_bytes(elf)
                os.replace(cache_dir / "vmlinux.tmp", cache_dir / "vmlinux")
        if have.get("initrd") != want or not initrd.exists():
            tmp = initrd.with_suffix(".tmp")
            tmp.write_bytes(_initramfs(modules))
            os.replace(tmp, initrd)
            have["initrd"] = want
        stamp.write_text(json.dumps(have, indent=1) + "\n")
    boot = cache_dir / have["kernel"]
    return GuestArtifacts(kernel=boot if boot.exists() else kernel, initrd=initrd)


def make_base_image(path: Path, size_mib: int, fill: str = "zero") -> Path:
    """A qcow2 base image of ``size_mib`` MiB. ``fill="random"`` writes random bytes over all of it
    (so a full-disk copy really moves that many bytes); ``"zero"`` leaves it empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fill == "zero":
        _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"])
    elif fill == "random":
        raw = path.with_name(path.name + ".raw.tmp")
        try:
            with open(raw, "wb") as f:
                for _ in range(size_mib):
                    f.write(os.urandom(1024 * 1024))
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
        finally:
            raw.unlink(missing_ok=True)
    else:
        raise ValueError(f"fill must be 'zero' or 'random', not {fill!r}")
    return path


def guest_domain_xml(name: str, kernel: Path | str, initrd: Path | str, disk_path: str,
                     serial_log: str, bridge: str | None = None, mem_mib: int = 128,
                     cmdline_extra: str = "") -> str:
    """The domain: TCG (``type='qemu'``; the emulated /dev/kvm here hangs guests), a qemu64 CPU,
    direct kernel boot, one virtio qcow2 disk (vda), a virtio NIC on ``bridge`` if given, and the
    serial console written to ``serial_log`` (a path as the host sees it)."""
    E = etree.SubElement
    dom = etree.Element("domain", type="qemu")
    E(dom, "name").text = name
    E(dom, "memory", unit="MiB").text = str(mem_mib)
    E(dom, "vcpu").text = "1"
    os_ = E(dom, "os")
    E(os_, "type", arch="x86_64").text = "hvm"
    E(os_, "kernel").text = str(kernel)
    E(os_, "initrd").text = str(initrd)
    E(os_, "cmdline").text = " ".join(p for p in (f"console=ttyS0 quiet vmweb.name={name}",
                                                  cmdline_extra.strip()) if p)
    cpu = E(dom, "cpu", mode="custom", match="exact")
    E(cpu, "model", fallback="allow").text = "qemu64"
    E(dom, "clock", offset="utc")
    E(dom, "on_poweroff").text = "destroy"
    E(dom, "on_reboot").text = "restart"
    E(dom, "on_crash").text = "destroy"
    dev = E(dom, "devices")
    disk = E(dev, "disk", type="file", device="disk")
    E(disk, "driver", name="qemu", type="qcow2")
    E(disk, "source", file=str(disk_path))
    E(disk, "target", dev="vda", bus="virtio")
    if bridge:
        nic = E(dev, "interface", type="bridge")
        E(nic, "source", bridge=bridge)
        E(nic, "model", type="virtio")
    serial = E(dev, "serial", type="file")
    E(serial, "source", path=str(serial_log))
    E(serial, "target", port="0")
    E(dev, "memballoon", model="none")
    return etree.tostring(dom, pretty_print=True, encoding="unicode")


def read_serial(path: Path | str) -> list[str]:
    """The serial log's lines (empty while the file does not exist)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [line.rstrip("\r") for line in data.decode("utf-8", "replace").split("\n") if line.strip("\r")]


_TICK = re.compile(r"VMWEB-TICK (\d+)\s*$")


def ticks(lines: list[str]) -> list[int]:
    """The tick counters printed, in order."""
    return [int(m.group(1)) for line in lines if (m := _TICK.search(line))]
