#!/usr/bin/env bash
# A Sextant cluster on this machine in one command: a throwaway etcd member and three Sextant
# nodes on one etcd prefix, all on loopback, with their addresses printed. Ctrl-C (or SIGTERM)
# stops everything it started and removes the temporary directory.
#
#   scripts/dev-cluster.sh            # builds target/debug/sextant first
#   SEXTANT_BIN=target/release/sextant BASE_PORT=28000 scripts/dev-cluster.sh
#
# Ports: etcd client BASE_PORT (default 18400) and peer BASE_PORT+1; node N (1-3) gets HTTP
# BASE_PORT+10*N, gRPC +1, DNS +2 and the Nacos HTTP API +3 (Nacos gRPC at that + 1000).
# Needs `etcd` on the PATH (Debian: apt-get install etcd-server; scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_PORT=${BASE_PORT:-18400}
ETCD=${ETCD:-etcd}
if ! command -v "$ETCD" >/dev/null 2>&1; then
  echo "etcd not found: apt-get install etcd-server (or set ETCD to an etcd binary)" >&2
  exit 1
fi
if [ -z "${SEXTANT_BIN:-}" ]; then
  cargo build -q -p sextant
  SEXTANT_BIN=target/debug/sextant
fi

dir=$(mktemp -d -t sextant-dev-cluster.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

client="http://127.0.0.1:$BASE_PORT"
peer="http://127.0.0.1:$((BASE_PORT + 1))"
env -u ETCD_NAME "$ETCD" --name dev --data-dir "$dir/etcd" \
  --listen-client-urls "$client" --advertise-client-urls "$client" \
  --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
  --initial-cluster "dev=$peer" >"$dir/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  if curl -fsS "$client/health" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -fsS "$client/health" >/dev/null || { echo "etcd did not start; see $dir/etcd.log" >&2; exit 1; }

for n in 1 2 3; do
  http=$((BASE_PORT + 10 * n))
  "$SEXTANT_BIN" serve --store etcd --etcd-endpoints "$client" --etcd-prefix /dev-cluster/ \
    --node-id "node$n" \
    --http-addr "127.0.0.1:$http" --grpc-addr "127.0.0.1:$((http + 1))" \
    --dns-addr "127.0.0.1:$((http + 2))" --nacos-http-addr "127.0.0.1:$((http + 3))" \
    --data-dir "$dir/node$n" >"$dir/node$n.log" 2>&1 &
  pids+=($!)
done
for n in 1 2 3; do
  http=$((BASE_PORT + 10 * n))
  for _ in $(seq 100); do
    if curl -fsS "http://127.0.0.1:$http/healthz" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$http/healthz" >/dev/null \
    || { echo "node$n did not start; its log:" >&2; tail -n 20 "$dir/node$n.log" >&2; exit 1; }
done

echo "etcd:  $client (data and logs in $dir)"
for n in 1 2 3; do
  http=$((BASE_PORT + 10 * n))
  echo "node$n: http://127.0.0.1:$http  grpc 127.0.0.1:$((http + 1))  log $dir/node$n.log"
done
echo
"$SEXTANT_BIN" --server "http://127.0.0.1:$((BASE_PORT + 10))" cluster
echo
echo "Any node takes writes, heartbeats, reads and watches (followers forward writes to the leader)."
echo "Try: $SEXTANT_BIN --server http://127.0.0.1:$((BASE_PORT + 10)) cluster"
echo "Ctrl-C stops the cluster."
wait "${pids[0]}"
