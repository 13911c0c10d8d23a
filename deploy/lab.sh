#!/usr/bin/env bash
# The one command that sets up and runs anywan on this host: `deploy/lab.sh up`.
# `down` and `status` are its twins. Run as root on Debian.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
cmd=${1:-up}
shift || true
bash deploy/setup.sh
export PATH="$here/.venv/bin:$PATH"
if [[ -f deploy/lab.py ]]; then
    exec python -m deploy.lab "$cmd" "$@"
fi
# Until the netns lab lands, `up` demonstrates the codecs on this machine.
case $cmd in
    up) exec python -m deploy.demo "$@" ;;
    down | status) echo "lab: nothing running (the netns lab is not built yet)" ;;
    *) echo "usage: deploy/lab.sh up|down|status" >&2; exit 2 ;;
esac
