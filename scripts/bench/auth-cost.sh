#!/usr/bin/env bash
# Counts the instructions the server spends on N registrations + N reads with auth on or off,
# under valgrind callgrind (docs/benchmarks.md Run 10). Usage: scripts/bench/auth-cost.sh on|off N
# Usage: authcost.sh MODE(on|off) N  -> prints total instructions (Ir) of the server process
set -euo pipefail
B=${SEXTANT:-target/release/sextant}; MODE=$1; N=$2; PORT=$((19000 + RANDOM % 500))
OUT=/tmp/cg.$MODE.$N.out; rm -f $OUT
valgrind --tool=callgrind --callgrind-out-file=$OUT $B serve --store memory \
  --http-addr 127.0.0.1:$PORT --grpc-addr 127.0.0.1:$((PORT+600)) --no-nacos --no-consul \
  --dns-addr 127.0.0.1:$((PORT+1200)) --auth $MODE --health-scanner false > /tmp/cg.$MODE.log 2>&1 &
PID=$!
for i in $(seq 1 600); do curl -s -o /dev/null 127.0.0.1:$PORT/healthz && break; sleep 0.2; done
TOKEN=""
if [ "$MODE" = on ]; then
  TOKEN=$(curl -s -XPOST 127.0.0.1:$PORT/v1/acl/bootstrap | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
fi
python3 "$(dirname "$0")/auth_cost_driver.py" $PORT $N $TOKEN
kill -TERM $PID; wait $PID || true
grep -E "^(summary|totals):" $OUT | head -1
