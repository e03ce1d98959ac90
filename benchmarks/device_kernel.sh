#!/usr/bin/env bash
# One device call for the selective-scan kernel: GPU tests, kernel benchmark against mamba-ssm
# and the PyTorch reference, end-to-end vim_s throughput. Logs are packed into $OUT/logs.tar.gz
# (the device tool returns at most 8 files), a freshly built mamba-ssm wheel is left in $OUT.
#
# Run from the repository root on the GPU machine, with the mamba-ssm sdist (or a wheel built
# by an earlier run) in .whl/:
#     bash benchmarks/device_kernel.sh [all|tests|bench|e2e|merge|tune|profile]...
# tune and profile take their work splits from TUNE_TUNINGS / PROFILE_TUNINGS, tune its shapes
# from TUNE_BATCH and TUNE_LENGTH.
# mamba-ssm's setup.py compiles nine GPU architectures; the build here keeps sm_90 only
# (~2.5 min on 16 cores) and runs in the background while the tests use the GPU.
set -uo pipefail
OUT=${OUT:-$PWD/out}
LOGS=/tmp/kernel-logs
mkdir -p "$OUT" "$LOGS"
trap 'tar czf "$OUT/logs.tar.gz" -C "$LOGS" .' EXIT
export PYTHONUNBUFFERED=1
STEPS=${*:-all}
want() { [[ " $STEPS " == *" all "* || " $STEPS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1
cat "$LOGS/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 || { cat "$LOGS/install.log"; exit 1; }

build_mamba() {
    if python3 -c "import selective_scan_cuda" 2>/dev/null; then return 0; fi
    local wheel
    wheel=$(ls .whl/mamba_ssm-*.whl 2>/dev/null | head -1)
    if [[ -n "$wheel" ]]; then
        python3 -m pip install -q --no-deps "$wheel"
        return
    fi
    local src=/tmp/mamba-src
    rm -rf "$src" && mkdir -p "$src" && tar xzf .whl/mamba_ssm-*.tar.gz -C "$src" || return 1
    cd "$src"/mamba_ssm-* || return 1
    # Keep only the sm_90 -gencode pair of setup.py's hard-coded list.
    python3 - <<'EOF'
import re
text = open("setup.py").read()
pair = re.compile(r'\n(\s*)cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_(\d+)a?,code=sm_\d+a?"\)')
text = pair.sub(lambda m: m.group(0) if m.group(2) == "90" else f"\n{m.group(1)}pass", text)
open("setup.py", "w").write(text)
EOF
    grep -n "gencode\|arch=compute" setup.py
    MAMBA_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 \
        python3 -m pip wheel -v --no-deps --no-build-isolation -w /tmp/mamba-wheel . || return 1
    python3 -m pip install -q --no-deps /tmp/mamba-wheel/mamba_ssm-*.whl || return 1
    cp /tmp/mamba-wheel/mamba_ssm-*.whl "$OUT/" 2>/dev/null
}

if want bench || want e2e; then
    ( time build_mamba ) > "$LOGS/mamba_build.log" 2>&1 &
    BUILD_PID=$!
fi

if want tests; then
    python3 -m pytest -q -rs tests/test_kernel_gpu.py tests/test_kernel_cpu.py 2>&1 | tee "$LOGS/gpu_tests.log" | tail -25
fi

if want tune; then
    python3 benchmarks/bench_kernel.py --no-mamba --no-reference --rep-ms 100 --length ${TUNE_LENGTH:-197} \
        --batch ${TUNE_BATCH:-1 2 4 8 16 64 256} --tunings ${TUNE_TUNINGS:-auto 16x8x32x1 16x16x32x1 8x8x32x1 8x16x32x2 4x32x32x4} \
        --json "$LOGS/tune.json" 2>"$LOGS/tune.err" | tee "$LOGS/tune.md"
fi

if [[ -n "${BUILD_PID:-}" ]]; then
    wait "$BUILD_PID"; echo "mamba-ssm build exit $?"; tail -3 "$LOGS/mamba_build.log"
    python3 -c "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn; print('mamba-ssm ok')" 2>&1 | tail -3
fi

if want bench; then
    python3 benchmarks/bench_kernel.py --json "$LOGS/bench.json" 2>"$LOGS/bench.err" | tee "$LOGS/bench.md"
fi

if want e2e; then
    python3 benchmarks/bench_e2e.py --model vim_s --batch 256 --json "$LOGS/e2e.json" 2>"$LOGS/e2e.err" | tee "$LOGS/e2e.md"
fi

if want merge; then
    # What merge steps cost on the GPU: one step vs one block, and whole-model throughput with the
    # default placement (a merge after every block but the last) and with three larger merges.
    python3 benchmarks/bench_merge.py --batch 1 64 256 2>"$LOGS/merge.err" | tee "$LOGS/merge.md"
    python3 benchmarks/bench_e2e.py --model vim_s --batch 256 --backends op --ratios 0 0.5 0.7 \
        --json "$LOGS/e2e_default.json" 2>>"$LOGS/merge.err" | tee -a "$LOGS/merge.md"
    python3 benchmarks/bench_e2e.py --model vim_s --batch 256 --backends op --ratios 0.5 0.7 --layers 5 11 17 \
        --json "$LOGS/e2e_layers.json" 2>>"$LOGS/merge.err" | tee -a "$LOGS/merge.md"
fi

if want profile; then
    # Where the time goes: stall reasons per issued instruction and pipe use (ncu, clocks as found).
    stalls=""
    for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected \
             selected no_instruction lg_throttle dispatch_stall branch_resolving; do
        stalls+="smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio,"
    done
    metrics="${stalls}gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,"
    metrics+="sm__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,"
    metrics+="sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,"
    metrics+="l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,"
    metrics+="launch__registers_per_thread,launch__occupancy_limit_registers"
    ncu --clock-control none -k regex:mame_selective_scan --metrics "$metrics" \
        python3 benchmarks/bench_kernel.py --once --no-mamba --batch 256 1 --length 197 --dtype float16 float32 \
        --tunings ${PROFILE_TUNINGS:-auto} > "$LOGS/ncu.txt" 2>&1
    grep -E "mame_selective|stalled|duration|warps_active|inst_executed|issue_active|pipe|wavefronts|dram__|registers|occupancy" \
        "$LOGS/ncu.txt" | sed -e 's/smsp__average_warps_issue_stalled_//' -e 's/_per_issue_active.ratio//' | awk '{$1=$1};1' | head -120
fi
