#!/usr/bin/env bash
# One device call for the merged model end to end: the GPU tests of both kernels (the scan with
# its dt_sums output, the fused merge) and of their AOT launches, a memcheck + racecheck pass
# over the scan's work splits, vim_s merged vs unmerged as CUDA graphs (fp32/bf16, batch
# 1/64/256, torch.compile rows at batch 1), and the decision-flip rates between PyTorch CPU,
# onnxruntime and the CUDA kernels; on request (alone) batch 1 of each model in its own process
# (a process's first eager forward after a capture slows later batch-1 replays: perf-notes).
# Logs land in $OUT. Run from the repository root with the polygraphy wheel in .whl/ carried:
#     bash benchmarks/device_e2e.sh [tests] [sanitizer] [e2e] [flips] [alone]
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${*:-tests sanitizer e2e flips}
want() { [[ " $STEPS " == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
    python3 -m pip install -q --no-deps .whl/polygraphy-*.whl 2>&1 | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if want tests; then
    timeout 300 python3 -m pytest -q -rs tests/test_kernel_gpu.py tests/test_aot_gpu.py tests/test_token_merge_gpu.py \
        tests/test_aot_token_merge_gpu.py -k "not slow" 2>&1 | tail -12 | tee "$OUT/gpu_tests.log"
fi
if want sanitizer; then
    cat > /tmp/scan_splits.py <<'PY'
import torch
from mame_deploy.ops.fixtures import scan_inputs
from mame_deploy.ops.selective_scan.cuda import selective_scan_cuda
from mame_deploy.plugins import launch
splits = (launch.DEFAULT_TUNING, launch.MEDIUM_BATCH_TUNING, launch.SMALL_BATCH_TUNING, *launch.SEGMENTED_TUNINGS)
for tuning in splits:
    for reverse in (False, True):
        selective_scan_cuda(**scan_inputs(2, 100, 197, 16, torch.bfloat16), delta_softplus=True, reverse=reverse,
                            tuning=tuning)
torch.cuda.synchronize()
print("sanitizer run done")
PY
    # Kernel errors only (cuda-python's start-up probes are API "errors" to the sanitizer).
    for tool in memcheck racecheck; do
        timeout 90 compute-sanitizer --tool $tool --report-api-errors no --print-limit 50 python3 /tmp/scan_splits.py \
            >> "$OUT/sanitizer.log" 2>&1
    done
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|sanitizer run done" "$OUT/sanitizer.log" | head -20 \
        | tee -a "$OUT/gpu_tests.log"
fi
if want e2e; then
    timeout 300 python3 benchmarks/bench_e2e.py --model vim_s --ratio 0.5 --batches 1 64 256 \
        --dtypes float32 bfloat16 --compile-batches 1 --json "$OUT/e2e_vim_s.json" 2>> "$OUT/stderr.log" | tee "$OUT/e2e_vim_s.md"
    tail -3 "$OUT/stderr.log"
fi
if want flips; then
    timeout 200 python3 benchmarks/decision_flips.py --models vim_t vim_digits --methods mame tome prune \
        --samples 128 --json "$OUT/flips.json" 2>> "$OUT/stderr.log" | tee "$OUT/flips.md"
    tail -3 "$OUT/stderr.log"
fi
if want alone; then
    # The CLI never replaces a file without --force: a warm machine's earlier JSON must go first,
    # or a run that refuses to write would leave the last call's numbers to be read back.
    rm -f /tmp/alone_*.json "$OUT/alone.txt"
    for dtype in fp32 bf16; do
        for ratio in 0 0.5; do
            echo "== batch 1 alone: vim_s $dtype ratio $ratio" >> "$OUT/alone.txt"
            timeout 90 mame-deploy bench --torch vim_s --ratio $ratio --no-baseline --device cuda --cuda-graph \
                --batch-sizes 1 --iters 100 --dtype $dtype --json /tmp/alone_${dtype}_r$ratio.json >> "$OUT/alone.txt" 2>&1
        done
    done
    python3 - "$OUT/batch1_alone.json" /tmp/alone_*.json <<'PY'
import json, pathlib, sys
runs = {pathlib.Path(p).stem: json.loads(pathlib.Path(p).read_text()) for p in sys.argv[2:]}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=1))
for name, run in sorted(runs.items()):
    print(name, [round(r["p50_ms"], 4) for r in run["rows"]])
PY
fi
