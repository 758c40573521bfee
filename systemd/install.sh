#!/usr/bin/env bash
# Install commsync as a systemd service on Debian/Ubuntu: a venv under /opt,
# config in /etc/commsync, secrets in /etc/commsync/credentials (handed to the
# service with LoadCredential=), the unit in /etc/systemd/system. Run as root
# from a checkout of the repository. Re-running upgrades in place and, if the
# service runs, restarts it (a clean stop: the batch in hand is checkpointed).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/commsync
etc=/etc/commsync
unit=/etc/systemd/system/commsync.service

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

# The service runs as a dynamic user: it reads its config (world-readable
# directory, file 0644 without secrets) and gets secrets only through the
# unit's LoadCredential= of the credentials directory, which stays root-only
# (and must exist: the service does not start without it).
install -d -m 0755 "$etc"
install -d -m 0700 "$etc/credentials"
if [ ! -e "$etc/commsync.yaml" ]; then
  install -m 0644 "$repo/config/example.yaml" "$etc/commsync.yaml"
  echo "install.sh: wrote $etc/commsync.yaml from the example; edit it before starting"
fi

install -m 0644 "$repo/systemd/commsync.service" "$unit"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$unit"
fi
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if systemctl is-active --quiet commsync; then
    systemctl restart commsync
    echo "install.sh: restarted commsync"
  fi
fi
cat <<EOF
install.sh: installed. Next:
  1. edit $etc/commsync.yaml (mailboxes, MongoDB)
  2. for each secret: install -m 0600 /dev/stdin $etc/credentials/NAME <<<'the-secret'
     and in the YAML: password_file: NAME (the service sees every file there;
     after adding or changing one later: systemctl restart commsync)
  3. $prefix/venv/bin/commsync check -c $etc/commsync.yaml
  4. systemctl enable --now commsync; systemctl status commsync; journalctl -u commsync -f
EOF
