#!/usr/bin/env bash
# CPU load test of `mame-deploy serve` (onnxruntime runner), merged vs unmerged vim_digits, and
# `mame-deploy bench --onnx` at the batch the dynamic batcher formed. Writes into OUT (default: here).
# Usage: bash docs/measurements/serving/run_cpu.sh [OUT]     (about 8 minutes on 2 cores)
set -euo pipefail
OUT=${1:-$(dirname "$0")}
WORK=$(mktemp -d)
trap 'kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
mame-deploy export vim_digits --ratio 0.5 --dynamic-batch -o "$WORK/merged.onnx" --no-engine > /dev/null
mame-deploy export vim_digits --dynamic-batch -o "$WORK/unmerged.onnx" --no-engine > /dev/null
mame-deploy serve "$WORK/merged.onnx" "$WORK/unmerged.onnx" --http-port 18000 --grpc-port 18001 \
    --metrics-port 18002 --max-batch 32 > "$OUT/cpu_serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do grep -q '^ready' "$OUT/cpu_serve.log" && break; sleep 1; done
uptime > "$OUT/cpu_load_average.txt"
COLUMNS=160 mame-deploy loadtest http://127.0.0.1:18000 --concurrency 1,8,32 --duration 20 \
    --json "$OUT/cpu_levels.json" --force | tee "$OUT/cpu_levels.txt"
COLUMNS=160 mame-deploy loadtest http://127.0.0.1:18000 --concurrency 8 --duration 60 --requests 100000 \
    --json "$OUT/cpu_60s_c8.json" --force | tee "$OUT/cpu_60s_c8.txt"
uptime >> "$OUT/cpu_load_average.txt"
kill -TERM "$SERVER"; wait "$SERVER"; SERVER=
# bench at the batch sizes the batcher formed at concurrency 8 (rounded down and up)
BATCHES=$(python3 -c "
import json, math; rows = json.load(open('$OUT/cpu_60s_c8.json'))['rows']
print(','.join(sorted({str(max(1, math.floor(r['server_batch']))) for r in rows} | {str(math.ceil(r['server_batch'])) for r in rows})))")
COLUMNS=160 mame-deploy bench --onnx "$WORK/merged.onnx" --onnx "$WORK/unmerged.onnx" --batch-sizes "$BATCHES" \
    --no-compare-torch --iters 50 --json "$OUT/cpu_bench.json" --force | tee "$OUT/cpu_bench.txt"
uptime >> "$OUT/cpu_load_average.txt"
