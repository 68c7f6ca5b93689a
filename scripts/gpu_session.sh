#!/usr/bin/env bash
# Everything this project measures on a GPU, in one sitting (~9 minutes on one H200):
#   1. trainer benchmark: bert-base shapes, batch 16 and 32 per task, naive reference vs ours
#      (fused, packed, compiled); then one default training run of the default encoder
#   2. trials/hour: the seed_lr grid with 1 worker, the seed_dropout grid with 5 workers packed
#      on the same GPU (identical per-trial work: all extensions on, batch 16, same epochs)
#   3. the ablation grid, 7 workers packed
# Everything lands in $OUT (default ./gpu-out): gpu.txt, bench.log, session.log, gpu.db (the
# studies' storage: python search.py --results --storage sqlite:///gpu-out/gpu.db) and logs.tgz.
#   bash scripts/gpu_session.sh              # EPOCHS=10 for the report's real epochs (~6x longer)
set -uo pipefail
OUT=${OUT:-gpu-out}
EPOCHS=${EPOCHS:-2}
BENCH_ARGS=${BENCH_ARGS:---shapes bert-base --batch-sizes 16 32 --compile --packing --steps 60 --warmup 10}
STUDY_ARGS=${STUDY_ARGS:-}   # e.g. "--max-examples 16" for a dry run on a CPU
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
export MTBERT_STORAGE="sqlite:///$OUT/gpu.db" MTBERT_CHECKPOINT_DIR=${MTBERT_CHECKPOINT_DIR:-/tmp/mtbert-ckpt}
export MTBERT_ARTIFACT_DIR=${MTBERT_ARTIFACT_DIR:-/tmp/mtbert-artifacts} MTBERT_HEARTBEAT_INTERVAL=10 MTBERT_HEARTBEAT_GRACE=30

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, optuna; print('torch', torch.__version__, '| transformers', transformers.__version__, '| optuna', optuna.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to session.log, never abort the session
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/session.log"
  timeout --kill-after=20 "$limit" "$@" >> "$OUT/session.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/session.log"
}

# shellcheck disable=SC2086
step bench 170 python3 -m mtbert.bench $BENCH_ARGS
grep -A12 '^variant' "$OUT/session.log" | tee "$OUT/bench.log"
# shellcheck disable=SC2086
step train 60 python3 -m mtbert.train --epochs "$EPOCHS" --quiet $STUDY_ARGS
# shellcheck disable=SC2086
step seed_lr 110 python3 search.py --study seed_lr --epochs "$EPOCHS" --workers 1 $STUDY_ARGS
# shellcheck disable=SC2086
step seed_dropout 90 python3 search.py --study seed_dropout --epochs "$EPOCHS" --workers-per-gpu 5 $STUDY_ARGS
# shellcheck disable=SC2086
step ablation 120 python3 search.py --study ablation --epochs "$EPOCHS" --workers-per-gpu 7 $STUDY_ARGS
python3 - "$OUT/gpu.db" <<'PY'
import sqlite3, sys
sqlite3.connect(sys.argv[1]).execute("PRAGMA wal_checkpoint(TRUNCATE)")
PY
rm -f "$OUT"/*.lock
tar czf "$OUT/logs.tgz" storage/logs 2>/dev/null
tail -n 40 "$OUT/session.log"
