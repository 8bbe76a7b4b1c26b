#!/usr/bin/env bash
# End-to-end smoke test of the single binary itself (not the venv): start, submit, a few simulated devices,
# finished rounds, status, stop. Prints the binary's size, cold start to ready and idle RSS.
#   bash scripts/smoke-binary.sh [BINARY]      (default /tmp/fedscaled-build/dist/fedscaled)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(readlink -f "${1:-/tmp/fedscaled-build/dist/fedscaled}")
[ -x "$BIN" ] || { echo "smoke: no binary at $BIN (build it with scripts/build-binary.sh)" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedscaled-smoke.XXXXXX")
DATA="$WORK/state"
ln -s "$BIN" "$WORK/fedscalectl"                 # the binary answers to the name it is invoked under
CTL=("$WORK/fedscalectl" --socket "$DATA/control.sock")
cat > "$WORK/job.yml" <<'JOB'
job_conf:
  - job_name: smoke
  - model: mlp
  - input_shape: 8 8 1
  - num_classes: 10
  - rounds: 3
  - num_participants: 3
  - overcommitment: 1.0
  - eval_interval: 3
  - test_participants: 3
  - batch_size: 16
  - test_bsz: 32
  - filter_less: 1
  - round_deadline: 60
  - selection_window: 0.5
  - checkin_wait: 5
  - retry_min: 0.2
  - retry_max: 1
JOB

started=$(date +%s.%N)
"$BIN" start --data-dir "$DATA" --listen 127.0.0.1:0 > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
trap 'kill "$DAEMON" 2>/dev/null; wait "$DAEMON" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do                        # at most 120 s (onefile unpacks itself first)
  [ -f "$DATA/run.json" ] && break
  kill -0 "$DAEMON" || { cat "$WORK/daemon.log" >&2; echo "smoke: the daemon exited" >&2; exit 1; }
  sleep 0.2
done
PORT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$DATA/run.json")
until python3 -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$PORT/healthz" 2>/dev/null; do sleep 0.05; done
ready=$(date +%s.%N)

"${CTL[@]}" submit "$WORK/job.yml"
TOKEN=$("${CTL[@]}" status smoke --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["enrollment_token"])')
"${CTL[@]}" logs smoke | grep -q "Backends served: jax, java, tflite" \
  || { echo "smoke: the binary serves no prebuilt artifacts" >&2; exit 1; }
sleep 2
PY_PID=$(pgrep -P "$DAEMON" | head -n 1 || true)  # onefile: Python runs as the bootloader's child
idle_kb=$(awk '/VmRSS/ {s += $2} END {print s}' "/proc/$DAEMON/status" ${PY_PID:+"/proc/$PY_PID/status"})
"$BIN" device simulate --server "http://127.0.0.1:$PORT" --job smoke --token="$TOKEN" --devices 4 \
  --dataset synthetic --max-seconds 180
"${CTL[@]}" status smoke
"${CTL[@]}" status smoke --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s["state"] == "finished" and s["round"] == 3, s
assert len(s["metrics"]) == 3 and s["metrics"][-1]["test_accuracy"] is not None, s["metrics"]'
"${CTL[@]}" stop smoke >/dev/null 2>&1 || true   # already finished: stop answers that it is over
kill -TERM "$DAEMON"
wait "$DAEMON"
trap - EXIT
python3 -c 'import sys; print(f"smoke: OK. binary {int(sys.argv[1]) / 2**20:.0f} MB, cold start to ready "
                               f"{float(sys.argv[3]) - float(sys.argv[2]):.2f} s, idle RSS {int(sys.argv[4]) / 1024:.0f} MB")' \
  "$(stat -c %s "$BIN")" "$started" "$ready" "$idle_kb"
rm -rf "$WORK"
