#!/usr/bin/env bash
# Builds build/flax-peers-venv: the last Hugging Face Flax implementations, the JAX peers of the
# benchmark suite (python -m benchmarks.run). Their pins conflict with jaxvision's own
# (transformers 5 and diffusers >= 0.40 removed Flax), so they live in a venv of their own:
#
#   bash benchmarks/setup_flax_peers.sh          # CPU: the versions transformers 4.57 declares for Flax
#   bash benchmarks/setup_flax_peers.sh --gpu    # GPU: a CUDA 12 jax from PyPI (see below)
#
# CPU pins: transformers 4.57's own `[flax]` extra declares jax/jaxlib <= 0.4.13, flax <= 0.7.0,
# optax <= 0.1.4 (dependency_versions_table.py); diffusers 0.39 accepts any jax >= 0.4.1. jaxlib
# 0.4.13 needs numpy < 2 and a scipy that still has the functions it imports. No torch: the peers
# initialise random weights of the same configs in JAX (speed does not depend on the values).
#
# GPU: jaxlib 0.4.13's CUDA wheels are not on PyPI, so --gpu takes the newest jax that still runs
# flax 0.8 (0.4.30, `jax[cuda12]` from PyPI), outside transformers' declared range; the peer scripts
# print the versions they ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=build/flax-peers-venv
PYTHON=${PYTHON:-python3.11}
PINS=$(mktemp)
trap 'rm -f "$PINS"' EXIT
cat >"$PINS" <<'PINS_EOF'
transformers==4.57.6
diffusers==0.39.0
numpy<2
scipy<1.13
huggingface-hub<1.0
PINS_EOF
if [[ "${1:-}" == "--gpu" ]]; then
  printf 'jax==0.4.30\njaxlib==0.4.30\nflax==0.8.5\noptax==0.2.2\n' >>"$PINS"
  JAX='jax[cuda12]'
else
  printf 'jax==0.4.13\njaxlib==0.4.13\nflax==0.7.0\noptax==0.1.4\norbax-checkpoint<0.3\n' >>"$PINS"
  JAX='jax'
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$PINS" "$JAX" jaxlib flax optax transformers diffusers numpy scipy
"$VENV/bin/python" - <<'PY'
import diffusers, flax, jax, transformers
from diffusers import FlaxUNet2DConditionModel  # noqa: F401
from transformers import FlaxViTForImageClassification  # noqa: F401
print(f"flax peers ready: transformers {transformers.__version__}, diffusers {diffusers.__version__}, "
      f"jax {jax.__version__}, flax {flax.__version__}, devices {jax.devices()}")
PY
