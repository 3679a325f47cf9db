#!/usr/bin/env bash
# The project's one prepared GPU run: `make gpu-check OUT=DIR` (or `bash scripts/gpu-check.sh DIR`)
# on a machine with an NVIDIA GPU, torch preinstalled and no network.
#
#   1. installs what the machine lacks from ./.whl (fetched beforehand with
#      ../shared/tools/gpu-wheels.sh) into a private folder, never touching torch, and makes
#      this checkout importable as nmcompile with its `nm` backend entry point;
#   2. prints the facts the kernels rely on (benchmarks/gpu_facts.py -> DIR/facts.json: versions,
#      blob shapes, whether the cached cuSPARSELt plans serve and which library they bound);
#   3. records the compressed layout torch._cslt_compress writes here and runs the Triton
#      kernels' self-check against it (benchmarks/gpu_layout.py -> DIR/*-layout.json.gz, to
#      commit under tests/data/cslt_layout/, and DIR/layout_check.json);
#   4. runs the CUDA tests (Triton kernels, cached plans against torch, a captured graph,
#      reduce-overhead training recording once), and the sparse-kernel tests through the CPU
#      model of cuSPARSELt under this machine's torch (tests/cuda, tests/kernels ->
#      DIR/tests.log);
#   5. times cuSPARSELt's alg ids, eager and from CUDA graphs (benchmarks/gpu_algs.py ->
#      DIR/algs.json);
#   6. runs benchmarks/gpu.py --quick $BENCH_ARGS (DIR/bench.log, DIR/gpu.json with the
#      headline figures: per-step sparsify time, FFN and GPT-2-medium steps in default mode and
#      under reduce-overhead, auto / sparse / MVUE, host time per sparse GEMM, peak memory;
#      DIR/cost_rule.json, DIR/step_summary.txt).
# Everything is also logged to DIR/check.log. Without a GPU it stops after step 2 with exit
# code 3. Stage time limits (seconds): PROBE_TIMEOUT (default 90), TEST_TIMEOUT (240),
# ALGS_TIMEOUT (90), BENCH_TIMEOUT (420). BENCH_ARGS trims the benchmark, e.g.
# BENCH_ARGS="--configs auto" (nm configs whose names hold "auto") or
# BENCH_ARGS="--parts sparsify,host,ffn,step".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "gpu-check: $*" | tee -a "$OUT/check.log"; }
: > "$OUT/check.log"

. scripts/gpu-env.sh  # wheels from ./.whl, this checkout importable with its nm backend
log "$("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

start=$SECONDS
"$PY" benchmarks/gpu_facts.py --out "$OUT" 2>&1 | tee -a "$OUT/check.log"
facts_rc=${PIPESTATUS[0]}
if [ "$facts_rc" -eq 3 ]; then
  log "no CUDA GPU visible: stopping before the CUDA tests and the benchmark"
  exit 3
fi
log "facts: exit $facts_rc in $((SECONDS - start)) s"

start=$SECONDS
timeout "${PROBE_TIMEOUT:-90}" "$PY" benchmarks/gpu_layout.py --out "$OUT" 2>&1 \
  | tee -a "$OUT/check.log"
probe_rc=${PIPESTATUS[0]}
log "layout probe and self-check: exit $probe_rc in $((SECONDS - start)) s"

start=$SECONDS
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda \
  tests/kernels tests/test_shared_graphs.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -n 40 "$OUT/tests.log"
log "CUDA tests: exit $tests_rc in $((SECONDS - start)) s"

start=$SECONDS
timeout "${ALGS_TIMEOUT:-90}" "$PY" benchmarks/gpu_algs.py --out "$OUT" 2>&1 | tail -n 30
algs_rc=${PIPESTATUS[0]}
log "alg ids: exit $algs_rc in $((SECONDS - start)) s"

start=$SECONDS
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/gpu.py --quick --out "$OUT" \
  --dump "$NMCOMPILE_CACHE_DIR/nm_dump" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
bench_rc=$?
tail -n 60 "$OUT/bench.log"
log "benchmark: exit $bench_rc in $((SECONDS - start)) s"
cp "$NMCOMPILE_CACHE_DIR/cost_rule.json" "$OUT/" 2>/dev/null
summary="$NMCOMPILE_CACHE_DIR/nm_dump/step_nm_auto/summary.txt"
[ -f "$summary" ] && cp "$summary" "$OUT/step_summary.txt"

for rc in $facts_rc $probe_rc $tests_rc $algs_rc $bench_rc; do
  [ "$rc" -ne 0 ] && exit "$rc"
done
exit 0
