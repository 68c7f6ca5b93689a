#!/usr/bin/env bash
# Correctness of the opt-in training steps (static, graphs) against the eager step, then their speed:
# one device call of at most 9 minutes (VERIFY_LIMIT_S; 30 on a CPU), writing one JSON verdict under docs/gpu/
# (verify-<card>-<date>.json; also into $OUT when the device call sets it). See scripts/gpu_verify.py
# for the checks and docs/gpu-steps.md for what the verdict decides.
#
#   on the device:  bash scripts/gpu_verify.sh                       (source .device/env.sh first if staged)
#   on a CPU:       MTBERT_DATA_DIR=../shared/data bash scripts/gpu_verify.sh
#                   runs what a CPU can check (eager vs static), lists what needs a GPU, exits 0 if nothing failed
# Exit status: 0 when no check failed, 1 when one did, 124 when it ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi > /dev/null && nvidia-smi > /dev/null 2>&1; then LIMIT=${VERIFY_LIMIT_S:-540}
else LIMIT=${VERIFY_LIMIT_S:-1800}; fi  # a CPU (a shared 2-core test machine: tens of minutes)
timeout -s TERM -k 15 "$LIMIT" python3 scripts/gpu_verify.py "$@"
rc=$?
if [ "$rc" = 124 ]; then echo "[gpu_verify] ran out of its $LIMIT s: no verdict" >&2; fi
exit $rc
