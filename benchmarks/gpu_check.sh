#!/usr/bin/env bash
# The issue-5 GPU check as one prepared script (about 5-8 minutes on an H100/H200 at SIZE=full):
# the scale tier's steps on the real SD v1 UNet (64x64 latents) and CelebA-HQ 256 DDPM UNet with
# random weights, each table in one run on one device (benchmarks/bench_scale.py):
#   1. DDPM, bf16, batch 32: plain fine-tuning vs SISS vs FU primal-dual
#      (target: FU >= 90% of plain's images/s; reference H200: plain 98.5 img/s);
#   2. DDPM, fp32, batch 32 as micro-batch 2 x 16 accumulation (the paper's setting; ref. 17 img/s);
#   3. SD v1, bf16, batch 1 and batch 8: plain LoRA vs ESD-x vs RU primal-dual
#      (target: RU adds <= 5% to ESD-x; reference H200: ESD-x 0.165 s at batch 1 and 8).
# Usage:  PY=.venv/bin/python bash benchmarks/gpu_check.sh            (SIZE=tiny STEPS=2 to smoke-test on CPU)
# Output: the tables on stdout, and a copy in $OUT/gpu_check.md when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SIZE=${SIZE:-full}
STEPS=${STEPS:-10}
log=$(mktemp)
run() { echo; echo "## $*"; "$PY" benchmarks/bench_scale.py --size "$SIZE" --steps "$STEPS" --warmup 2 "$@"; }
{
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  run --only ddpm --batch 32 --mixed-precision bf16
  run --only ddpm --batch 32 --micro-batch 2 --mixed-precision no
  run --only sd --batch 1 --mixed-precision bf16
  run --only sd --batch 8 --mixed-precision bf16
} 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$log" "$OUT/gpu_check.md"; fi
