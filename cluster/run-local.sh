#!/usr/bin/env bash
# Starts one Locus node on 127.0.0.1:7400 (HTTP 7480) and the city simulator feeding it.
# Ctrl-C stops the simulator, then the node (gracefully: it flushes before exiting).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCUS=${LOCUS:-./target/release/locus}
DATA=${DATA:-./data}
mkdir -p "$DATA"

"$LOCUS" node --node-name node-1 --grpc-addr 127.0.0.1:7400 --http-addr 127.0.0.1:7480 \
  --data-dir "$DATA/node-1" > "$DATA/node-1.log" 2>&1 &
NODE=$!
trap 'kill -TERM $NODE 2>/dev/null; wait $NODE 2>/dev/null; echo "node stopped (log: $DATA/node-1.log)"' EXIT

for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:7480/readyz >/dev/null 2>&1; then break; fi
  if ! kill -0 $NODE 2>/dev/null; then cat "$DATA/node-1.log"; exit 1; fi
  sleep 0.1
done
echo "Locus node-1 serving gRPC on 127.0.0.1:7400; metrics on http://127.0.0.1:7480/metrics"
echo "Simulator: 10,000 drivers in a 12 km city, one fix per second each, Nearby queries. Ctrl-C to stop."
"$LOCUS" sim --target http://127.0.0.1:7400 "$@" || true
