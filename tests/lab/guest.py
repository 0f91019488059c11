"""A tiny real guest for the real-host tier: a Debian kernel and a busybox initramfs.

The kernel comes from Debian's ``linux-image-6.1.0-N-amd64`` package, fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed). Kept from it: ``vmlinuz``,
the uncompressed ELF ``vmlinux`` taken out of it (QEMU boots it through its PVH entry: first serial
line after ~4 s under TCG instead of ~12 s), and the modules the guest loads: virtio (disk, NIC)
and what a CD-ROM needs on either bus QEMU may give it (IDE on ``pc``: ``ata_piix``/``ata_generic``;
SATA on ``q35``: ``ahci``) with ``sr_mod`` and ``isofs``. Their dependencies are read from each
module's own ``.modinfo`` section (``depends=``), since the package ships no ``modules.dep``, and
they are loaded in dependency order. The initramfs (a gzipped ``newc`` cpio archive, written here
in Python) holds the static busybox, those modules and an ``/init`` script that

1. mounts proc, sys and dev and loads the modules;
2. prints ``VMWEB-GUEST-UP name=<vmweb.name>`` on the serial console (``console=ttyS0``);
3. with ``guestip=A.B.C.D/NN`` on the kernel command line, puts that address on eth0
   (``VMWEB-NET-UP ip=...``); without it, the kernel's standard
   ``ip=<client>::<gw>:<netmask>:<hostname>:<dev>:off`` does the same (plus route and hostname);
4. with ``vmweb.token=<hex>``, writes 4 MiB of ``yes <token>`` (the token and a newline, repeated)
   to ``/dev/vda`` at byte offset 64 MiB, syncs and prints
   ``VMWEB-DISK-WRITTEN token=<token> bytes=<n>``;
5. prints ``VMWEB-TICK <n>`` every second forever, n from 1 (a reboot would start again at 1).

Beside 3-5, in the background, the guest configures itself from a cloud-init NoCloud seed: the
CD-ROM whose ISO volume label is ``cidata`` (``findfs``, else the label read off ``/dev/sr*``),
mounted read-only. From ``network-config`` (netplan v2 YAML) it takes the address/prefix, the
default gateway (``via:`` of a default route, or ``gateway4:``), the MTU and the MAC the interface
is matched by; from ``user-data`` (``#cloud-config``) ``hostname``, ``fqdn`` and the text of the
``write_files`` entry whose path is ``/etc/hosts``. It applies them (address, MTU, default route,
hostname, /etc/hosts) and prints ``VMWEB-SEED ip=A.B.C.D/P gw=G|none mtu=N host=FQDN hosts=K``
(K: the IPv4 entries of its /etc/hosts but loopback).
The YAML is read by two small awk programs (:data:`NETCFG_AWK`, :data:`USERDATA_AWK`); a test can
run them on the host with ``busybox awk`` (:func:`parse_seed`). Without a seed: ``VMWEB-NO-SEED``.

Then, once a second (a little more under load), it checks what it can reach, every check a
``ping -c1 -W1`` (all of a round at once) and one line on the console:

* ``VMWEB-REACH <name> ok rtt=<ms> t=<uptime>`` or ``... fail t=<uptime>`` for every entry of its
  /etc/hosts but itself and loopback, by name (the entry's last name, so the name is resolved
  through /etc/hosts);
* ``VMWEB-REACH-OUT <addr> ok|fail ...`` for ``vmweb.outside=<addr>`` (an address outside the
  cluster);
* ``VMWEB-REACH-PROBE <addr> ok|fail ...`` for each address of ``vmweb.probe=<a>[,<b>...]``
  (addresses it should, or should not, reach).

With ``vmweb.dense=1`` it also pings each /etc/hosts entry ten times a second, without end, and
prints only what goes wrong: ``VMWEB-GAP <name> lost=<replies missing> rtt_after=<ms of the next
one> t=<uptime>`` and ``VMWEB-SLOW <name> rtt=<ms> t=<uptime>`` for a reply after 50 ms or more
(a migration's pause shows up as one or the other).

Every ten rounds it reads the seed again, and when its /etc/hosts text changed it installs the new
one (``VMWEB-SEED-HOSTS hosts=K``). QEMU keeps the ISO it was started with open, so this sees a new
seed only if the CD-ROM's medium was changed.

``vmweb.bench=<client>[:<seconds>[:<pings>[:<rounds>]]]`` turns the guest into a bench node
instead (no reachability rounds): every one listens on TCP 5001 and discards what it receives; the
one whose hostname is ``<client>`` waits until every /etc/hosts peer answers, then ``<rounds>``
times, for each peer in turn, prints ``VMWEB-BENCH peer=<name> round=<r> rtt_min= rtt_avg=
rtt_max= loss=<%> bytes=<n> seconds=<s>`` (``<pings>`` pings 0.2 s apart; a TCP stream of zeros
through busybox ``nc``, sized from a 2 MiB trial to last about ``<seconds>``, timed in the guest
from the first byte sent to the receiver's close), and finally ``VMWEB-BENCH-DONE``; before and
after, ``VMWEB-BENCH-CLOCK <clocksource>`` (give such guests :func:`clock_args`).

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

#: The virtio modules (disk and NIC), in a working load order.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
)
#: What a CD-ROM needs: the IDE controller of QEMU's ``pc`` machine (PIIX; ata_generic as a
#: fallback), the SATA (AHCI) one of ``q35``, the SCSI CD-ROM driver and the ISO 9660 filesystem.
#: Their dependencies (libata, scsi_mod, cdrom, ...) are found in the modules themselves.
CDROM_MODULES = ("ata_piix", "ata_generic", "ahci", "sr_mod", "isofs")

#: Where the guest writes its pattern, and how much.
PATTERN_OFFSET = 64 * 1024 * 1024
PATTERN_BYTES = 4 * 1024 * 1024

#: The TCP port bench guests listen on.
BENCH_PORT = 5001

BUSYBOX = Path("/bin/busybox")

#: network-config (netplan v2 YAML as cloud-init reads it; v1's ``address``/``gateway`` too) ->
#: shell assignments ADDR (A.B.C.D/P), GW, MTU, MAC. Only values of the expected shape get out.
NETCFG_AWK = r"""
function unq(v) { gsub(/^["']|["']$/, "", v); return v }
{ sub(/\r$/, "") }
/^[ \t]*(- )?addresses:[ \t]*\[/ {
    v = $0; sub(/^[^[]*\[[ \t]*/, "", v); sub(/[ \t]*[],].*$/, "", v); v = unq(v)
    if (addr == "" && v ~ /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+\/[0-9]+$/) addr = v
    next
}
/^[ \t]*(- )?addresses:[ \t]*$/ { inaddr = 1; next }
inaddr && /^[ \t]*- / {
    v = unq($2)
    if (addr == "" && v ~ /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+\/[0-9]+$/) addr = v
    next
}
{ inaddr = 0 }
/^[ \t]*(- )?address:/ { v = unq($NF); if (addr == "" && v ~ /\//) addr = v }
/^[ \t]*(- )?to:/ { to = unq($NF) }
/^[ \t]*(- )?via:/ {
    v = unq($NF)
    if (gw == "" && (to == "" || to == "default" || to == "0.0.0.0/0")) gw = v
    to = ""
}
/^[ \t]*(gateway4|gateway):/ { if (gw == "") gw = unq($2) }
/^[ \t]*mtu:/ { if (mtu == "") mtu = unq($2) }
/^[ \t]*(macaddress|mac_address):/ { if (mac == "") mac = tolower(unq($2)) }
END {
    if (addr !~ /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+\/[0-9]+$/) addr = ""
    if (gw !~ /^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$/) gw = ""
    if (mtu !~ /^[0-9]+$/) mtu = ""
    if (mac !~ /^[0-9a-f][0-9a-f](:[0-9a-f][0-9a-f])+$/) mac = ""
    printf "ADDR=%s\nGW=%s\nMTU=%s\nMAC=%s\n", addr, gw, mtu, mac
}
"""

#: user-data (``#cloud-config`` YAML) -> shell assignments HOSTN, FQDN, HOSTS (1 when the text of
#: the ``write_files`` entry with path /etc/hosts was written to the file named by ``-v hosts=``).
#: The content is a literal block (``content: |``) or a one-line double-quoted string.
USERDATA_AWK = r"""
function unq(v) { gsub(/^["']|["']$/, "", v); return v }
function ind(s) { match(s, /^ */); return RLENGTH }
function item_end() {
    if (path == "/etc/hosts" && have) { printf "%s", content > hosts; close(hosts); wrote = 1 }
    path = ""; content = ""; have = 0
}
BEGIN { wfi = -1 }
{ sub(/\r$/, "") }
inblk {
    if ($0 ~ /^[ \t]*$/) { pending = pending "\n"; next }
    if (bind < 0) bind = ind($0)
    if (bind > kind && ind($0) >= bind) { content = content pending substr($0, bind + 1) "\n"; pending = ""; next }
    inblk = 0; have = 1
}
/^[A-Za-z_]/ { if (inwf) item_end(); inwf = 0 }
/^hostname:/ { hostn = unq($2) }
/^fqdn:/ { fqdn = unq($2) }
/^write_files:/ { inwf = 1; wfi = -1; next }
inwf && /^[ \t]*- / && (wfi < 0 || ind($0) == wfi) {
    if (wfi >= 0) item_end()
    wfi = ind($0)
    sub(/^[ \t]*- /, sprintf("%" (wfi + 2) "s", ""))
}
inwf && /^[ \t]*content:[ \t]*[|]/ { kind = ind($0); bind = -1; inblk = 1; content = ""; pending = ""; next }
inwf && /^[ \t]*content:[ \t]*"/ {
    v = $0; sub(/^[ \t]*content:[ \t]*"/, "", v); sub(/"[ \t]*$/, "", v)
    gsub(/\\n/, "\n", v); gsub(/\\t/, "\t", v); gsub(/\\"/, "\"", v)
    content = v; have = 1; next
}
inwf && /^[ \t]*path:/ { path = unq($2) }
END {
    if (inblk) have = 1
    if (inwf) item_end()
    if (hostn !~ /^[A-Za-z0-9][A-Za-z0-9.-]*$/) hostn = ""
    if (fqdn !~ /^[A-Za-z0-9][A-Za-z0-9.-]*$/) fqdn = ""
    printf "HOSTN=%s\nFQDN=%s\nHOSTS=%d\n", hostn, fqdn, wrote
}
"""

INIT = (
    r"""#!/bin/sh
# vmweb lab guest: see tests/lab/guest.py
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# Kernel messages on the console would cut into our lines.
echo 1 > /proc/sys/kernel/printk
NAME=; TOKEN=; GUESTIP=; KIP=; OUTSIDE=; PROBES=; BENCH=; DENSE=
for a in $(cat /proc/cmdline); do
  case "$a" in
    vmweb.name=*) NAME="${a#vmweb.name=}" ;;
    vmweb.token=*) TOKEN="${a#vmweb.token=}" ;;
    vmweb.outside=*) OUTSIDE="${a#vmweb.outside=}" ;;
    vmweb.probe=*) PROBES="$PROBES $(echo "${a#vmweb.probe=}" | tr ',' ' ')" ;;
    vmweb.bench=*) BENCH="${a#vmweb.bench=}" ;;
    vmweb.dense=1) DENSE=1 ;;
    guestip=*) GUESTIP="${a#guestip=}" ;;
    ip=*:*) KIP="${a#ip=}" ;;
  esac
done
for m in @MODULES@; do
  insmod "/lib/modules/$m.ko" || echo "VMWEB-GUEST-WARN insmod $m failed"
done
echo "VMWEB-GUEST-UP name=$NAME"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done

now() { cut -d' ' -f1 /proc/uptime; }

mask2prefix() {
  p=0
  for o in $(echo "$1" | tr . ' '); do
    while [ "$o" -gt 0 ]; do p=$((p + (o & 1))); o=$((o >> 1)); done
  done
  echo $p
}

# The kernel's ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>
cmdline_ip() {
  IFS=: read -r c _s g m h d _a <<EOF
$KIP
EOF
  [ -n "$c" ] || return 1
  [ -n "$d" ] || d=eth0
  p=24; [ -n "$m" ] && p=$(mask2prefix "$m")
  ip addr add "$c/$p" dev "$d" && ip link set "$d" up || return 1
  [ -n "$g" ] && ip route replace default via "$g" dev "$d"
  [ -n "$h" ] && hostname "$h"
  echo "VMWEB-NET-UP ip=$c/$p gw=${g:-none} source=cmdline"
}

iso_label() {
  dd if="$1" bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null | tr -d ' \000'
}

# The seed's device: waits up to $1 tenths of a second for a CD-ROM labelled cidata.
find_seed() {
  i=0
  while [ $i -le "$1" ]; do
    d=$(findfs LABEL=cidata 2>/dev/null)
    if [ -n "$d" ] && [ -b "$d" ]; then echo "$d"; return 0; fi
    for d in /dev/sr0 /dev/sr1 /dev/sr2 /dev/sr3; do
      [ -b "$d" ] || continue
      case "$(iso_label "$d")" in cidata|CIDATA) echo "$d"; return 0 ;; esac
    done
    sleep 0.2; i=$((i+2))
  done
  return 1
}

# Copies the seed's files to /run/seed and parses them there (the CD-ROM is not left mounted).
read_seed() {
  mkdir -p /mnt/seed
  mount -t iso9660 -o ro "$1" /mnt/seed 2>/dev/null || return 1
  rm -rf /run/seed.new; mkdir -p /run/seed.new
  for f in meta-data user-data network-config; do
    [ -f "/mnt/seed/$f" ] && cp "/mnt/seed/$f" /run/seed.new/
  done
  umount /mnt/seed
  rm -rf /run/seed; mv /run/seed.new /run/seed
  ADDR=; GW=; MTU=; MAC=; HOSTN=; FQDN=; HOSTS=0
  [ -f /run/seed/network-config ] && eval "$(awk -f /lib/vmweb/netcfg.awk /run/seed/network-config)"
  [ -f /run/seed/user-data ] && eval "$(awk -v hosts=/run/seed/hosts -f /lib/vmweb/userdata.awk /run/seed/user-data)"
  if [ -z "$HOSTN" ] && [ -f /run/seed/meta-data ]; then
    HOSTN=$(awk '/^local-hostname:/ { gsub(/["\047]/, "", $2); print $2 }' /run/seed/meta-data)
  fi
  [ -f /run/seed/network-config ] || [ -f /run/seed/user-data ]
}

apply_seed() {
  IF=eth0
  if [ -n "$MAC" ]; then
    IF=
    for d in /sys/class/net/*; do
      [ "$(cat "$d/address")" = "$MAC" ] && IF="${d##*/}"
    done
    if [ -z "$IF" ]; then echo "VMWEB-SEED-WARN no interface has MAC $MAC"; IF=eth0; fi
  fi
  [ -n "$MTU" ] && ip link set "$IF" mtu "$MTU"
  ip link set "$IF" up
  if [ -n "$ADDR" ] && ! ip -o -4 addr show dev "$IF" | grep -q " $ADDR "; then
    ip addr flush dev "$IF"
    ip addr add "$ADDR" dev "$IF"
  fi
  [ -n "$GW" ] && ip route replace default via "$GW" dev "$IF"
  [ -n "$HOSTN" ] && hostname "$HOSTN"
  n=0
  if [ "$HOSTS" = 1 ]; then cp /run/seed/hosts /etc/hosts; n=$(grep -v '^127\.' /etc/hosts | grep -c '^[0-9]'); fi
  MYIP="${ADDR%/*}"
  echo "VMWEB-SEED ip=${ADDR:-none} gw=${GW:-none} mtu=$(cat "/sys/class/net/$IF/mtu") host=${FQDN:-$HOSTN} hosts=$n"
}

# The last name of each /etc/hosts entry but ours and loopback.
targets() {
  [ -f /etc/hosts ] || return 0
  awk -v me="$(hostname)" -v myip="$MYIP" '
    /^[ \t]*#/ || NF < 2 { next }
    $1 ~ /:/ || $1 ~ /^127\./ || $1 == myip { next }
    { for (i = 2; i <= NF; i++) if ($i == me) next; print $NF }' /etc/hosts
}

probe() {
  t=$(now)
  rtt=$(ping -c1 -W1 "$2" 2>/dev/null | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | head -n1)
  if [ -n "$rtt" ]; then echo "$1 $2 ok rtt=$rtt t=$t"; else echo "$1 $2 fail t=$t"; fi
}

reread_seed() {
  old=$(md5sum < /etc/hosts 2>/dev/null)
  read_seed "$SEEDDEV" || return 0
  [ "$HOSTS" = 1 ] || return 0
  if [ "$(md5sum < /run/seed/hosts)" != "$old" ]; then
    cp /run/seed/hosts /etc/hosts
    echo "VMWEB-SEED-HOSTS hosts=$(grep -v '^127\.' /etc/hosts | grep -c '^[0-9]')"
  fi
}

# Pings $1 ten times a second for as long as the guest runs; prints only what goes wrong.
dense() {
  while true; do
    ping -i 0.1 -W 1 "$1" 2>/dev/null | awk -v n="$1" '
      function up(u) { getline u < "/proc/uptime"; close("/proc/uptime"); split(u, f, " "); return f[1] }
      /seq=/ {
        match($0, /seq=[0-9]+/); s = substr($0, RSTART + 4, RLENGTH - 4) + 0
        r = 0; if (match($0, /time=[0-9.]+/)) r = substr($0, RSTART + 5, RLENGTH - 5) + 0
        if (have && s > last + 1) {
          printf "VMWEB-GAP %s lost=%d rtt_after=%.1f t=%s\n", n, s - last - 1, r, up(); fflush()
        } else if (r >= 50) {
          printf "VMWEB-SLOW %s rtt=%.1f t=%s\n", n, r, up(); fflush()
        }
        if (!have || s > last) last = s
        have = 1
      }'
    sleep 1
  done
}

reach_loop() {
  n=0
  while true; do
    for x in $(targets); do probe VMWEB-REACH "$x" & done
    if [ -n "$DENSE" ]; then
      for x in $(targets); do
        # Not a child of this shell: the wait below is for this round's pings only.
        [ -e "/run/dense.$x" ] || { : > "/run/dense.$x"; (dense "$x" &); }
      done
    fi
    for x in $PROBES; do probe VMWEB-REACH-PROBE "$x" & done
    if [ -n "$OUTSIDE" ]; then probe VMWEB-REACH-OUT "$OUTSIDE" & fi
    # The pause runs beside the pings (one that fails takes its whole second): a round a second.
    sleep 1
    wait
    n=$((n+1))
    if [ -n "$SEEDDEV" ] && [ $((n % 10)) -eq 0 ]; then reread_seed; fi
  done
}

bench() {
  IFS=: read -r client secs pings rounds <<EOF
$BENCH
EOF
  [ -n "$secs" ] || secs=3
  [ -n "$pings" ] || pings=20
  [ -n "$rounds" ] || rounds=1
  printf '#!/bin/sh\nexec cat > /dev/null\n' > /bin/vmweb-sink; chmod +x /bin/vmweb-sink
  cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
  echo "VMWEB-BENCH-CLOCK $cs"
  # Without the TSC every time measured is in 4 ms steps: say why.
  [ "$cs" = tsc ] || dmesg | grep -i -E 'tsc|clocksource' | sed 's/^/VMWEB-BENCH-CLOCK-LOG /'
  nc -ll -p @PORT@ -e /bin/vmweb-sink &
  [ "$(hostname)" = "$client" ] || return 0
  peers=$(targets)
  for p in $peers; do
    i=0
    until ping -c1 -W1 "$p" >/dev/null 2>&1 || [ $i -ge 120 ]; do i=$((i+1)); done
  done
  sleep 2
  for r in $(seq "$rounds"); do
  for p in $peers; do
    s=$(ping -c "$pings" -i 0.2 -W 2 "$p" 2>&1)
    rt=$(echo "$s" | sed -n 's#.*= \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\) ms.*#rtt_min=\1 rtt_avg=\2 rtt_max=\3#p')
    loss=$(echo "$s" | sed -n 's/.* \([0-9]*\)% packet loss.*/\1/p')
    # A 2 MiB trial, then a stream sized to last about $secs seconds (at most 512 MiB).
    blocks=32
    for round in trial run; do
      t0=$(now)
      dd if=/dev/zero bs=65536 count=$blocks 2>/dev/null | timeout 120 nc "$p" @PORT@
      t1=$(now)
      el=$(awk -v a="$t0" -v b="$t1" 'BEGIN { d = b - a; if (d < 0.01) d = 0.01; print d }')
      [ $round = run ] && break
      blocks=$(awk -v b=$blocks -v d="$el" -v s="$secs" 'BEGIN { n = int(b * s / d); if (n < 32) n = 32; if (n > 8192) n = 8192; print n }')
    done
    echo "VMWEB-BENCH peer=$p round=$r ${rt:-rtt_avg=none} loss=${loss:-100} bytes=$((blocks * 65536)) seconds=$el"
  done
  done
  echo "VMWEB-BENCH-CLOCK $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
  echo "VMWEB-BENCH-DONE"
}

net_seed() {
  SEEDDEV=
  if SEEDDEV=$(find_seed 100) && read_seed "$SEEDDEV"; then
    apply_seed
  else
    SEEDDEV=
    echo "VMWEB-NO-SEED"
  fi
  if [ -n "$BENCH" ]; then bench; return; fi
  if [ -n "$SEEDDEV" ] || [ -n "$OUTSIDE" ] || [ -n "$PROBES" ]; then reach_loop; fi
}

MYIP=
if [ -n "$GUESTIP" ]; then
  ip addr add "$GUESTIP" dev eth0 && ip link set eth0 up && echo "VMWEB-NET-UP ip=$GUESTIP"
  MYIP="${GUESTIP%/*}"
elif [ -n "$KIP" ]; then
  cmdline_ip && MYIP="${KIP%%:*}"
fi
net_seed &

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
""".replace("@BYTES@", str(PATTERN_BYTES))
    .replace("@SEEK@", str(PATTERN_OFFSET // 65536))
    .replace("@PORT@", str(BENCH_PORT))
)


def init_script(modules: list[str] | tuple[str, ...]) -> str:
    """The ``/init`` of an initramfs that loads ``modules`` in that order."""
    return INIT.replace("@MODULES@", " ".join(modules))


#: Bumped with any change to what goes into the initramfs (the init text is hashed too).
LAYOUT = 2


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
    if not names:  # apt's lists were never fetched on this machine
        _run(["apt-get", "update", "-qq"])
        names = search()
    if not names:
        raise RuntimeError("apt-cache knows no linux-image-6.1.0-*-amd64 package")
    return names


def _modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value pairs of a kernel module's ``.modinfo`` ELF section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF module")
    u16 = lambda o: int.from_bytes(data[o : o + 2], "little")  # noqa: E731
    u32 = lambda o: int.from_bytes(data[o : o + 4], "little")  # noqa: E731
    u64 = lambda o: int.from_bytes(data[o : o + 8], "little")  # noqa: E731
    shoff, shentsize, shnum, shstrndx = u64(0x28), u16(0x3A), u16(0x3C), u16(0x3E)

    def section(i):
        base = shoff + i * shentsize
        return u32(base), u64(base + 0x18), u64(base + 0x20)  # name, offset, size

    _, strtab, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", strtab + name)
        if data[strtab + name : end] == b".modinfo":
            out: dict[str, list[str]] = {}
            for item in data[off : off + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    out.setdefault(key, []).append(value)
            return out
    return {}


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _run(["zstd", "-dc", str(path)], text=False).stdout
    return data


def load_order(wanted, depends) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies (``depends(name)``
    gives a module's direct dependencies); the order of ``wanted`` is kept where it can be."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(m):
        if m in order:
            return
        if m in visiting:
            raise RuntimeError(f"module dependency cycle through {m}")
        visiting.add(m)
        for d in depends(m):
            visit(d)
        visiting.discard(m)
        order.append(m)

    for m in wanted:
        visit(m)
    return order


def _fetch_kernel(dest: Path) -> dict:
    """Downloads and unpacks the newest kernel package; keeps vmlinuz and the modules the guest
    loads (with their dependencies) in dest. Returns what it kept: the package name and the
    modules' load order."""
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        tmp = Path(tmp)
        errors = []
        for name in _kernel_packages()[:3]:
            r = subprocess.run(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", name],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                break
            errors.append(f"{name}: {r.stderr.strip()[-300:]}")
        else:
            raise RuntimeError("apt-get download of a kernel failed: " + "; ".join(errors))
        deb = next(tmp.glob("*.deb"))
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        tree = next((root / "lib" / "modules").iterdir())
        # Module names use '_' where file names may have '-' (the kernel treats them alike).
        files = {p.name.split(".ko")[0].replace("-", "_"): p for p in tree.rglob("*.ko*")}
        datas: dict[str, bytes] = {}

        def depends(m):
            if m not in files:
                raise RuntimeError(f"{name} has no module {m}")
            if m not in datas:
                datas[m] = _read_module(files[m])
            deps = ",".join(_modinfo(datas[m]).get("depends", []))
            return [d.replace("-", "_") for d in deps.split(",") if d]

        order = load_order(MODULES + CDROM_MODULES, depends)
        (modules_out := dest / "modules").mkdir(exist_ok=True)
        for m in order:
            (modules_out / (m + ".ko")).write_bytes(datas[m])
        shutil.copyfile(vmlinuz, dest / "vmlinuz")
        return {"kernel_package": name, "modules": order}


class _Cpio:
    """A ``newc`` cpio archive, written in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        namez = name.encode() + b"\0"
        fields = [
            self.ino,
            mode,
            0,
            0,
            2 if mode & 0o040000 else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(namez),
            0,
        ]
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


def _initramfs(modules_dir: Path, modules: list[str]) -> bytes:
    c = _Cpio()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "etc",
        "lib",
        "lib/modules",
        "lib/vmweb",
        "mnt",
        "run",
    ):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    for m in modules:
        c.file(f"lib/modules/{m}.ko", (modules_dir / f"{m}.ko").read_bytes())
    c.file("lib/vmweb/netcfg.awk", NETCFG_AWK.encode())
    c.file("lib/vmweb/userdata.awk", USERDATA_AWK.encode())
    c.file("etc/hosts", b"127.0.0.1 localhost\n")
    c.file("init", init_script(modules).encode(), 0o755)
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
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
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
    u16 = lambda o: int.from_bytes(elf[o : o + 2], "little")  # noqa: E731
    u32 = lambda o: int.from_bytes(elf[o : o + 4], "little")  # noqa: E731
    u64 = lambda o: int.from_bytes(elf[o : o + 8], "little")  # noqa: E731
    phoff, phentsize, phnum = u64(0x20), u16(0x36), u16(0x38)
    for i in range(phnum):
        ph = phoff + i * phentsize
        if u32(ph) != 4:  # PT_NOTE
            continue
        off, end = u64(ph + 8), u64(ph + 8) + u64(ph + 32)
        while off + 12 <= end:
            namesz, descsz, ntype = u32(off), u32(off + 4), u32(off + 8)
            name = elf[off + 12 : off + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
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
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            have = json.loads(stamp.read_text())
        except (OSError, ValueError):
            have = {}
        modules = cache_dir / "modules"
        order = have.get("modules") or []
        if not (
            kernel.exists()
            and set(MODULES + CDROM_MODULES) <= set(order)
            and all((modules / f"{m}.ko").exists() for m in order)
        ):
            have = _fetch_kernel(cache_dir)
            order = have["modules"]
        if "kernel" not in have:
            elf = _pvh_vmlinux(kernel.read_bytes())
            have["kernel"] = "vmlinux" if elf else "vmlinuz"
            if elf:
                (cache_dir / "vmlinux.tmp").write_bytes(elf)
                os.replace(cache_dir / "vmlinux.tmp", cache_dir / "vmlinux")
        want = hashlib.sha256(
            f"{LAYOUT}\n{init_script(order)}\n{NETCFG_AWK}\n{USERDATA_AWK}".encode() + BUSYBOX.read_bytes()
        ).hexdigest()[:16]
        if have.get("initrd") != want or not initrd.exists():
            tmp = initrd.with_suffix(".tmp")
            tmp.write_bytes(_initramfs(modules, order))
            os.replace(tmp, initrd)
            have["initrd"] = want
        stamp.write_text(json.dumps(have, indent=1) + "\n")
    boot = cache_dir / have["kernel"]
    return GuestArtifacts(kernel=boot if boot.exists() else kernel, initrd=initrd)


def clock_args() -> str:
    """Kernel arguments that give the guest a precise clock: ``tsc_early_khz=`` set to this
    machine's TSC rate (what a TCG guest's TSC runs at) and ``tsc=reliable``; "" if the rate is
    not known here.

    libvirt starts these guests without ACPI, so they have no HPET or ACPI PM timer to measure
    their TSC against. When the PIT calibration fails too (it does when the host is busy, e.g.
    several guests booting at once) the kernel gives up the TSC; given the rate, it keeps it until
    its watchdog, comparing it with jiffies (which a descheduled TCG vCPU loses), calls it unstable.
    Either way it falls back to ``refined-jiffies``, and every time the guest measures (ping round
    trips, /proc/uptime) has a 4 ms granularity."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                khz = int(float(line.split(":", 1)[1]) * 1000)
                return f"tsc_early_khz={khz} tsc=reliable" if khz > 0 else ""
    except (OSError, ValueError):
        pass
    return ""


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


def guest_domain_xml(
    name: str,
    kernel: Path | str,
    initrd: Path | str,
    disk_path: str,
    serial_log: str,
    bridge: str | None = None,
    mem_mib: int = 128,
    cmdline_extra: str = "",
    seed_iso: str | None = None,
    cdrom_bus: str = "ide",
    mac: str | None = None,
    mtu: int = 0,
    machine: str | None = None,
) -> str:
    """The domain: TCG (``type='qemu'``; the emulated /dev/kvm here hangs guests), a qemu64 CPU,
    direct kernel boot, one virtio qcow2 disk (vda), a virtio NIC on ``bridge`` if given (with
    ``mac`` and ``mtu`` if given), a CD-ROM holding ``seed_iso`` if given (on ``cdrom_bus``: "ide"
    for the default ``pc`` machine, "sata" for ``machine="q35"``), and the serial console written
    to ``serial_log`` (a path as the host sees it)."""
    E = etree.SubElement
    dom = etree.Element("domain", type="qemu")
    E(dom, "name").text = name
    E(dom, "memory", unit="MiB").text = str(mem_mib)
    E(dom, "vcpu").text = "1"
    os_ = E(dom, "os")
    ostype = E(os_, "type", arch="x86_64")
    ostype.text = "hvm"
    if machine:
        ostype.set("machine", machine)
    E(os_, "kernel").text = str(kernel)
    E(os_, "initrd").text = str(initrd)
    E(os_, "cmdline").text = " ".join(
        p for p in (f"console=ttyS0 quiet vmweb.name={name}", cmdline_extra.strip()) if p
    )
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
    if seed_iso:
        cd = E(dev, "disk", type="file", device="cdrom")
        E(cd, "driver", name="qemu", type="raw")
        E(cd, "source", file=str(seed_iso))
        E(cd, "target", dev="hdc" if cdrom_bus == "ide" else "sdc", bus=cdrom_bus)
        E(cd, "readonly")
    if bridge:
        nic = E(dev, "interface", type="bridge")
        if mac:
            E(nic, "mac", address=mac)
        E(nic, "source", bridge=bridge)
        E(nic, "model", type="virtio")
        if mtu:
            E(nic, "mtu", size=str(mtu))
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


def make_seed_iso(path: Path | str, files: dict[str, str | bytes]) -> Path:
    """A NoCloud seed: an ISO 9660 image labelled ``cidata`` holding ``files`` (name -> text)
    under their own names in Rock Ridge and Joliet (for guests built here, without vmwebd)."""
    import pycdlib

    path = Path(path)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, data in sorted(files.items()):
        raw = data.encode() if isinstance(data, str) else data
        plain = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:30]
        iso.add_fp(io.BytesIO(raw), len(raw), f"/{plain}.;1", rr_name=name, joliet_path=f"/{name}")
    tmp = path.with_name(path.name + ".tmp")
    iso.write(str(tmp))
    iso.close()
    os.replace(tmp, path)
    return path


def parse_seed(files: dict[str, str | bytes]) -> dict[str, str]:
    """What the guest reads from seed ``files`` (name -> text), by running its own awk programs
    with busybox on this machine: ADDR, GW, MTU, MAC, HOSTN, FQDN, and ``hosts`` (the /etc/hosts
    text it would install, "" if none)."""
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, data in files.items():
            (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
        (tmp / "netcfg.awk").write_text(NETCFG_AWK)
        (tmp / "userdata.awk").write_text(USERDATA_AWK)
        runs = []
        if (tmp / "network-config").exists():
            runs.append([str(BUSYBOX), "awk", "-f", "netcfg.awk", "network-config"])
        if (tmp / "user-data").exists():
            runs.append([str(BUSYBOX), "awk", "-v", "hosts=hosts", "-f", "userdata.awk", "user-data"])
        for argv in runs:
            for line in _run(argv, cwd=tmp).stdout.splitlines():
                key, _, value = line.partition("=")
                out[key] = value
        out["hosts"] = (tmp / "hosts").read_text() if (tmp / "hosts").exists() else ""
    return out


_SEED = re.compile(r"VMWEB-SEED ip=(\S+) gw=(\S+) mtu=(\d+) host=(\S*)(?: hosts=(\d+))?")


def seed_applied(lines: list[str]) -> dict | None:
    """What the guest took from its seed (its last ``VMWEB-SEED`` line), or None."""
    found = None
    for line in lines:
        if m := _SEED.search(line):
            found = {
                "ip": m.group(1),
                "gw": None if m.group(2) == "none" else m.group(2),
                "mtu": int(m.group(3)),
                "host": m.group(4),
                "hosts": int(m.group(5) or 0),
            }
    return found


@dataclass(frozen=True)
class Reach:
    """One reachability check the guest printed."""

    kind: str  # "" (an /etc/hosts entry), "OUT" or "PROBE"
    target: str
    ok: bool
    rtt_ms: float | None
    t: float  # the guest's uptime when it sent the ping


_REACH = re.compile(r"VMWEB-REACH(?:-(OUT|PROBE))? (\S+) (ok|fail)(?: rtt=([\d.]+))? t=([\d.]+)")


def reaches(lines: list[str], target: str | None = None, kind: str = "") -> list[Reach]:
    """The guest's reachability checks of ``kind`` (of ``target`` if given), in order."""
    out = []
    for line in lines:
        m = _REACH.search(line)
        if m and (m.group(1) or "") == kind and (target is None or m.group(2) == target):
            out.append(
                Reach(
                    kind,
                    m.group(2),
                    m.group(3) == "ok",
                    float(m.group(4)) if m.group(4) else None,
                    float(m.group(5)),
                )
            )
    return out


_BENCH = re.compile(r"VMWEB-BENCH peer=(\S+) (.*)$")


def bench_results(lines: list[str]) -> list[dict]:
    """The bench client's measurements in order, each ``{"peer": name, "round", "rtt_min",
    "rtt_avg", "rtt_max" (ms), "loss" (%), "bytes", "seconds"}`` (a figure the guest could not
    take is absent)."""
    out = []
    for line in lines:
        if m := _BENCH.search(line):
            fields = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
            rec: dict = {k: float(v) for k, v in fields.items() if v != "none"}
            rec["peer"] = m.group(1)
            out.append(rec)
    return out


_GAP = re.compile(r"VMWEB-(GAP|SLOW) (\S+) (?:lost=(\d+) rtt_after=([\d.]+)|rtt=([\d.]+)) t=([\d.]+)")


def dense_events(lines: list[str], target: str | None = None) -> list[dict]:
    """What the guest's ten-a-second pings (``vmweb.dense=1``) saw go wrong, in order: each
    ``{"target", "lost" (replies missing), "rtt_ms" (of the reply after them, or of a slow one),
    "t" (uptime), "stall_ms"}``, ``stall_ms`` the time without a reply it implies (one interval,
    100 ms, per lost reply, plus the late reply's round trip)."""
    out = []
    for line in lines:
        m = _GAP.search(line)
        if not m or (target is not None and m.group(2) != target):
            continue
        lost = int(m.group(3) or 0)
        rtt = float(m.group(4) or m.group(5))
        out.append(
            {
                "target": m.group(2),
                "lost": lost,
                "rtt_ms": rtt,
                "t": float(m.group(6)),
                "stall_ms": lost * 100 + rtt,
            }
        )
    return out
