#!/usr/bin/env bash
# Makes the compose cluster's secrets once, in docker/secrets/ (git-ignored): the
# cluster key, the auth file (hashed tokens) and a token per client: the simulator
# (gateway, dispatch, reader), an operator (admin) and a reader (the map, apps).
# The nodes run as uid 10001: the files are theirs, readable by no one else.
set -euo pipefail
cd "$(dirname "$0")"
LOCUS=$(realpath "${LOCUS:-../target/release/locus}")
mkdir -p secrets
cd secrets
if [ ! -f cluster.key ]; then
  "$LOCUS" token cluster-key --out cluster.key
  : > tokens
  "$LOCUS" token new --roles gateway,dispatch,reader --name sim --auth-file tokens > sim.token
  "$LOCUS" token new --roles admin --name operator --auth-file tokens > admin.token
  "$LOCUS" token new --roles reader --name reader --auth-file tokens > reader.token
  chmod 0600 admin.token reader.token
  echo "made docker/secrets/: cluster.key, tokens (hashed), sim.token, admin.token, reader.token"
fi
# Bind-mounted secrets keep their owner and mode: the node's user must read them.
if [ "$(id -u)" = 0 ]; then
  chown 10001:10001 cluster.key tokens sim.token
  chmod 0400 cluster.key tokens sim.token
else
  chmod 0644 cluster.key tokens sim.token
  echo "not root: the secrets are world-readable so that uid 10001 in the containers can read them" >&2
fi
