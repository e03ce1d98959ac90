#!/usr/bin/env bash
# The device runs of vim_fashion (issue 13): build mamba-ssm (its scan has the backward pass
# training needs), train vim_fashion unmerged, choose merge placement and lam on the validation
# split, run the off-the-shelf sweep on the test split, fine-tune at ratio 0.7 (MaMe, ToMe,
# pruning and an unmerged control, 5 epochs each) and time the chosen placement.
# Weights land in $OUT, logs and JSON in $OUT/logs.tar.gz.
#
# Run from the repository root on the GPU machine, with the mamba-ssm sdist (or a wheel an
# earlier run built) and polygraphy's wheel in .whl/, the four Fashion-MNIST files in
# .data/fashion-mnist/:
#     bash benchmarks/device_fashion.sh                  # STEPS=all: everything in one call
#     STEPS=train bash benchmarks/device_fashion.sh      # build + train; the built wheel comes back
#     STEPS=eval WEIGHTS=models/weights/vim_fashion.pt bash benchmarks/device_fashion.sh
# The one-call form no longer fits the 10-minute limit of a call; the two-call form is what
# docs/fashion.md reports. Everything must end by DEADLINE seconds after the start: without
# EPOCHS, training gets the epochs that fit after the build at EPOCH_S seconds each (at most
# MAX_EPOCHS); the count is printed, and `mame-deploy train vim_fashion --epochs E` reproduces it.
# The built mamba-ssm wheel is copied to $OUT (in 15 MiB parts when larger than that:
# reassemble with cat); with it in .whl/, build_mamba installs it instead of building.
# Evaluation (choose, sweep, the fine-tuned weights) runs the scan with EVAL_BACKEND, by default
# the project's own kernel (`op`, float32), which needs no mamba-ssm, so it overlaps the build;
# fine-tuning needs mamba-ssm's backward and waits for it.
# Dry run on a CPU: DEVICE=cpu LIMIT=16 EPOCHS=2 DEADLINE=100000 bash benchmarks/device_fashion.sh
set -uo pipefail
START=$SECONDS
DEADLINE=${DEADLINE:-590}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-all}
LIMIT=${LIMIT:-}
OUT=${OUT:-$PWD/out}
LOGS=${LOGS:-/tmp/fashion-logs}
EPOCH_S=${EPOCH_S:-12.9}       # one unmerged epoch + its val pass on the H200 (probe_h200.json: 12.3 s)
TRAIN_FIXED=${TRAIN_FIXED:-20} # start-up, data, test pass and save of the train command
MAX_EPOCHS=${MAX_EPOCHS:-30}
FT_SOLO=${FT_SOLO:-mame}                  # fine-tuned alone, so its time is its own
FT_PARALLEL=${FT_PARALLEL:-tome prune control}  # then these at once on the same GPU
mkdir -p "$OUT" "$LOGS"
trap 'tar czf "$OUT/logs.tar.gz" -C "$LOGS" .' EXIT
export PYTHONUNBUFFERED=1
export MAME_FASHION_MNIST=${MAME_FASHION_MNIST:-$PWD/.data/fashion-mnist}
want() { [[ $STEPS == all || $STEPS == "$1" ]]; }
left() { echo $(( DEADLINE - (SECONDS - START) )); }
# Each step ends with the log archive refreshed, so a call stopped at its limit still returns it.
say() { echo "[$(( SECONDS - START )) s] $*" | tee -a "$LOGS/steps.log"; tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null; }
cli() { python3 -m mame_deploy.cli.main "$@"; }
lim=() ; [[ -n "$LIMIT" ]] && lim=(--limit "$LIMIT")
case "$STEPS" in all|train|eval) ;; *) echo "STEPS must be all, train or eval, got '$STEPS'"; exit 2;; esac

BUILD_PID=
if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1; cat "$LOGS/gpu.txt"
    python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 || { cat "$LOGS/install.log"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/polygraphy-*.whl >> "$LOGS/install.log" 2>&1
    export PYTHONPATH=/tmp/site
    # mamba-ssm exactly as benchmarks/device_kernel.sh builds it (sm_90 only), in the background;
    # it returns at once where mamba-ssm is installed and installs .whl/mamba_ssm-*.whl if present.
    eval "$(sed -n '/^build_mamba() {/,/^}/p' benchmarks/device_kernel.sh)"
    ( OUT=/tmp/mamba-wheel-out; mkdir -p "$OUT"; time build_mamba ) > "$LOGS/mamba_build.log" 2>&1 &
    BUILD_PID=$!
    say "mamba-ssm: build or install (pid $BUILD_PID)"
    train_args=(--device cuda)
    eval_args=(--device cuda --backend "${EVAL_BACKEND:-op}")
else
    train_args=(--device cpu)
    eval_args=(--device cpu --backend op)
fi

wait_mamba() {
    [[ -z "$BUILD_PID" ]] && return 0
    wait "$BUILD_PID"; say "mamba-ssm build/install exit $?"; tail -3 "$LOGS/mamba_build.log"
    BUILD_PID=
    python3 -c "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn; print('mamba-ssm ok')" || exit 1
}

# 1. Unmerged training (the shipped weights).
if want train; then
    wait_mamba
    # The wheel that was built, for the next call (at most 5 parts of 15 MiB come back).
    wheel=$(ls /tmp/mamba-wheel/mamba_ssm-*.whl 2>/dev/null | head -1)
    if [[ -n "$wheel" ]]; then
        size=$(stat -c %s "$wheel"); name=$(basename "$wheel")
        sha256sum "$wheel" | tee "$LOGS/wheel.sha256"; echo "$name $size bytes" | tee -a "$LOGS/wheel.sha256"
        if (( size <= 15 * 1048576 )); then cp "$wheel" "$OUT/"
        elif (( size <= 5 * 15 * 1048576 )); then split -b 15M -d -a 1 "$wheel" "$OUT/$name.part"
        else echo "wheel too large to come back ($size bytes)"; fi
    fi
    if [[ -z "${EPOCHS:-}" ]]; then
        EPOCHS=$(python3 -c "print(max(1, min($MAX_EPOCHS, int(($(left) - $TRAIN_FIXED) / $EPOCH_S))))")
    fi
    say "training $EPOCHS epochs ($(left) s left)"
    W="$OUT/vim_fashion.pt"
    cli train vim_fashion --epochs "$EPOCHS" "${train_args[@]}" --output "$W" "${lim[@]}" 2>&1 | tee "$LOGS/train.log"
    [[ -f "$W" ]] || { say "training failed"; exit 1; }
    cp "$LOGS/train.log" "$OUT/train.log"
    say "trained"
else
    W=${WEIGHTS:?STEPS=eval needs WEIGHTS=the trained weights}
    sha256sum "$W" | tee "$LOGS/weights.sha256"
fi
want eval || exit 0

# 2. Placement and lam on the validation split; 3. the sweep on the test split.
python3 benchmarks/fashion_run.py choose "${eval_args[@]}" "${lim[@]}" --checkpoint "$W" --out "$LOGS/choice_val.json" \
    2>&1 | tee "$LOGS/choose.log"
say "chose"
python3 benchmarks/fashion_run.py sweep "${eval_args[@]}" "${lim[@]}" --checkpoint "$W" --choice "$LOGS/choice_val.json" \
    --out "$LOGS/sweep_test.json" --plot "$LOGS/sweep_vim_fashion.png" 2>&1 | tee "$LOGS/sweep.log"
say "swept"
read -r LAM LAYERS < <(python3 -c "
import json; c = json.load(open('$LOGS/choice_val.json'))['choice']
print(c['lam'], ','.join(map(str, c['layers'])) if c['layers'] else '-')" 2>/dev/null || echo "1.0 -")
layer_args=(); [[ "$LAYERS" != "-" ]] && layer_args=(--layers "$LAYERS")
say "choice: layers $LAYERS, lam $LAM"

# 4. Latency of the chosen placement (CUDA graph; the weights do not matter).
if [[ $DEVICE == cuda ]]; then
    for r in 0.5 0.7; do
        timeout 60 python3 -m mame_deploy.cli.main bench --torch vim_fashion --ratio $r "${layer_args[@]}" \
            --option "lam=$LAM" --device cuda --cuda-graph --batch-sizes 1,256 --iters 50 \
            --json "$LOGS/bench_r${r}_chosen.json" > "$LOGS/bench_r${r}_chosen.log" 2>&1
        say "bench ratio $r exit $? (build running: ${BUILD_PID:-no})"; tail -8 "$LOGS/bench_r${r}_chosen.log"
    done
fi

# 5. Fine-tuning at ratio 0.7 with merging active, 5 epochs each; `control` is the same
#    fine-tuning recipe with no merging (does the extra training alone recover anything?).
wait_mamba
finetune() {  # method, seconds allowed
    local method=$1 F="$OUT/vim_fashion_${1}_r0.7.pt" merge=()
    if (( $2 < 60 )); then echo "skip fine-tuning $method: $2 s left" | tee "$LOGS/finetune_${method}.log"; return; fi
    case $method in
        control) F="$OUT/vim_fashion_control_ft5.pt" ;;
        mame) merge=(--ratio 0.7 --method mame --option "lam=$LAM" "${layer_args[@]}") ;;
        *) merge=(--ratio 0.7 --method "$method" "${layer_args[@]}") ;;
    esac
    timeout "$2" python3 -m mame_deploy.cli.main train vim_fashion --init "$W" "${merge[@]}" --epochs 5 \
        "${train_args[@]}" --output "$F" "${lim[@]}" > "$LOGS/finetune_${method}.log" 2>&1
    echo "fine-tune $method exit $?" >> "$LOGS/finetune_${method}.log"
}
FT=()
for method in $FT_SOLO; do
    finetune "$method" $(( $(left) - 30 ))
    tail -4 "$LOGS/finetune_${method}.log"
    say "fine-tuned $method"
done
pids=()
for method in $FT_PARALLEL; do
    finetune "$method" $(( $(left) - 30 )) &
    pids+=($!)
done
(( ${#pids[@]} )) && { wait "${pids[@]}"; for method in $FT_PARALLEL; do tail -3 "$LOGS/finetune_${method}.log"; done; }
say "fine-tuned $FT_PARALLEL (at once)"
for f in "$OUT"/vim_fashion_*_r0.7.pt "$OUT"/vim_fashion_control_ft5.pt; do [[ -f "$f" ]] && FT+=("$f"); done
if (( ${#FT[@]} )); then
    python3 benchmarks/fashion_run.py finetuned "${eval_args[@]}" "${lim[@]}" --out "$LOGS/finetuned_test.json" "${FT[@]}" \
        2>&1 | tee "$LOGS/finetuned.log"
fi
say "done"
