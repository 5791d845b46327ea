#!/usr/bin/env bash
# FSDP resume check on 2 GPUs with Lightning's real strategy="fsdp" (NCCL): an uninterrupted 8-step run,
# a 4-step run that saves a sharded checkpoint, and a run resumed from it must give identical per-rank
# per-step losses (optimizer state, step count and sampler position restored). ~1-2 minutes.
#   bash scripts/gpu/fsdp_resume.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-$(mktemp -d /tmp/fsdp-resume-XXXX)}
mkdir -p "$OUT"
nvidia-smi -L | head -2
launch() {  # one process per rank, torchrun-style variables: Lightning creates no processes
  local port=$((20000 + RANDOM % 20000)) pids=()
  for r in 0 1; do
    PYTHONPATH=$PWD LOCAL_RANK=$r NODE_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout 300 "$PY" tests/integration/scripts/fsdp_resume.py --accelerator cuda --out "$OUT" "$@" \
      > "$OUT/log_$r.txt" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { tail -30 "$OUT"/log_*.txt; exit 1; }; done
}
launch --max_steps 8 --tag full
launch --max_steps 4 --save_at_end "$OUT/half.ckpt" --tag half
launch --max_steps 8 --ckpt_path "$OUT/half.ckpt" --tag resumed
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ok = True
for r in range(2):
    f, h, s = (json.loads((out / f"{t}_rank{r}.json").read_text())["losses"] for t in ("full", "half", "resumed"))
    same = h == f[:4] and s == f[4:]
    ok &= same
    print(f"rank {r}: full {f}\n        resumed {s}\n        {'IDENTICAL' if same else 'DIFFERENT'}")
print("FSDP resume:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
