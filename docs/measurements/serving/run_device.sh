#!/usr/bin/env bash
# Load test on the lent GPU machine (NOT RUN YET): vim_s merged (ratio 0.5) vs unmerged under
# `mame-deploy serve`, beside the offline `mame-deploy bench` at the batch the dynamic batcher formed.
#   bash docs/measurements/serving/run_device.sh torch-graph "$OUT"   # PyTorch CUDA graph runner (~6 min)
#   bash docs/measurements/serving/run_device.sh onnx-cpu "$OUT"      # onnxruntime on the host CPU (~9 min)
# Needs PyTriton there first: see docs/serving.md, "On the GPU machine", for the wheels to carry
# (they exceed one call's 64 MiB, so they go in two calls) and the install lines.
set -euo pipefail
MODE=${1:?torch-graph or onnx-cpu}
OUT=${2:?output folder}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SERVER=
trap '[ -n "$SERVER" ] && kill -TERM "$SERVER" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
ports=(--http-port 18000 --grpc-port 18001 --metrics-port 18002)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/$MODE-gpu.txt" || true

wait_ready() {
  for _ in $(seq 1 300); do grep -q '^ready' "$1" && return 0; kill -0 "$SERVER" || return 1; sleep 1; done
  return 1
}

if [ "$MODE" = torch-graph ]; then
  mame-deploy serve vim_s --ratio 0.5 --device cuda --cuda-graph --with-baseline --max-batch 64 \
      "${ports[@]}" > "$OUT/$MODE-serve.log" 2>&1 &
  SERVER=$!
  wait_ready "$OUT/$MODE-serve.log"
  COLUMNS=200 mame-deploy loadtest grpc://127.0.0.1:18001 --concurrency 1,8,64 --duration 30 --timeout 60 \
      --json "$OUT/$MODE-levels.json" --force | tee "$OUT/$MODE-levels.txt"
  kill -TERM "$SERVER"; wait "$SERVER"; SERVER=
  BATCHES=$(python3 -c "
import json; rows = json.load(open('$OUT/$MODE-levels.json'))['rows']
print(','.join(sorted({str(max(1, round(r['server_batch']))) for r in rows if r['server_batch']}, key=int)))")
  COLUMNS=200 mame-deploy bench --torch vim_s --ratio 0.5 --device cuda --cuda-graph --batch-sizes "$BATCHES" \
      --iters 50 --json "$OUT/$MODE-bench.json" --force | tee "$OUT/$MODE-bench.txt"
else
  mame-deploy export vim_s --ratio 0.5 --dynamic-batch -o "$WORK/vim_s_r05.onnx" --no-engine > /dev/null
  mame-deploy export vim_s --dynamic-batch -o "$WORK/vim_s.onnx" --no-engine > /dev/null
  mame-deploy serve "$WORK/vim_s_r05.onnx" "$WORK/vim_s.onnx" --max-batch 16 "${ports[@]}" \
      > "$OUT/$MODE-serve.log" 2>&1 &
  SERVER=$!
  wait_ready "$OUT/$MODE-serve.log"
  COLUMNS=200 mame-deploy loadtest grpc://127.0.0.1:18001 --concurrency 1,8,64 --duration 60 --timeout 120 \
      --warmup 1 --json "$OUT/$MODE-levels.json" --force | tee "$OUT/$MODE-levels.txt"
  kill -TERM "$SERVER"; wait "$SERVER"; SERVER=
  BATCHES=$(python3 -c "
import json; rows = json.load(open('$OUT/$MODE-levels.json'))['rows']
print(','.join(sorted({str(max(1, round(r['server_batch']))) for r in rows if r['server_batch']}, key=int)))")
  COLUMNS=200 mame-deploy bench --onnx "$WORK/vim_s_r05.onnx" --onnx "$WORK/vim_s.onnx" --batch-sizes "$BATCHES" \
      --no-compare-torch --iters 10 --json "$OUT/$MODE-bench.json" --force | tee "$OUT/$MODE-bench.txt"
fi
