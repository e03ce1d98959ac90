#!/usr/bin/env bash
# One device call for the fused merge operator end to end: the merge GPU tests and a racecheck
# of the cluster splits, vim_s merged vs unmerged as CUDA graphs (fp32/bf16, batch 1/64/256,
# torch.compile rows at batch 1), the CLI's bench, and the decision-flip rates between PyTorch
# CPU, onnxruntime and the CUDA kernel. Logs land in $OUT. Run from the repository root with
# .whl/ (the polygraphy wheel) carried:  bash benchmarks/device_e2e.sh [tests] [e2e] [flips]
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${*:-tests e2e flips}
want() { [[ " $STEPS " == *" $1 "* ]]; }
{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
    python3 -m pip install -q --no-deps .whl/polygraphy-*.whl 2>&1 | tail -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if want tests; then
    timeout 150 python3 -m pytest -q -rs -x tests/test_token_merge_gpu.py tests/test_aot_token_merge_gpu.py \
        tests/test_kernel_gpu.py -k "not slow" 2>&1 | tail -4 | tee "$OUT/gpu_tests.log"
    bash benchmarks/device_merge.sh sanitizer > /dev/null 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | tee -a "$OUT/gpu_tests.log"
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
