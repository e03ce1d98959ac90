#!/usr/bin/env bash
# Load test of `mame-deploy serve` on the lent GPU machine: vim_s merged (ratio 0.5) vs unmerged,
# closed-loop gRPC clients at concurrency 1/8/64 (one image per request) and 64 clients sending 8
# images each, then the offline `mame-deploy bench` at the batches the dynamic batcher formed.
#   bash docs/measurements/serving/run_device.sh torch-graph "$OUT"   # PyTorch CUDA-graph runner (~5 min)
#   bash docs/measurements/serving/run_device.sh onnx-cpu "$OUT"      # onnxruntime on the host CPU (~9 min)
#   MODEL=vim_digits LEVELS=1,8 DURATION=3 BIG_BATCH=4 BIG_LEVEL=8 MAX_BATCH=8 \
#       bash docs/measurements/serving/run_device.sh torch-cpu OUT   # the same steps on a CPU (dry run)
# On the device, first `source docs/measurements/serving/device_setup.sh BUNDLE "$OUT"` (PyTriton
# and its needs from .whl/serve, see docs/serving.md, "On the GPU machine"). Every wait is bounded;
# on a failure the tails of the serve and Triton logs are printed. Files in OUT (at most 8 come
# back from the device): MODE-run.log (all that is printed), MODE-serve.log, MODE-triton.log,
# MODE-levels.json, MODE-levels-b8.json, MODE-bench.json.
set -uo pipefail
MODE=${1:?torch-graph, torch-cpu or onnx-cpu}
OUT=${2:?output folder}
MODEL=${MODEL:-vim_s}
RATIO=${RATIO:-0.5}
LEVELS=${LEVELS:-1,8,64}
DURATION=${DURATION:-20}           # seconds per level and model
BIG_BATCH=${BIG_BATCH:-8}          # images per request of the extra level (0: no extra level)
BIG_LEVEL=${BIG_LEVEL:-64}         # clients of the extra level
MAX_BATCH=${MAX_BATCH:-64}
ITERS=${ITERS:-50}
READY_S=${READY_S:-240}            # longest wait for the models to load (CUDA graphs are captured first)
THREADS=${THREADS:-}
PORT=${PORT:-18000}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUN_LOG="$OUT/$MODE-run.log" SERVE_LOG="$OUT/$MODE-serve.log" TRITON_LOG="$OUT/$MODE-triton.log"
export PYTHONUNBUFFERED=1 COLUMNS=200
WORK=$(mktemp -d)
SERVER=
say() { echo "[$(date +%T)] $*" | tee -a "$RUN_LOG"; }
logs() {
  { echo "---- tail of $SERVE_LOG"; tail -n 40 "$SERVE_LOG"
    echo "---- tail of $TRITON_LOG"; tail -n 40 "$TRITON_LOG"; } 2>&1 | tee -a "$RUN_LOG"
}
stop_server() {
  [ -n "$SERVER" ] || return 0
  kill -TERM "$SERVER" 2>/dev/null
  for _ in $(seq 1 60); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
  if kill -0 "$SERVER" 2>/dev/null; then say "serve did not stop in 60 s: killing it"; kill -KILL "$SERVER"; fi
  wait "$SERVER" 2>/dev/null; local code=$?
  say "serve exited with $code"; SERVER=
}
trap 'stop_server; rm -rf "$WORK"' EXIT
fail() { say "FAILED: $*"; logs; exit 1; }
wait_ready() {
  local t0=$SECONDS
  while (( SECONDS - t0 < READY_S )); do
    grep -q '^ready' "$SERVE_LOG" && { say "ready after $((SECONDS - t0)) s"; return 0; }
    kill -0 "$SERVER" 2>/dev/null || fail "serve exited before its models were ready"
    sleep 2
  done
  fail "models not ready after $READY_S s"
}
# the batches the dynamic batcher formed (rounded) and, for the CUDA-graph runner, the powers of two
# it padded them to
formed_batches() {
  python3 - "$@" <<'EOF'
import json, sys
pow2 = sys.argv[1] == "pow2"
top = int(sys.argv[2])
sizes = set()
for path in sys.argv[3:]:
    try:
        rows = json.load(open(path))["rows"]
    except (OSError, ValueError, KeyError):
        continue
    for r in rows:
        if r.get("server_batch"):
            b = max(1, round(r["server_batch"]))
            sizes.add(b)
            if pow2:
                sizes.add(min(1 << (b - 1).bit_length(), top))
print(",".join(map(str, sorted(sizes))))
EOF
}

ports=(--http-port "$PORT" --grpc-port $((PORT + 1)) --no-metrics)
{ echo "mode $MODE, model $MODEL, ratio $RATIO, levels $LEVELS x ${DURATION}s, extra level ${BIG_LEVEL} clients x" \
       "batch ${BIG_BATCH}, max batch $MAX_BATCH; $(date -u +%FT%TZ); commit $(git rev-parse --short HEAD 2>/dev/null)"
  uptime; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true; } \
  | tee -a "$RUN_LOG"
threads=(); [ -n "$THREADS" ] && threads=(--threads "$THREADS")
case "$MODE" in
  torch-graph) run_args=(--device cuda --cuda-graph); pow2=pow2 ;;
  torch-cpu)   run_args=("${threads[@]}"); pow2=no ;;
  onnx-cpu)    run_args=("${threads[@]}"); pow2=no ;;
  *) fail "unknown mode $MODE (torch-graph, torch-cpu or onnx-cpu)" ;;
esac

if [ "$MODE" = onnx-cpu ]; then
  say "exporting $MODEL (ratio $RATIO and unmerged)"
  timeout 600 mame-deploy export "$MODEL" --ratio "$RATIO" --dynamic-batch -o "$WORK/merged.onnx" --no-engine \
      >> "$RUN_LOG" 2>&1 || fail "export of the merged model"
  timeout 600 mame-deploy export "$MODEL" --dynamic-batch -o "$WORK/unmerged.onnx" --no-engine \
      >> "$RUN_LOG" 2>&1 || fail "export of the unmerged model"
  serve_what=("$WORK/merged.onnx" "$WORK/unmerged.onnx")
else
  serve_what=("$MODEL" --ratio "$RATIO" --with-baseline)
fi
say "mame-deploy serve ${serve_what[*]} ${run_args[*]} --max-batch $MAX_BATCH"
: > "$SERVE_LOG"
mame-deploy serve "${serve_what[@]}" "${run_args[@]}" --max-batch "$MAX_BATCH" "${ports[@]}" \
    --triton-log "$TRITON_LOG" > "$SERVE_LOG" 2>&1 &
SERVER=$!
wait_ready

url=grpc://127.0.0.1:$((PORT + 1))
nlevels=$(tr ',' '\n' <<< "$LEVELS" | grep -c .)
limit=$(( nlevels * 2 * (DURATION + 15) + 60 ))   # every level of both models, warm-ups, the last requests
limit_big=$(( 2 * (DURATION + 15) + 60 ))
say "loadtest $url --concurrency $LEVELS --duration $DURATION"
timeout "$limit" mame-deploy loadtest "$url" --concurrency "$LEVELS" --duration "$DURATION" --requests 1000000 \
    --timeout 60 --json "$OUT/$MODE-levels.json" --force 2>&1 | tee -a "$RUN_LOG"
code=${PIPESTATUS[0]}
[ "$code" = 0 ] || { say "loadtest exited with $code (124: over its $limit s)"; logs; }
kill -0 "$SERVER" 2>/dev/null || fail "serve died during the load test"
if [ "$BIG_BATCH" != 0 ]; then
  say "loadtest $url --concurrency $BIG_LEVEL --batch $BIG_BATCH --duration $DURATION"
  timeout "$limit_big" mame-deploy loadtest "$url" --concurrency "$BIG_LEVEL" --batch "$BIG_BATCH" \
      --duration "$DURATION" --requests 1000000 --timeout 60 --json "$OUT/$MODE-levels-b8.json" --force 2>&1 \
      | tee -a "$RUN_LOG"
  code=${PIPESTATUS[0]}
  [ "$code" = 0 ] || { say "loadtest (batch $BIG_BATCH) exited with $code"; logs; }
fi
stop_server
grep -E "^stopped|Error|error" "$SERVE_LOG" | tail -n 5 | tee -a "$RUN_LOG"

BATCHES=$(formed_batches "$pow2" "$MAX_BATCH" "$OUT/$MODE-levels.json" "$OUT/$MODE-levels-b8.json")
[ -n "$BATCHES" ] || fail "no formed batch in the load-test reports"
note=""; [ "$pow2" = pow2 ] && note=", and the powers of two the CUDA graphs padded them to"
say "bench at batches $BATCHES (formed by the dynamic batcher$note)"
if [ "$MODE" = onnx-cpu ]; then
  bench_what=(--onnx "$WORK/merged.onnx" --onnx "$WORK/unmerged.onnx" --no-compare-torch)
else
  bench_what=(--torch "$MODEL" --ratio "$RATIO")
fi
timeout 240 mame-deploy bench "${bench_what[@]}" "${run_args[@]}" --batch-sizes "$BATCHES" --iters "$ITERS" \
    --json "$OUT/$MODE-bench.json" --force 2>&1 | tee -a "$RUN_LOG"
[ "${PIPESTATUS[0]}" = 0 ] || fail "bench"

# served merged/unmerged throughput ratio per level, beside bench's speed-up at the formed batch
python3 - "$OUT/$MODE-bench.json" "$OUT/$MODE-levels.json" "$OUT/$MODE-levels-b8.json" <<'EOF' | tee -a "$RUN_LOG"
import json, sys
bench = json.load(open(sys.argv[1]))["rows"]
offline = {r["batch"]: r.get("speedup") for r in bench if r.get("merged")}
print("| clients | images/request | served merged/unmerged | formed batch (merged, unmerged) "
      "| bench speed-up at that batch | served / bench |")
print("|---|---|---|---|---|---|")
for path in sys.argv[2:]:
    try:
        report = json.load(open(path))
    except (OSError, ValueError):
        continue
    rows = {(r["model"], r["concurrency"]): r for r in report["rows"]}
    for c in report["comparison"]:
        m, u = rows[(c["merged"], c["concurrency"])], rows[(c["unmerged"], c["concurrency"])]
        formed = [r.get("server_batch") for r in (m, u)]
        b = max(1, round(formed[0])) if formed[0] else None
        ref = offline.get(b) or (min(offline.items(), key=lambda kv: abs(kv[0] - b))[1] if offline and b else None)
        served = c["throughput_speedup"]
        ratio = served / ref if served and ref else None
        f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
        print(f"| {c['concurrency']} | {report.get('batch') or 1} | {f(served)}x | {f(formed[0], 1)}, {f(formed[1], 1)} "
              f"| {f(ref)}x (batch {b}) | {f(ratio)} |")
failed = sum(json.load(open(p))["failed"] for p in sys.argv[2:] if __import__("os").path.exists(p))
print(f"failed requests: {failed}")
EOF
uptime | tee -a "$RUN_LOG"
say "done"
