#!/usr/bin/env bash
# Prepare a fresh Debian machine (as root) for anywan: Debian packages the lab
# and the interop tests use, and a virtualenv in .venv with anywan installed
# editable. Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
    python3 python3-venv ca-certificates
    iproute2 nftables iperf3 tcpdump tshark iputils-ping curl
    strongswan-charon strongswan-swanctl libcharon-extra-plugins
    # deploy/: Prometheus for the lab and promtool; docker-compose validates the cluster file
    prometheus docker-compose
    # bench/profile.py: per-stage CPU profile of a worker (perf record / perf stat)
    linux-perf
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to apt-get install: ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.anywan-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "setup: pip install -e '.[test,bench]'"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test,bench]'
    echo "$want" > "$stamp"
fi
