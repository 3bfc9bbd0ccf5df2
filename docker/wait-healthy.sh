#!/usr/bin/env bash
# Waits (up to 90 s) until every node container of the compose project is healthy.
set -euo pipefail
cd "$(dirname "$0")"
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-locus}
COMPOSE=${COMPOSE:-$(docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)}
for _ in $(seq 1 180); do
  ids=$($COMPOSE -f compose.yaml ps -q locus-1 locus-2 locus-3 2>/dev/null || true)
  n=0
  for id in $ids; do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null)" = healthy ] && n=$((n + 1))
  done
  [ "$n" -eq 3 ] && { echo "3 nodes healthy"; exit 0; }
  sleep 0.5
done
echo "the nodes did not all become healthy within 90 s:" >&2
$COMPOSE -f compose.yaml ps >&2
exit 1
