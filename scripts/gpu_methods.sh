#!/usr/bin/env bash
# Issue 11's GPU measurements in one sitting, time-boxed to ~9 minutes of one H100/H200:
#   1. methods_ablation: every method alone against the same baseline and seed (a grid, no pruning,
#      ABL_EPOCHS epochs, several workers sharing the GPU); the baseline is the grid's first point
#   2. methods: the TPE + Hyperband search over the methods for STUDY_SECONDS; the study resumes in
#      the same storage in a later slot (trials cut off by the time box are retried there)
#   3. tables: the ablation table from storage, both studies' status and reports (tarred)
# Everything lands in $OUT (default ./gpu-out), at most 8 files: gpu.txt, session.log, methods.db
# (the storage: python search.py --study methods --status --storage sqlite:///gpu-out/methods.db),
# ablation.md, status.txt, reports.tgz, logs.tgz.
#
#   on the device:  source .device/env.sh && bash scripts/gpu_methods.sh        (carry [".device"])
#   dry run on CPU: OUT=/tmp/gm WORKERS="--workers 2" STUDY_ARGS="--max-examples 16" ABL_EPOCHS=1 \
#                   STUDY_EPOCHS=2 ABL_SECONDS=120 STUDY_SECONDS=90 bash scripts/gpu_methods.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
ABL_EPOCHS=${ABL_EPOCHS:-2}           # methods_ablation.toml's own value; ~20 s per full-data epoch on an H200
STUDY_EPOCHS=${STUDY_EPOCHS:-}        # empty: methods.toml's (3)
ABL_SECONDS=${ABL_SECONDS:-240}       # 19 rows, 9 workers: about two rounds of 2 epochs
STUDY_SECONDS=${STUDY_SECONDS:-240}
WORKERS=${WORKERS:---workers-per-gpu 9}
STUDY_WORKERS=${STUDY_WORKERS:-$WORKERS}
STUDY_ARGS=${STUDY_ARGS:-}            # e.g. "--max-examples 16" for a dry run on a CPU
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MTBERT_STORAGE="sqlite:///$OUT/methods.db" MTBERT_CHECKPOINT_DIR=${MTBERT_CHECKPOINT_DIR:-/tmp/mtbert-ckpt}
export MTBERT_ARTIFACT_DIR=${MTBERT_ARTIFACT_DIR:-/tmp/mtbert-artifacts} MTBERT_HEARTBEAT_INTERVAL=10 MTBERT_HEARTBEAT_GRACE=30
T0=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU (dry run)"
  python3 -c "import torch, transformers, optuna; print('torch', torch.__version__, '| transformers', transformers.__version__, '| optuna', optuna.__version__)"
  nproc; uptime
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to session.log, never abort the session
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/session.log"
  timeout --kill-after=20 "$limit" "$@" >> "$OUT/session.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - t0 ))s (t+$(( $(date +%s) - T0 ))s)" | tee -a "$OUT/session.log"
}

# shellcheck disable=SC2086
step methods_ablation "$ABL_SECONDS" python3 search.py --study methods_ablation --epochs "$ABL_EPOCHS" $WORKERS $STUDY_ARGS
# shellcheck disable=SC2086
step methods "$STUDY_SECONDS" python3 search.py --study methods ${STUDY_EPOCHS:+--epochs "$STUDY_EPOCHS"} $STUDY_WORKERS $STUDY_ARGS

python3 scripts/methods_ablation.py --storage "$MTBERT_STORAGE" > "$OUT/ablation.md" 2>> "$OUT/session.log"
{ for s in methods_ablation methods; do echo "=== $s"; timeout 60 python3 search.py --study "$s" --status; done; } \
  > "$OUT/status.txt" 2>&1
mkdir -p /tmp/gpu-methods-reports
for s in methods_ablation methods; do
  timeout 60 python3 search.py --study "$s" --report --out "/tmp/gpu-methods-reports/$s" >> "$OUT/session.log" 2>&1
done
tar czf "$OUT/reports.tgz" -C /tmp gpu-methods-reports 2>/dev/null
python3 - "$OUT/methods.db" <<'PY'
import sqlite3, sys
sqlite3.connect(sys.argv[1]).execute("PRAGMA wal_checkpoint(TRUNCATE)")
PY
rm -f "$OUT"/*.lock "$OUT"/*.db-wal "$OUT"/*.db-shm
tar czf "$OUT/logs.tgz" storage/logs 2>/dev/null
cat "$OUT/ablation.md"
echo "total $(( $(date +%s) - T0 ))s"
