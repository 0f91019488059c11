#!/usr/bin/env bash
# Installs what vmweb needs on a fresh Debian machine: the Debian packages (only when missing)
# and a virtualenv in .venv with the project, its hypervisor binding (the `daemon` extra) and its
# test tools. Safe to run again; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium + chromium-driver: the web pages are tested in a real headless browser (Selenium);
# libnss3-tools (certutil) makes that browser trust a test grid's CA for the pages over https.
DEB_PKGS=(libvirt0 libvirt-dev pkg-config gcc python3-dev chromium chromium-driver fonts-dejavu-core
          libnss3-tools)
# The real-host tier (tests/lab, tests/test_realhosts.py, bench/migrate.py): several libvirtd
# daemons in network namespaces running real TCG guests. Not libvirt-daemon-system: it pulls systemd.
# busybox-static is the guest's userland; iproute2 makes the namespaces, veths and bridges.
DEB_PKGS+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
           busybox-static iproute2 util-linux xz-utils iptables)
# nftables: the NAT and isolation rules of clusters' segments (vmwebd writes them with nft).
# cloud-init: the tests check every guest seed vmweb builds with the real tool (schema, net-convert).
DEB_PKGS+=(nftables cloud-init)
# iptables: libvirt applies firewall rules to every network it starts, isolated ones too.
# EXTRA_DEB_PKGS lets a tier ask for more (the real-QEMU tier needs libvirt-daemon and qemu).
read -r -a EXTRA <<<"${EXTRA_DEB_PKGS:-}"
missing=()
for p in "${DEB_PKGS[@]}" "${EXTRA[@]}"; do
  [ -n "$p" ] || continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# libvirtd resolves the user and the group libvirt-qemu (its built-in defaults) before it reads
# qemu.conf (which says root): make both.
if ! getent group libvirt-qemu >/dev/null || ! getent passwd libvirt-qemu >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  getent group libvirt-qemu >/dev/null || $SUDO groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null \
    || $SUDO useradd -r -M -d /var/lib/libvirt -s /usr/sbin/nologin -g libvirt-qemu libvirt-qemu
fi

# PYTHON: the interpreter the virtualenv is made from (default python3); VENV: where (default
# .venv). `make test-py313` uses both for its second virtualenv. The `lint` extra brings the
# gates of `make lint` (ruff, mypy, import-linter).
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp=$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[daemon,test]'
  "$VENV/bin/python" -m pip install -q -e '.[lint]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
