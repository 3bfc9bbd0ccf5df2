#!/usr/bin/env bash
# Starts and stops an N-node local Locus cluster on loopback.
#
#   cluster/local.sh start [N]   start N nodes (default 3): node-i serves gRPC on 7400+10(i-1),
#                                HTTP on 7480+10(i-1), gossip (UDP) on 7946+10(i-1), compact
#                                UDP fixes on 7402+10(i-1); node-1 starts
#                                the cluster, the others join it. Data in $DATA/node-i, logs in
#                                $DATA/logs/node-i.log, pids in $DATA/pids.
#   cluster/local.sh stop        SIGTERM every node (each leaves the cluster, flushes, exits)
#   cluster/local.sh status      `locus admin members` against node-1
#   cluster/local.sh kill I      kill -9 node-I (failure detection shows in `status`)
#   cluster/local.sh restart I   start node-I again with the same ports and data
#   cluster/local.sh add         start one more node (the next free index) joining the cluster
#   cluster/local.sh drain I     move every partition off node-I (it stays up), then report
#                                it safe to stop (`cluster/local.sh stop-node I`)
#   cluster/local.sh stop-node I SIGTERM node-I (leaves the cluster, exits)
#   cluster/local.sh partitions  `locus admin partitions --summary` against node-1
set -euo pipefail
cd "$(dirname "$0")/.."
LOCUS=${LOCUS:-./target/release/locus}
DATA=${DATA:-./data}
PIDS="$DATA/pids"
mkdir -p "$DATA/logs" "$PIDS"

grpc_port() { echo $((7400 + 10 * ($1 - 1))); }
http_port() { echo $((7480 + 10 * ($1 - 1))); }
gossip_port() { echo $((7946 + 10 * ($1 - 1))); }
udp_port() { echo $((7402 + 10 * ($1 - 1))); }

start_node() {
  local i=$1 join=()
  if [ "$i" -gt 1 ]; then join=(--join "127.0.0.1:$(gossip_port 1)"); fi
  "$LOCUS" node --node-name "node-$i" \
    --grpc-addr "127.0.0.1:$(grpc_port "$i")" --http-addr "127.0.0.1:$(http_port "$i")" \
    --gossip-addr "127.0.0.1:$(gossip_port "$i")" --udp-addr "127.0.0.1:$(udp_port "$i")" "${join[@]}" \
    --data-dir "$DATA/node-$i" >> "$DATA/logs/node-$i.log" 2>&1 &
  echo $! > "$PIDS/node-$i"
}

wait_ready() {
  local i=$1
  for _ in $(seq 1 200); do
    if curl -fsS "http://127.0.0.1:$(http_port "$i")/readyz" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$(cat "$PIDS/node-$i")" 2>/dev/null; then
      echo "node-$i exited; its log:" >&2; tail -20 "$DATA/logs/node-$i.log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "node-$i did not become ready (log: $DATA/logs/node-$i.log)" >&2
  return 1
}

case "${1:-}" in
  start)
    n=${2:-3}
    for i in $(seq 1 "$n"); do start_node "$i"; done
    for i in $(seq 1 "$n"); do wait_ready "$i"; done
    echo "$n nodes ready: gRPC 127.0.0.1:$(grpc_port 1)..$(grpc_port "$n"); logs in $DATA/logs"
    ;;
  stop)
    for f in "$PIDS"/node-*; do
      [ -e "$f" ] || continue
      kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    for f in "$PIDS"/node-*; do
      [ -e "$f" ] || continue
      while kill -0 "$(cat "$f")" 2>/dev/null; do sleep 0.1; done
      rm -f "$f"
    done
    echo "cluster stopped"
    ;;
  status)
    "$LOCUS" admin --addr "http://127.0.0.1:$(grpc_port "${2:-1}")" members
    ;;
  kill)
    kill -9 "$(cat "$PIDS/node-$2")" && rm -f "$PIDS/node-$2" && echo "node-$2 killed (-9)"
    ;;
  restart)
    start_node "$2" && wait_ready "$2" && echo "node-$2 back"
    ;;
  add)
    i=1
    while [ -e "$PIDS/node-$i" ] && kill -0 "$(cat "$PIDS/node-$i")" 2>/dev/null; do i=$((i + 1)); done
    start_node "$i" && wait_ready "$i" && echo "node-$i added: gRPC 127.0.0.1:$(grpc_port "$i")"
    ;;
  drain)
    addr=1
    if [ "$2" = 1 ]; then addr=2; fi
    "$LOCUS" admin --addr "http://127.0.0.1:$(grpc_port "$addr")" drain "node-$2"
    ;;
  stop-node)
    pid=$(cat "$PIDS/node-$2")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$PIDS/node-$2"
    echo "node-$2 stopped"
    ;;
  partitions)
    "$LOCUS" admin --addr "http://127.0.0.1:$(grpc_port "${2:-1}")" partitions --summary
    ;;
  *)
    sed -n '2,17p' "$0"; exit 2
    ;;
esac
