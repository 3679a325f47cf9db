# Sourced by the GPU scripts (gpu-check.sh, gpu-dist-check.sh) from the repository root, with
# PY (the python), OUT (the output folder) and log() set: installs what the GPU machine lacks
# from ./.whl into a private folder, never touching torch, and makes this checkout importable
# as nmcompile with its `nm` backend entry point. Exits with code 1 if that fails.
site=${NMCOMPILE_GPU_SITE:-/tmp/nmcompile-site}
mkdir -p "$site"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl 2>&1 | tail -n 5 | tee -a "$OUT/check.log"
fi
# the `nm` backend's entry point, for this checkout (no build, no install into the environment)
dist="$site/nmcompile-0.0.0+checkout.dist-info"
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: nmcompile\nVersion: 0.0.0+checkout\n' > "$dist/METADATA"
printf '[torch_dynamo_backends]\nnm = nmcompile.backend:nm_backend\n' > "$dist/entry_points.txt"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export NMCOMPILE_CACHE_DIR=${NMCOMPILE_CACHE_DIR:-$(mktemp -d)}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, ortools, nmcompile; assert 'nm' in torch._dynamo.list_backends()" \
    2>> "$OUT/check.log"; then
  log "cannot import torch, ortools and nmcompile (with its nm backend); run"
  log "../shared/tools/gpu-wheels.sh in this checkout first (it fills ./.whl)"
  exit 1
fi
