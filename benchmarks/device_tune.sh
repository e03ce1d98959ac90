#!/usr/bin/env bash
# One device call for `mame-deploy tune` on vim_fashion (issue 14): the search for the fastest
# schedule losing at most 1 point on the validation split, timed as a CUDA graph on the GPU at
# batch 1 and 256 (graph1, graph256) and in onnxruntime on the device CPU at batch 1 (ort1);
# then the winner and the best uniform --ratio schedule of each search on the test split (test).
# Fronts (JSON + PNG) land in $OUT, logs in $OUT/logs.tar.gz.
#
# Run from the repository root on the GPU machine, with polygraphy's wheel in .whl/ and the four
# Fashion-MNIST files in .data/fashion-mnist/ (see docs/tune.md):
#     bash benchmarks/device_tune.sh graph1 graph256 test      (one call, under 10 minutes)
#     bash benchmarks/device_tune.sh ort1 test                 (a second call; .device/tune/ holds the first's JSON)
# A search cut short by its timeout keeps what it measured: put its JSON back in .device/tune/ and rerun
# the same step to resume it.
set -uo pipefail
OUT=${OUT:-$PWD/out}
LOGS=/tmp/tune-logs
mkdir -p "$OUT" "$LOGS"
trap 'tar czf "$OUT/logs.tar.gz" -C "$LOGS" .' EXIT
export PYTHONUNBUFFERED=1
export MAME_FASHION_MNIST=${MAME_FASHION_MNIST:-$PWD/.data/fashion-mnist}
STEPS=${*:-graph1 graph256 test}
want() { [[ " $STEPS " == *" $1 "* ]]; }
START=$SECONDS
say() { echo "[$(( SECONDS - START )) s] $*" | tee -a "$LOGS/steps.log"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/gpu.txt" 2>&1; cat "$LOGS/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOGS/install.log" 2>&1 || { cat "$LOGS/install.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/polygraphy-*.whl >> "$LOGS/install.log" 2>&1
export PYTHONPATH=/tmp/site
git rev-parse HEAD > "$LOGS/commit.txt" 2>/dev/null

# tune NAME SECONDS ARGS...: one search, resumed from .device/tune/NAME.json when an earlier call left one.
tune() {
    local name=$1 limit=$2; shift 2
    [[ -f .device/tune/$name.json ]] && cp .device/tune/"$name".json "$OUT/$name.json"
    say "tune $name: $*"
    timeout "$limit" python3 -m mame_deploy.cli.main tune vim_fashion --max-drop 1 "$@" \
        --json "$OUT/$name.json" --plot "$OUT/$name.png" --force > "$LOGS/$name.log" 2>&1
    say "tune $name exit $?"; tail -30 "$LOGS/$name.log"
}
# The GPU searches score accuracy on the GPU; the second reuses the first one's scores.
want graph1 && tune fashion_graph_b1 "${T_GRAPH1:-240}" --runtime torch-graph --batch 1 --batch-size 1000
scores=(); [[ -f $OUT/fashion_graph_b1.json ]] && scores=(--scores-from "$OUT/fashion_graph_b1.json")
want graph256 && tune fashion_graph_b256 "${T_GRAPH256:-180}" --runtime torch-graph --batch 256 --batch-size 1000 \
    "${scores[@]}"
# onnxruntime on the 16-core CPU: each candidate is exported first, so fewer are timed.
want ort1 && tune fashion_ort_cpu_b1 "${T_ORT:-480}" --runtime onnxruntime --device cpu --batch 1 --max-measure 12 \
    --batch-size 500

# Test split (10,000 images): each search's winner and best uniform --ratio schedule, on the GPU.
if want test; then
    say "test split"
    python3 - "$OUT" > "$OUT/fashion_test_split.json" 2> "$LOGS/test_split.log" <<'EOF'
import json, sys
from pathlib import Path

import torch

from mame_deploy.data import dataset_for
from mame_deploy.evaluate import Setting, evaluate_setting
from mame_deploy.models import create_model
from mame_deploy.tune import _OnDevice

out = Path(sys.argv[1])
net = create_model("vim_fashion").to("cuda")
test = _OnDevice(dataset_for("vim_fashion", net.config, subset="test"), "cuda")
rows = {"unmerged": evaluate_setting(net, test, Setting(), 1000)["accuracy"]}
searches = {p.name: p for p in sorted(Path(".device/tune").glob("fashion_*_b*.json"))}
searches.update({p.name: p for p in sorted(out.glob("fashion_*_b*.json"))})  # this call's, if any
for path in searches.values():
    state = json.loads(path.read_text())
    for role in ("best", "best_uniform"):
        best = state.get(role)
        if best:
            setting = Setting(best["method"], 0.0, best["schedule"] or None, options=best["options"])
            record = evaluate_setting(net, test, setting, 1000)
            rows[f"{path.stem} {role}"] = {"schedule": best["schedule"], "method": best["method"],
                                           "family_ratio": best["family_ratio"], "test_accuracy": record["accuracy"],
                                           "calibration_drop_points": best["calibration"]["drop_points"],
                                           "p50_ms": best["latency"]["p50_ms"], "speedup": best["latency"]["speedup"]}
print(json.dumps(rows, indent=2, sort_keys=True))
EOF
    say "test split exit $?"; cat "$OUT/fashion_test_split.json"
fi
