#!/usr/bin/env bash
# onnxruntime on the device machine's CPU: vim_s merged (ratio 0.5) vs unmerged at batch 1 and 8,
# the files exported there. Logs and JSON land in $OUT. Run from the repository root with .whl/
# (the polygraphy wheel) carried:  bash benchmarks/device_ort_cpu.sh
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
python3 -m pip install -q --no-deps .whl/polygraphy-*.whl > /dev/null 2>&1
lscpu | grep -E "Model name|^CPU\(s\)" > "$OUT/ort_cpu.txt"
for ratio in 0 0.5; do
    mame-deploy export vim_s --ratio $ratio --dynamic-batch -o /tmp/vim_s_r$ratio.onnx --no-engine --force >> "$OUT/ort_cpu.txt" 2>&1
done
mame-deploy bench --onnx /tmp/vim_s_r0.5.onnx --onnx /tmp/vim_s_r0.onnx --no-compare-torch --batch-sizes 1,8 \
    --warmup 3 --iters 20 --json "$OUT/ort_cpu_vim_s.json" --force 2>&1 | tee -a "$OUT/ort_cpu.txt"
