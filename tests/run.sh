#!/usr/bin/env bash
# The one test command: sets up what it needs (deploy/setup.sh), then lint,
# strict typing of the protocol cores, and the whole pytest suite.
# Extra arguments go to pytest (e.g. tests/run.sh -k esp -x).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash deploy/setup.sh
export PATH="$here/.venv/bin:$PATH"

# Sans-IO protocol cores: bytes and time in, bytes and events out.
MYPY_STRICT=(
    replication/records.py
    replication/clone.py
    dataplane/drops.py
)
for f in dataplane/esp.py dataplane/gre.py dataplane/udpencap.py dataplane/ip.py \
         dataplane/mss.py dataplane/replay.py dataplane/sad.py dataplane/routes.py \
         dataplane/selectors.py \
         control/ike; do
    [[ -e $f ]] && MYPY_STRICT+=("$f")
done

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict ${MYPY_STRICT[*]}"
mypy --strict "${MYPY_STRICT[@]}"
echo "== pytest"
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# 5 = no tests collected (a -k filter that matches nothing): not a failure.
if [[ $rc -eq 5 ]]; then rc=0; fi
exit $rc
