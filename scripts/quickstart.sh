#!/usr/bin/env bash
# The main job on the embedded default: install, fit EAGLE3 for SmolLM2-135M-Instruct on ShareGPT
# (features are captured on first use), measure acceptance length by real speculative decoding,
# and export an SGLang draft folder. Extra arguments go to `fit` (e.g. --trainer.max_time=00:00:10:00).
# --budget_minutes N (default 0: off, the recipe as measured in docs/results/) first measures this
# machine and sizes the capture (num_samples) and the fit (max_time) to N minutes in all
# (`python -m specforge_lightning plan`; not yet validated by a full run on an idle machine);
# arguments given to `fit` after it still win. The end prints the plan beside what each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=0
FIT_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget_minutes) BUDGET=$2; shift 2 ;;
        --budget_minutes=*) BUDGET=${1#*=}; shift ;;
        *) FIT_ARGS+=("$1"); shift ;;
    esac
done
T0=$(date +%s.%N)
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
CONFIG=${CONFIG:-configs/eagle3.yaml}
RUN=${RUN:-runs/eagle3-smollm2}
mkdir -p "$RUN"
now() { date +%s.%N; }
since() { $PY -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }
INSTALL_S=$(since "$T0")

PLAN_ARGS=()
rm -f "$RUN/plan.json"
if [ "$BUDGET" != "0" ]; then
    $PY -m specforge_lightning plan --config "$CONFIG" --budget_minutes "$BUDGET" --install_s "$INSTALL_S" \
        --eval_prompts 20 --eval_new_tokens 128 --eval_dtype float32 --out "$RUN/plan.json"
    read -r -a PLAN_ARGS < <($PY -c "import json, sys; print(' '.join(json.load(open(sys.argv[1]))['overrides']))" "$RUN/plan.json")
fi
MEASURE_S=$(since "$T0")

T=$(now)
$PY -m specforge_lightning fit --config "$CONFIG" --trainer.default_root_dir "$RUN" "${PLAN_ARGS[@]}" "${FIT_ARGS[@]}"
FIT_S=$(since "$T")
CKPT="$RUN/checkpoints/last.ckpt"
T=$(now)
$PY -m specforge_lightning evaluate --config "$CONFIG" --ckpt_path "$CKPT" --output "$RUN/eval/acceptance.json" \
    --num_prompts 20 --max_new_tokens 128 --k 5 --dtype float32 --threads 2
EVAL_S=$(since "$T")
T=$(now)
$PY -m specforge_lightning export --ckpt_path "$CKPT" --format sglang --output_dir "$RUN/export/sglang" --overwrite
EXPORT_S=$(since "$T")
$PY - "$RUN" "$INSTALL_S" "$MEASURE_S" "$FIT_S" "$EVAL_S" "$EXPORT_S" <<'PY'
import json, os, sys
run = sys.argv[1]
install, measure, fit, evaluate, export = map(float, sys.argv[2:])
r = json.load(open(f"{run}/eval/acceptance.json"))
print(f"\nmeasured acceptance length: {r['acceptance_length']:.3f} (bonus token counted; "
      f"simulated {r['simulated_acceptance_length']:.3f}; speed-up {r['speedup']:.2f}x)")
print(f"per-position acceptance plot: {run}/eval/acceptance.png")
print(f"SGLang draft folder: {run}/export/sglang")
if os.path.exists(f"{run}/plan.json"):
    from specforge_lightning.plan_command import actual_stages, plan_from_json
    from specforge_lightning.runtime.budget import format_plan_vs_actual

    plan = plan_from_json(f"{run}/plan.json")
    if plan is not None:
        actual = actual_stages(run, install_s=install, measure_s=measure - install, fit_s=fit,
                               evaluate_s=evaluate, export_s=export)
        print("\n" + format_plan_vs_actual(plan, actual))
PY
