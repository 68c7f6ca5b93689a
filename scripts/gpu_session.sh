#!/usr/bin/env bash
# Everything issue 9 measures on a GPU, in one time-boxed, resumable device call.
#
#   on the device (after ../shared/device/stage.sh here; carry [".device"]):
#     source .device/env.sh && BUDGET_S=540 bash scripts/gpu_session.sh
#   a dry run on a CPU, tiny sizes (~10 min on 2 idle cores):
#     DRY=1 MTBERT_DATA_DIR=../shared/data bash scripts/gpu_session.sh
#
# Stages (STAGES, in this order; each is skipped when less time is left than it needs):
#   verify   bash scripts/gpu_verify.sh first (issue 18): eager vs static vs graphs, correctness before
#            speed, its JSON verdict in docs/gpu/ (in docs.tgz). A failed verdict stops the session
#            here; a passed one is remembered in $STATE, so a rerun on a warm machine goes straight on
#   bench    python -m mtbert.bench: default encoder at batch 16 and bert-base shapes at 16 and 32,
#            reference vs eager vs static vs graphs (+ compile variants at 32): docs/bench/<card>-<date>.jsonl
#   study    python search.py --study lr_dropout as shipped (40 trials x 10 epochs, full data), the
#            workers per GPU search.py chooses (WORKERS_PER_GPU overrides), CUDA MPS when it starts (MPS=0: off).
#            Stopped with SIGTERM before the budget ends: running trials are handed back, and the
#            next run resumes the study (and, on a still-warm machine, the trials' checkpoints)
#   confirm  (not in the default STAGES) python search.py --study lr_dropout --confirm 3 --seeds 3 (CONFIRM_K,
#            CONFIRM_N): the top 3 configurations re-trained with 3 fresh seeds (issue 13), resumable like the
#            study; run it once the study's budget is met, e.g. STAGES="confirm report holdout"
#   report   python search.py --study lr_dropout --report: docs/lr_dropout/
#   holdout  --export-best: the best trial's predictions of data/holdout/*.csv: docs/holdout/lr_dropout/
#   pack     aggregate training throughput of 1, 2, 4, 8 processes on one GPU (PACK_NS), graphs step
#   grids    EPOCHS=10 ablation, seed_lr, seed_dropout grids and docs/results.md from them
#
# State that makes a rerun resume lives in $STATE (default .device/state: git-ignored, kept between
# calls on a warm device machine): the study storages, checkpoints, artifacts, the study's seconds so far.
# A fresh machine resumes from docs/lr_dropout-<card>.db when that is committed (or RESUME_DB=path).
# Everything to bring back goes to $OUT (at most 8 files): session.log, lr_dropout-<card>.db,
# results-<card>.db, bench-<card>-<date>.jsonl, docs.tgz (docs/... paths: `tar xzf docs.tgz` in the
# repo root), logs.tgz (worker logs).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
DRY=${DRY:-0}
BUDGET_S=${BUDGET_S:-540}          # wall clock of the whole script; the device allows 600 s per call
RESERVE_S=${RESERVE_S:-25}         # kept for packing $OUT at the end
STAGES=${STAGES:-verify bench study report holdout pack grids}
OUT=${OUT:-gpu-out}
STATE=${STATE:-.device/state}
EPOCHS=${EPOCHS:-10}
PACK_NS=${PACK_NS:-1 2 4 8}
MPS=${MPS:-1}
mkdir -p "$OUT" "$STATE"
OUT=$(cd "$OUT" && pwd); STATE=$(cd "$STATE" && pwd)
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export MTBERT_CHECKPOINT_DIR="$STATE/ckpt" MTBERT_ARTIFACT_DIR="$STATE/artifacts" MTBERT_CACHE_DIR="$STATE/token-cache"
export MTBERT_HEARTBEAT_INTERVAL=10 MTBERT_HEARTBEAT_GRACE=60

SLOW=${SLOW:-1}                    # multiplies every stage's time limit (a dry run on a busy CPU: 6)
if [ "$DRY" = 1 ]; then  # the same stages at toy sizes, on whatever device there is
  SLOW=${SLOW_DRY:-6}
  # a copy of the data with the first DRY_ROWS rows of every file (holdout/ too): prediction of the
  # full dev, test and holdout files alone takes minutes on a CPU
  src=${MTBERT_DATA_DIR:-data}; dry_data="$STATE/dry-data"
  rm -rf "$dry_data"; mkdir -p "$dry_data"
  (cd "$src" && find . -name '*.csv') | while read -r f; do
    mkdir -p "$dry_data/$(dirname "$f")"; head -n $(( ${DRY_ROWS:-60} + 1 )) "$src/$f" > "$dry_data/$f"
  done
  export MTBERT_DATA_DIR="$dry_data"
  BENCH_RUNS=${BENCH_RUNS:-"--steps 2 --warmup 1 --batch-sizes 8"}
  STUDY_ARGS=${STUDY_ARGS:-"--max-examples 16 --epochs 1 --n-trials 2"}
  GRID_ARGS=${GRID_ARGS:-"--max-examples 16 --epochs 1 --n-trials 2"}
  PACK_NS=${PACK_NS_DRY:-1 2}; PACK_STEPS=2; PACK_WARMUP=1; PACK_BATCH=8
else
  STUDY_ARGS=${STUDY_ARGS:-}
  GRID_ARGS=${GRID_ARGS:-"--epochs $EPOCHS"}
  PACK_STEPS=${PACK_STEPS:-200}; PACK_WARMUP=${PACK_WARMUP:-10}; PACK_BATCH=${PACK_BATCH:-16}
fi

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - RESERVE_S - ($(date +%s) - T0) )); }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
# run NAME NEED_S MAX_S CMD...: run CMD with a time limit of min(MAX_S, time left), or skip it when
# less than NEED_S is left; SIGTERM first (search.py and its workers stop cleanly), SIGKILL 30 s later
run() {
  local name=$1 need=$2 max=$(( $3 * SLOW )); shift 3
  local l; l=$(left)
  if (( l < need )); then log "$name: skipped ($l s left, needs $need)"; return 99; fi
  local limit=$(( max < l ? max : l )) t; t=$(date +%s)
  log "$name ($limit s at most): $*"
  timeout -s TERM -k 30 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  log "$name: exit $rc after $(( $(date +%s) - t )) s"
  return $rc
}

# ------------------------------------------------------------ the machine
if command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1; then
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  CARD=$(echo "$GPU_NAME" | grep -oiE 'h100|h200|a100|l40s|a10|l4' | head -1 | tr 'A-Z' 'a-z'); CARD=${CARD:-gpu}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
else
  GPU_NAME=cpu; CARD=cpu
fi
DATE=$(date -u +%Y-%m-%d)
DB="$STATE/lr_dropout-$CARD.db"
GRID_DB="$STATE/results-$CARD.db"
DOCS="$STATE/docs"   # what lands in the repo's docs/, packed into $OUT/docs.tgz
mkdir -p "$DOCS/docs/bench"
log "start: $GPU_NAME (card '$CARD'), budget $BUDGET_S s, stages: $STAGES, dry run: $DRY"
python3 -c "import torch, transformers, optuna; print('torch', torch.__version__, '| transformers', transformers.__version__, '| optuna', optuna.__version__, '| cuda', torch.cuda.is_available())" >> "$LOG" 2>&1
uptime >> "$LOG"

if [ ! -f "$DB" ]; then  # a fresh machine: resume from the storage a previous call brought back
  SEED_DB=${RESUME_DB:-docs/lr_dropout-$CARD.db}
  if [ -f "$SEED_DB" ]; then cp "$SEED_DB" "$DB"; log "study storage resumed from $SEED_DB"; fi
fi
if [ ! -f "$GRID_DB" ] && [ -f "${RESUME_GRID_DB:-docs/results-$CARD.db}" ]; then
  cp "${RESUME_GRID_DB:-docs/results-$CARD.db}" "$GRID_DB"; log "grid storage resumed"
fi

pids=()
finish() {  # always: make the storages self-contained, pack what goes back
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2> /dev/null
  for db in "$DB" "$GRID_DB"; do
    [ -f "$db" ] || continue
    python3 -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')" "$db"
    cp "$db" "$OUT/"
  done
  cp "$DOCS"/docs/bench/*.jsonl "$OUT/" 2>/dev/null
  tar czf "$OUT/docs.tgz" -C "$DOCS" docs 2>/dev/null
  tar czf "$OUT/logs.tgz" storage/logs 2>/dev/null
  if [ "$MPS_STARTED" = 1 ]; then echo quit | nvidia-cuda-mps-control > /dev/null 2>&1; fi
  log "done: $(ls "$OUT" | tr '\n' ' ')"
}
MPS_STARTED=0
trap finish EXIT

# ------------------------------------------------------------ verify: before anything is measured
if wanted verify && [ ! -f "$STATE/verify-passed" ]; then
  mkdir -p "$DOCS/docs/gpu"
  run verify 120 540 bash scripts/gpu_verify.sh --out "$DOCS/docs/gpu/verify-$CARD-$DATE.json"
  rc=$?
  grep '^\[gpu_verify\]' "$LOG" | tail -n 12
  if [ "$rc" != 0 ]; then
    log "verify: exit $rc: the session stops here (the verdict is in docs.tgz: docs/gpu/verify-$CARD-$DATE.json)"
    exit 1
  fi
  touch "$STATE/verify-passed"
fi

# ------------------------------------------------------------ bench
if wanted bench; then
  JSONL="$DOCS/docs/bench/$CARD-$DATE.jsonl"
  if [ "$DRY" = 1 ]; then
    # shellcheck disable=SC2086
    run bench 30 300 python3 -m mtbert.bench $BENCH_RUNS --jsonl "$JSONL"
  else
    run bench-default 60 120 python3 -m mtbert.bench --batch-sizes 16 --steps 100 --warmup 20 --jsonl "$JSONL"
    run bench-bert-base 90 240 python3 -m mtbert.bench --shapes bert-base --batch-sizes 16 32 --steps 60 \
      --warmup 10 --compile --jsonl "$JSONL"
  fi
  grep -E '^(variant|reference|eager|packed|static|graphs|compile|device:)' "$LOG" | tail -n 30
fi

# ------------------------------------------------------------ MPS (for the study and the packing runs)
if [ "$MPS" = 1 ] && [ "$CARD" != cpu ] && command -v nvidia-cuda-mps-control > /dev/null && (wanted study || wanted pack); then
  if nvidia-cuda-mps-control -d >> "$LOG" 2>&1; then
    MPS_STARTED=1
    # a CUDA process must still work through the daemon; if not, stop it and go on without MPS
    if timeout 90 python3 -c "import torch; x = torch.ones(1024, device='cuda'); torch.cuda.synchronize(); print('MPS ok', float(x.sum()))" >> "$LOG" 2>&1; then
      log "CUDA MPS: on"
    else
      echo quit | nvidia-cuda-mps-control > /dev/null 2>&1; MPS_STARTED=0; log "CUDA MPS: failed its check, off"
    fi
  else
    log "CUDA MPS: nvidia-cuda-mps-control -d failed, off"
  fi
fi

# ------------------------------------------------------------ the study
study_status() { python3 search.py --study lr_dropout --storage "sqlite:///$DB" --status 2>/dev/null | grep -m1 '^study '; }
if wanted study; then
  after=0; for s in report holdout; do wanted $s && after=$(( after + 45 )); done
  l=$(left)
  per_gpu=(); [ -n "${WORKERS_PER_GPU:-}" ] && per_gpu=(--workers-per-gpu "$WORKERS_PER_GPU")
  t=$(date +%s)
  # shellcheck disable=SC2086
  run study 60 $(( l - after )) python3 search.py --study lr_dropout --storage "sqlite:///$DB" "${per_gpu[@]}" $STUDY_ARGS
  spent=$(( $(date +%s) - t ))
  total=$(( $(cat "$STATE/study-seconds" 2>/dev/null || echo 0) + spent ))
  echo "$total" > "$STATE/study-seconds"
  log "study: $spent s this call, $total s over all calls; $(study_status)"
fi

# ------------------------------------------------------------ confirmation under fresh seeds
if wanted confirm && [ -f "$DB" ]; then
  after=0; for s in report holdout; do wanted $s && after=$(( after + 45 )); done
  # the search's overrides ($STUDY_ARGS) must match the study's; the confirmation re-trains recorded configs
  # shellcheck disable=SC2086
  run confirm 60 $(( $(left) - after )) python3 search.py --study lr_dropout --storage "sqlite:///$DB" \
    --confirm "${CONFIRM_K:-3}" --seeds "${CONFIRM_N:-3}" $STUDY_ARGS
  log "confirm: $(python3 search.py --study lr_dropout --storage "sqlite:///$DB" --status 2>/dev/null \
    | grep -m1 -E 'is better than|cannot be told apart|Only one configuration')"
fi

# ------------------------------------------------------------ report and held-out predictions
if wanted report && [ -f "$DB" ]; then
  run report 20 120 python3 search.py --study lr_dropout --storage "sqlite:///$DB" --report --out "$DOCS/docs/lr_dropout"
  cp "$STATE/study-seconds" "$DOCS/docs/lr_dropout/study-seconds.txt" 2>/dev/null
fi
if wanted holdout && [ -f "$DB" ]; then
  rm -rf "$STATE/best"
  if run holdout 20 120 python3 search.py --study lr_dropout --storage "sqlite:///$DB" --export-best "$STATE/best"; then
    mkdir -p "$DOCS/docs/holdout/lr_dropout"
    cp "$STATE"/best/predictions/*-holdout-output.csv "$STATE/best/best_trial.json" "$DOCS/docs/holdout/lr_dropout/" 2>/dev/null
    log "holdout: $(ls "$DOCS/docs/holdout/lr_dropout" | tr '\n' ' ')"
  fi
fi

# ------------------------------------------------------------ packing: N training processes on one GPU
if wanted pack; then
  for n in $PACK_NS; do
    need=$(( 40 + 5 * n )); (( $(left) < need )) && { log "pack: $n processes skipped ($(left) s left)"; break; }
    rm -rf "$STATE/barrier-$n"; pids=()
    for i in $(seq 1 "$n"); do
      variant=graphs; [ "$CARD" = cpu ] && variant=static
      timeout -s TERM -k 10 $(( $(left) > 5 ? $(left) : 5 )) python3 -m mtbert.bench --variants "$variant" \
        --batch-sizes "$PACK_BATCH" --steps "$PACK_STEPS" --warmup "$PACK_WARMUP" --no-check-sync --barrier "$STATE/barrier-$n:$n" \
        --jsonl "$STATE/pack-$n.jsonl" >> "$LOG" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    python3 - "$STATE/pack-$n.jsonl" "$n" "$DOCS/docs/bench/$CARD-$DATE.jsonl" "${MPS_STARTED}" "$PACK_BATCH" <<'PY' | tee -a "$LOG"
import json, os, sys
path, n, out, mps, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
total = sum(r["sentences_per_s"] for r in rows)
summary = {"name": "packed-processes", "processes": n, "measured": len(rows), "mps": mps,
           "sentences_per_s_total": round(total, 1), "variant": rows[0]["name"] if rows else None,
           "batch_size": batch, "device": rows[0]["device"] if rows else None,
           "date": rows[0]["date"] if rows else None}
print(json.dumps(summary))
with open(out, "a") as f:
    f.write(json.dumps(summary) + "\n")
PY
  done
fi

# ------------------------------------------------------------ the report's grids at EPOCHS
if wanted grids; then
  for grid in ablation seed_lr seed_dropout; do
    # shellcheck disable=SC2086
    run "grid-$grid" 60 "$(left)" python3 search.py --study "$grid" --storage "sqlite:///$GRID_DB" $GRID_ARGS || true
  done
  [ -f "$GRID_DB" ] && run results 15 60 python3 search.py --results --storage "sqlite:///$GRID_DB" --out "$DOCS/docs/results.md"
fi
exit 0
