#!/usr/bin/env bash
# The main job on the embedded default: install, fit EAGLE3 for SmolLM2-135M-Instruct on ShareGPT
# (features are captured on first use), measure acceptance length by real speculative decoding,
# and export an SGLang draft folder. Extra arguments go to `fit` (e.g. --trainer.max_time=00:00:10:00).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
CONFIG=${CONFIG:-configs/eagle3.yaml}
RUN=${RUN:-runs/eagle3-smollm2}

$PY -m specforge_lightning fit --config "$CONFIG" --trainer.default_root_dir "$RUN" "$@"
CKPT="$RUN/checkpoints/last.ckpt"
$PY -m specforge_lightning evaluate --config "$CONFIG" --ckpt_path "$CKPT" --output "$RUN/eval/acceptance.json" \
    --num_prompts 20 --max_new_tokens 128 --k 5 --dtype float32 --threads 2
$PY -m specforge_lightning export --ckpt_path "$CKPT" --format sglang --output_dir "$RUN/export/sglang" --overwrite
$PY - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
r = json.load(open(f"{run}/eval/acceptance.json"))
print(f"\nmeasured acceptance length: {r['acceptance_length']:.3f} (bonus token counted; "
      f"simulated {r['simulated_acceptance_length']:.3f}; speed-up {r['speedup']:.2f}x)")
print(f"per-position acceptance plot: {run}/eval/acceptance.png")
print(f"SGLang draft folder: {run}/export/sglang")
PY
