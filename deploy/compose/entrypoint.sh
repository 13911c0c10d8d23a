#!/usr/bin/env bash
# Entrypoint of the anywan image in deploy/docker-compose.yml.
#
# Docker gives a container addresses and a default route toward the host; the
# anycast shape needs a little more, set from the environment before the role's
# command runs (the netns lab, deploy/lab.py, sets up the same with pyroute2):
#
#   ANYWAN_LOOPBACK   addresses to add on lo, e.g. the anycast 203.0.113.1/32
#                     on every worker (each worker owns the anycast address)
#   ANYWAN_ROUTES     ';'-separated `ip route replace` arguments, e.g. the
#                     edge's ECMP route "203.0.113.1/32 nexthop via A nexthop via B"
#   ANYWAN_NFT        an nftables ruleset file to load (a NAT in front of a site)
#
# These need NET_ADMIN; roles without them need nothing.
set -euo pipefail

for addr in ${ANYWAN_LOOPBACK:-}; do
    ip addr replace "$addr" dev lo
done
IFS=';' read -r -a routes <<< "${ANYWAN_ROUTES:-}"
for r in "${routes[@]}"; do
    r=$(echo "$r" | xargs)
    [[ -n $r ]] || continue
    # shellcheck disable=SC2086  # the route spec is a list of words on purpose
    ip route replace $r
done
if [[ -n ${ANYWAN_NFT:-} ]]; then
    nft -f "$ANYWAN_NFT"
fi
exec "$@"
