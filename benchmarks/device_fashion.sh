#!/usr/bin/env bash
# One device call for vim_fashion (issue 13): build mamba-ssm (its scan has the backward pass
# training needs), train vim_fashion unmerged, choose merge placement and lam on the validation
# split, run the off-the-shelf sweep on the test split, fine-tune with merging at ratio 0.7, and
# time the merged model. Weights land in $OUT, logs and JSON in $OUT/logs.tar.gz.
#
# Run from the repository root on the GPU machine, with the mamba-ssm sdist and polygraphy's
# wheel in .whl/ and the four Fashion-MNIST files in .data/fashion-mnist/:
#     bash benchmarks/device_fashion.sh
# Everything must end by DEADLINE seconds after the start: the epoch count comes from a probe
# of the step time (printed, so the run is reproduced by `mame-deploy train vim_fashion --epochs E`).
# Dry run on a CPU: DEVICE=cpu LIMIT=16 DEADLINE=100000 bash benchmarks/device_fashion.sh
set -uo pipefail
START=$SECONDS
DEADLINE=${DEADLINE:-540}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-}
OUT=${OUT:-$PWD/out}
LOGS=${LOGS:-/tmp/fashion-logs}
mkdir -p "$OUT" "$LOGS"
trap 'tar czf "$OUT/logs.tar.gz" -C "$LOGS" .' EXIT
export PYTHONUNBUFFERED=1
export MAME_FASHION_MNIST=${MAME_FASHION_MNIST:-$PWD/.data/fashion-mnist}
left() { echo $(( DEADLINE - (SECONDS - START) )); }
# Each step ends with the log archive refreshed, so a call stopped at its limit still returns it.
say() { echo "[$(( SECONDS - START )) s] $*" | tee -a "$LOGS/steps.log"; tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null; }
cli() { python3 -m mame_deploy.cli.main "$@"; }
lim=() ; [[ -n "$LIMIT" ]] && lim=(--limit "$LIMIT")

if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1; cat "$LOGS/gpu.txt"
    python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 || { cat "$LOGS/install.log"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/polygraphy-*.whl >> "$LOGS/install.log" 2>&1
    export PYTHONPATH=/tmp/site
    # mamba-ssm exactly as benchmarks/device_kernel.sh builds it (sm_90 only), in the background.
    eval "$(sed -n '/^build_mamba() {/,/^}/p' benchmarks/device_kernel.sh)"
    ( OUT=/tmp/mamba-wheel-out; mkdir -p "$OUT"; time build_mamba ) > "$LOGS/mamba_build.log" 2>&1 &
    BUILD_PID=$!
    say "building mamba-ssm (pid $BUILD_PID); meanwhile: latency of merged vim_fashion (weights do not matter)"
    for r in 0.5 0.7; do
        timeout 45 python3 -m mame_deploy.cli.main bench --torch vim_fashion --ratio $r --device cuda --cuda-graph \
            --batch-sizes 1,256 --iters 50 --json "$LOGS/bench_r$r.json" > "$LOGS/bench_r$r.log" 2>&1
        say "bench ratio $r exit $?"; tail -8 "$LOGS/bench_r$r.log"
    done
    wait "$BUILD_PID"; say "mamba-ssm build exit $?"; tail -3 "$LOGS/mamba_build.log"
    python3 -c "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn; print('mamba-ssm ok')" || exit 1
    run_args=(--device cuda --backend mamba_ssm)
else
    run_args=(--device cpu --backend op)
fi

# 1. How long an epoch takes, so training fills the time that the later steps leave.
probe_args=()
[[ $DEVICE == cpu ]] && probe_args=(--steps 1 --train-batch 8)
[[ -n "$LIMIT" ]] && probe_args+=(--limit "$LIMIT")
python3 benchmarks/fashion_run.py probe "${run_args[@]}" "${probe_args[@]}" --left "$(left)" --fixed 100 \
    --out "$LOGS/probe.json" 2>&1 | tee "$LOGS/probe.log"
EPOCHS=${EPOCHS:-$(python3 -c "import json; print(json.load(open('$LOGS/probe.json'))['epochs'])" 2>/dev/null || echo 12)}
say "training $EPOCHS epochs"

# 2. Unmerged training (the shipped weights).
W="$OUT/vim_fashion.pt"
cli train vim_fashion --epochs "$EPOCHS" --device "$DEVICE" --output "$W" "${lim[@]}" 2>&1 | tee "$LOGS/train.log"
[[ -f "$W" ]] || { say "training failed"; exit 1; }
say "trained"

# 3. Placement and lam on the validation split; 4. the sweep on the test split.
python3 benchmarks/fashion_run.py choose "${run_args[@]}" "${lim[@]}" --checkpoint "$W" --out "$LOGS/choice_val.json" \
    2>&1 | tee "$LOGS/choose.log"
say "chose"
python3 benchmarks/fashion_run.py sweep "${run_args[@]}" "${lim[@]}" --checkpoint "$W" --choice "$LOGS/choice_val.json" \
    --out "$LOGS/sweep_test.json" --plot "$LOGS/sweep_vim_fashion.png" 2>&1 | tee "$LOGS/sweep.log"
say "swept"
read -r LAM LAYERS < <(python3 -c "
import json; c = json.load(open('$LOGS/choice_val.json'))['choice']
print(c['lam'], ','.join(map(str, c['layers'])) if c['layers'] else '-')" 2>/dev/null || echo "1.0 -")
layer_args=(); [[ "$LAYERS" != "-" ]] && layer_args=(--layers "$LAYERS")

# 5. Fine-tuning with merging at ratio 0.7: MaMe first, the baselines while time is left.
FT_EPOCH_S=$(python3 -c "import json; print(int(json.load(open('$LOGS/probe.json'))['finetune_epoch_s']) + 1)" 2>/dev/null || echo 30)
FT=()
for method in mame tome prune; do
    need=$(( 5 * FT_EPOCH_S + 20 ))
    if (( $(left) < need )); then say "skip fine-tuning $method: $(left) s left, needs ~$need"; continue; fi
    opt=(); [[ $method == mame ]] && opt=(--option "lam=$LAM")
    F="$OUT/vim_fashion_${method}_r0.7.pt"
    cli train vim_fashion --init "$W" --ratio 0.7 --method $method "${opt[@]}" "${layer_args[@]}" --epochs 5 \
        --device "$DEVICE" --output "$F" "${lim[@]}" 2>&1 | tee "$LOGS/finetune_${method}.log"
    [[ -f "$F" ]] && FT+=("$F")
    say "fine-tuned $method"
done
if (( ${#FT[@]} )); then
    python3 benchmarks/fashion_run.py finetuned "${run_args[@]}" "${lim[@]}" --out "$LOGS/finetuned_test.json" "${FT[@]}" \
        2>&1 | tee "$LOGS/finetuned.log"
fi
say "done"
