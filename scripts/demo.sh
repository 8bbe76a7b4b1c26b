#!/usr/bin/env bash
# The main job, end to end on this machine: start the daemon on a fresh data dir, submit the digits
# job (configs/digits-mlp.yml), run 100 simulated phones against it and follow the job's log until it
# finishes (watch the "FL Testing" lines climb). Stops the daemon at the end. The phones train through
# the job's on-device artifacts: a third with LiteRT (.tflite), a third with MNN (.mnn), a third with JAX.
#   DATA_DIR=... keeps the state somewhere else; DEVICES=... changes the fleet size;
#   BACKEND=tflite|mnn|jax|mixed picks the engine the phones train with (mixed).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA_DIR=${DATA_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/fedscaled-demo.XXXXXX")}
DEVICES=${DEVICES:-100}
BACKEND=${BACKEND:-mixed}
SOCKET="$DATA_DIR/control.sock"

"$BIN/fedscaled" start --data-dir "$DATA_DIR" --listen 127.0.0.1:0 &
DAEMON=$!
trap 'kill "$DAEMON" 2>/dev/null; wait "$DAEMON" 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do            # wait (at most 60 s) until the daemon has written run.json
  [ -f "$DATA_DIR/run.json" ] && break
  kill -0 "$DAEMON" || { echo "demo: the daemon exited" >&2; exit 1; }
  sleep 0.2
done
PORT=$("$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$DATA_DIR/run.json")
export FEDSCALED_SOCKET="$SOCKET"

"$BIN/fedscalectl" submit configs/digits-mlp.yml
TOKEN=$("$BIN/fedscalectl" status digits-mlp --json | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["enrollment_token"])')

"$BIN/fedscaled-device" simulate --server "http://127.0.0.1:$PORT" --job digits-mlp --token="$TOKEN" \
  --devices "$DEVICES" --dataset digits --alpha 0.5 --seed 1 --max-seconds 600 --backend "$BACKEND" \
  > "$DATA_DIR/simulator.log" 2>&1 &
SIM=$!
"$BIN/fedscalectl" logs digits-mlp -f          # returns when the job ends
wait "$SIM" || true
tail -n 1 "$DATA_DIR/simulator.log"
"$BIN/fedscalectl" status digits-mlp
echo "state kept in $DATA_DIR"
