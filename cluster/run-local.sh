#!/usr/bin/env bash
# `make run`: a 3-node local cluster with the city simulator feeding it.
# Shows the members and the ring, then the simulator's live status line (fixes go to all
# three nodes; each node forwards to the owner). Ctrl-C stops the simulator, then every
# node gracefully (each leaves the cluster and flushes its log before exiting).
set -euo pipefail
cd "$(dirname "$0")/.."
export LOCUS=${LOCUS:-./target/release/locus}
export DATA=${DATA:-./data}
NODES=${NODES:-3}
UDP_SIM=
trap '[ -n "$UDP_SIM" ] && kill "$UDP_SIM" 2>/dev/null; cluster/local.sh stop' EXIT
cluster/local.sh start "$NODES"
# Wait until every node routes by the same ring.
for _ in $(seq 1 100); do
  if "$LOCUS" admin members | grep -q "every ring member agrees" \
     && [ "$("$LOCUS" admin ring --json | grep -c '"name"')" -eq "$NODES" ]; then break; fi
  sleep 0.1
done
"$LOCUS" admin members
echo
"$LOCUS" admin ring
echo
TARGETS=$(for i in $(seq 1 "$NODES"); do printf 'http://127.0.0.1:%d,' $((7400 + 10 * (i - 1))); done)
echo "Live map: http://127.0.0.1:7480/map (any node's HTTP port; no auth on this local cluster)"
echo "Try in another terminal: $LOCUS admin lookup sim-42 | $LOCUS admin members | cluster/local.sh kill 3"
# 2,000 more drivers send compact UDP fixes (sessions, 40-60 byte datagrams) beside them.
"$LOCUS" sim --target "${TARGETS%,}" --udp --drivers 2000 --id-prefix udp- --riders-per-sec 0 \
  --queries-per-sec 0 > "$DATA/logs/sim-udp.log" 2>&1 &
UDP_SIM=$!
echo "Simulator: 10,000 drivers in a 12 km city, one fix per second each, Nearby queries. Ctrl-C to stop."
echo "UDP simulator: 2,000 more drivers over compact UDP fixes; its status in $DATA/logs/sim-udp.log"
"$LOCUS" sim --target "${TARGETS%,}" "$@" || true
