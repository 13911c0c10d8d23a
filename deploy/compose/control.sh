#!/usr/bin/env bash
# The control container of deploy/docker-compose.yml: first start creates the
# state (database, master key, CURVE keys for the bus: control's and one per
# worker node, ANYWAN_WORKER_NODES), then `anywan-control serve`. The state
# lives on the shared anywan-state volume, where workers read their keys.
set -euo pipefail
conf=/etc/anywan/config/anywan.toml
state=${ANYWAN_STATE_DIR:-/var/lib/anywan}
ac() { anywan-control --config "$conf" --state-dir "$state" "$@"; }
ac init
[[ -f $state/keys/control.key ]] || ac keygen
for node in ${ANYWAN_WORKER_NODES:-node1 node2}; do
    [[ -f $state/keys/workers/$node.key ]] || ac keygen --worker "$node"
done
exec anywan-control --config "$conf" --state-dir "$state" serve
