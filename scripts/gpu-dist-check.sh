#!/usr/bin/env bash
# Data-parallel training on a GPU machine (torch preinstalled, no network, wheels in ./.whl):
# `make gpu-dist-check OUT=DIR` (or `bash scripts/gpu-dist-check.sh DIR`).
#
#   1. the distributed CUDA tests (tests/test_fsdp.py, tests/test_distributed.py): FSDP2 on one
#      GPU with cuSPARSELt against the emulation; the 2-GPU NCCL variants where 2 GPUs exist
#      (skipped with the reason elsewhere) -> DIR/tests.log;
#   2. the cost rule's self-check and the compiled-MLP checks of tests/cuda (the searched
#      cuSPARSELt algorithm in training ops) -> DIR/cuda_tests.log;
#   3. examples/fsdp2.py (then --resume) and examples/ddp.py under torchrun on every GPU
#      -> DIR/fsdp2.log, DIR/fsdp2_resume.log, DIR/ddp.log.
# Everything is also logged to DIR/check.log. Without a GPU it stops with exit code 3. Stage
# time limits (seconds): TEST_TIMEOUT (default 150), CUDA_TIMEOUT (150), EXAMPLE_TIMEOUT (120).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_dist_out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "gpu-dist-check: $*" | tee -a "$OUT/check.log"; }
: > "$OUT/check.log"

. scripts/gpu-env.sh  # wheels from ./.whl, this checkout importable with its nm backend
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
log "$("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'), $gpus GPU(s)"
if [ "$gpus" -eq 0 ]; then
  log "no CUDA GPU visible"
  exit 3
fi

stage() {  # stage NAME LIMIT LOG COMMAND...: run, keep the tail, log the exit code and time
  local name=$1 limit=$2 file=$3; shift 3
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$file" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$file"
  log "$name: exit $rc in $((SECONDS - start)) s"
  return $rc
}

failed=0
stage "distributed tests" "${TEST_TIMEOUT:-150}" tests.log "$PY" -m pytest -q -rs \
  -p no:cacheprovider tests/test_fsdp.py tests/test_distributed.py \
  -k "cuda or nccl or cusparselt" || failed=1
stage "cost rule and compiled MLP" "${CUDA_TIMEOUT:-150}" cuda_tests.log "$PY" -m pytest -q \
  -rs -p no:cacheprovider tests/cuda -k "cost_rule or compiled_mlp" || failed=1
run=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus")
stage "examples/fsdp2.py" "${EXAMPLE_TIMEOUT:-120}" fsdp2.log "${run[@]}" examples/fsdp2.py \
  --steps 10 --out "$OUT/fsdp2" || failed=1
stage "examples/fsdp2.py --resume" "${EXAMPLE_TIMEOUT:-120}" fsdp2_resume.log "${run[@]}" \
  examples/fsdp2.py --steps 5 --out "$OUT/fsdp2" --resume || failed=1
stage "examples/ddp.py" "${EXAMPLE_TIMEOUT:-120}" ddp.log "${run[@]}" examples/ddp.py \
  --steps 10 --out "$OUT/ddp" || failed=1
rm -rf "$OUT/fsdp2"/step_* "$OUT/ddp/checkpoint.pt"  # keep the logs and dumps, not the weights
exit $failed
