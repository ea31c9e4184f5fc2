#!/usr/bin/env bash
# One borrowed-GPU session, start to finish, in one command (a lent machine is held for minutes):
#
#   bash benchmarks/gpu_session.sh [BUDGET_S]
#
# 1. installs what the machine's image lacks from wheels carried in .whl/ (no network there:
#    diffusers, omegaconf, importlib_metadata, open-clip-torch for CLIP's BPE file), into /tmp/site;
# 2. `benchmarks.gpu_check --smoke`: if jaxvision does not run on the image's flax / optax / orbax,
#    the versions it is tested with (carried too) go first on the path, and the smoke runs again;
# 3. `benchmarks.gpu_check`: versions, and cuDNN attention against the fp32 reference on every shape
#    the models use (is the fused kernel in the program, is it right);
# 4. `benchmarks.run --gpu --no-peers --budget-s BUDGET_S` (default 360): the suite, most-informative
#    first, its JSON and markdown rewritten after every case.
# Everything lands in $OUT (the device tool's return folder) or build/gpu-session.
# Fetch the wheels first: benchmarks/NOTES.md, "The GPU run: how to repeat it".
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-build/gpu-session}
BUDGET=${1:-360}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
t0=$(date +%s)

wheels() { ls .whl/"$1"-*.whl; }
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(wheels diffusers) $(wheels omegaconf) $(wheels importlib_metadata) $(wheels open_clip_torch) || exit 1
export PYTHONPATH=/tmp/site:$PWD

if ! $PY -m benchmarks.gpu_check --smoke 2>&1 | tee "$OUT_DIR/smoke.log"; then :; fi
if ! grep -q "^smoke: jaxvision runs" "$OUT_DIR/smoke.log"; then
  echo "== the image's flax/optax/orbax do not run jaxvision: using the tested versions" | tee -a "$OUT_DIR/smoke.log"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-tested \
    $(wheels flax) $(wheels optax) $(wheels orbax_checkpoint) $(wheels chex) || exit 1
  export PYTHONPATH=/tmp/site-tested:/tmp/site:$PWD
  $PY -m benchmarks.gpu_check --smoke 2>&1 | tee -a "$OUT_DIR/smoke.log"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv >"$OUT_DIR/nvidia-smi.csv" 2>&1

$PY -m benchmarks.gpu_check --out "$OUT_DIR/gpu_check.json" 2>&1 | tee "$OUT_DIR/gpu_check.log"
echo "== setup and checks took $(($(date +%s) - t0)) s"
$PY -m benchmarks.run --gpu --no-peers --budget-s "$BUDGET" --out "$OUT_DIR/gpu.json" \
  --note "borrowed GPU, benchmarks/gpu_session.sh, budget ${BUDGET} s" 2>"$OUT_DIR/suite.log"
echo "== session took $(($(date +%s) - t0)) s"
tail -n 40 "$OUT_DIR/suite.log"
