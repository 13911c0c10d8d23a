#!/usr/bin/env bash
# The one command that sets up and runs anywan on this host: `deploy/lab.sh up`.
# `status` and `down` are its twins. Run as root on Debian.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash deploy/setup.sh
export PATH="$here/.venv/bin:$PATH"
exec python -m deploy.lab "${@:-up}"
