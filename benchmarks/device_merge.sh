#!/usr/bin/env bash
# One device call for the token-merge kernel: its GPU tests (kernel vs reference, AOT launch as
# TensorRT would do it), a compute-sanitizer pass over one step of each split, the merge
# benchmark (fused vs reference next to a vim_s block, work splits, decision-flip rate), and on
# request an Nsight Compute profile of one step at batch 1 and 256 by source line and phase, and a
# kernel change against its parent (PARENT=the parent's token_merge.cu, e.g. from `git show
# HEAD~1:plugins/token_merge.cu > .device/parent.cu`, carried): the outputs bit for bit (bits) and
# the merge kernels' time inside the vim_s batch-1 graph, fp32 and bf16, alternating (in-model).
# Run from the repository root on the GPU machine with .whl/ (the polygraphy wheel) carried:
#     bash benchmarks/device_merge.sh [tests] [sanitizer] [bench] [profile] [bits] [in-model]
# (default: the first three)
# Logs and JSON land in $OUT (at most 8 files come back).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${*:-tests sanitizer bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
    git rev-parse --short HEAD
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
    python3 -m pip install -q --no-deps .whl/polygraphy-*.whl 2>&1 | tail -2
    python3 - <<'PY'
import torch, cuda.bindings
from cuda.bindings import nvrtc
from mame_deploy.plugins import merge_launch, nvrtc as nv
print("torch", torch.__version__, "cuda-bindings", cuda.bindings.__version__, "nvrtc", nvrtc.nvrtcVersion()[1:])
ptx, _ = merge_launch.compile_ptx(merge_launch.Variant("float32", "float32"), arch="sm_90")
print("PTX ISA version", nv.ptx_version(ptx))
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if want tests; then
    timeout 270 python3 -m pytest -q -rs --maxfail=20 tests/test_token_merge_gpu.py tests/test_aot_token_merge_gpu.py \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -30
fi

if want sanitizer; then
    cat > /tmp/one_step.py <<'PY'
import torch
from mame_deploy.ops.token_merge.contract import MergeAttributes
from mame_deploy.ops.fixtures import merge_inputs
from mame_deploy.ops.token_merge.cuda import token_merge_cuda
from mame_deploy.plugins import merge_launch
for tuning in merge_launch.TUNINGS:
    for attrs in (MergeAttributes(6, lam=1.0), MergeAttributes(6, split=1, arrangement=1, weighting=1, metric=1)):
        token_merge_cuda(**merge_inputs(3, 197, 384, torch.bfloat16, torch.float32), attrs=attrs, tuning=tuning)
torch.cuda.synchronize()
print("sanitizer run done")
PY
    # Kernel errors only: cuda-python's start-up probes of absent driver entry points are API
    # "errors" to the sanitizer, hence --report-api-errors no.
    timeout 90 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 50 python3 /tmp/one_step.py \
        > "$OUT/sanitizer.log" 2>&1
    timeout 90 compute-sanitizer --tool racecheck --report-api-errors no --print-limit 50 python3 /tmp/one_step.py \
        >> "$OUT/sanitizer.log" 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|hazard|sanitizer run done" "$OUT/sanitizer.log" | head -20
fi

if want profile; then
    # ncu runs from plugins/: NVRTC names the program token_merge.cu and ncu finds it by that name.
    for batch in 1 256; do
        (cd plugins && timeout 150 ncu --clock-control none -k regex:mame_token_merge --launch-skip 2 --launch-count 1 \
            --set full --import-source yes --warp-sampling-interval 0 -f -o /tmp/merge_b$batch \
            python3 ../benchmarks/profile_merge.py run --batch $batch > /tmp/ncu_b$batch.log 2>&1)
        ncu -i /tmp/merge_b$batch.ncu-rep --page source --csv --print-source cuda,sass > /tmp/lines_b$batch.csv
        python3 benchmarks/profile_merge.py summarize /tmp/lines_b$batch.csv > "$OUT/merge_profile_b$batch.md"
        echo "== batch $batch"; head -16 "$OUT/merge_profile_b$batch.md"
    done
fi

if want bits || want in-model; then
    [[ -f "${PARENT:-}" ]] || { echo "bits / in-model need PARENT=the parent kernel's token_merge.cu" >&2; exit 2; }
fi

if want bits; then
    timeout 240 python3 benchmarks/profile_merge.py bits --kernel-source "$PARENT" 2>&1 | tee "$OUT/bits.txt" | tail -3
fi

if want in-model; then
    for dtype in fp32 bf16; do
        for source in parent tree parent tree; do
            extra=(); [[ $source == parent ]] && extra=(--kernel-source "$PARENT")
            echo "== $dtype $source" >> "$OUT/in_model.txt"
            timeout 100 python3 benchmarks/profile_merge.py in-model --dtype $dtype "${extra[@]}" >> "$OUT/in_model.txt" 2>&1
        done
    done
    grep -E "^==|a step" "$OUT/in_model.txt"
fi

if want bench; then
    timeout 170 python3 benchmarks/bench_merge.py --batch 1 64 256 --dtypes float32 bfloat16 --tunings all --iters 100 \
        --flips 20 --json "$OUT/merge_bench.json" 2>"$OUT/bench.err" | tee "$OUT/merge_bench.md"
    tail -5 "$OUT/bench.err"
fi
