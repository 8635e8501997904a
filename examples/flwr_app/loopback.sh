#!/usr/bin/env bash
# The same app against a real deployment on this machine: a SuperLink and two SuperNodes on
# loopback (insecure, for trying things out only), `flwr run` against them, then teardown.
# Run from anywhere with fedmf installed: bash examples/flwr_app/loopback.sh
set -euo pipefail
APP="$(cd "$(dirname "$0")" && pwd)"
WORK="$(mktemp -d)"
PORT="${PORT:-19093}"
export FLWR_HOME="$WORK/flwr_home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
# flwr run finds the SuperLink through a named connection in $FLWR_HOME/config.toml
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
insecure = true
TOML

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  # Flower detaches the ServerApp / ClientApp processes it spawns: stop those naming our port
  local pattern="127[.]0[.]0[.]1:($PORT|$((PORT + 1))|$((PORT + 2)))( |$)"
  pkill -f "$pattern" || true
  for _ in $(seq 1 20); do pgrep -f "$pattern" > /dev/null || break; sleep 0.5; done
  pkill -9 -f "$pattern" || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

flower-superlink --insecure --host 127.0.0.1 --port "$PORT" --database :flwr-in-memory: \
  --disable-runtime-dependency-installation > "$WORK/superlink.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do  # wait until the SuperLink listens
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.5
done
for i in 0 1; do
  # node-config is TOML: numbers bare, strings quoted (client-id="hospital-7")
  # each SuperNode serves its own API: one port each
  flower-supernode --insecure --superlink "127.0.0.1:$PORT" --host 127.0.0.1 \
    --port "$((PORT + 1 + i))" --node-config "partition-id=$i num-partitions=2" > "$WORK/supernode$i.log" 2>&1 &
  pids+=($!)
done

# 2 clients, one per round (2 cohorts): each trains every second round
flwr run "$APP" loopback --stream \
  --run-config "num-clients=2 rounds=4 result-file='$WORK/result.json'"
# flwr run exits 0 even when the ServerApp fails: check what the ServerApp wrote
for _ in $(seq 1 60); do [ -s "$WORK/result.json" ] && break; sleep 1; done
cat "$WORK/result.json"; echo
