#!/usr/bin/env bash
# Install commsync as a systemd service on Debian/Ubuntu: a venv under /opt,
# config in /etc/commsync, the unit in /etc/systemd/system. Run as root from
# a checkout of the repository. Re-running upgrades in place.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/commsync
etc=/etc/commsync

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo bash systemd/install.sh)" >&2
  exit 1
fi

if ! python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi

python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade pip
"$prefix/venv/bin/pip" install --quiet "$repo"

install -d -m 0755 "$etc"
install -d -m 0700 "$etc/credentials"
if [ ! -e "$etc/commsync.yaml" ]; then
  install -m 0640 "$repo/config/example.yaml" "$etc/commsync.yaml"
  echo "install.sh: wrote $etc/commsync.yaml from the example; edit it before starting"
fi

install -m 0644 "$repo/systemd/commsync.service" /etc/systemd/system/commsync.service
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "install.sh: installed. Next: edit $etc/commsync.yaml, then"
echo "  $prefix/venv/bin/commsync check -c $etc/commsync.yaml"
echo "  systemctl enable --now commsync"
