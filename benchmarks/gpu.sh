#!/usr/bin/env bash
# What a GPU machine runs, in one go (JAX and PyTorch; no TensorFlow needed): renorm.testing's conformance check of
# the linen, nnx and PyTorch ports on the GPU, then the PyTorch and JAX layer suites there, side by side with each
# framework's own batch norm. From the repository root, with numpy, jax, flax and torch installed (renorm itself is
# imported from the tree):
#
#     bash benchmarks/gpu.sh [OUT]     (OUT: where the reports go; default benchmarks/results)
#
# Writes OUT/gpu.txt (the device and versions), OUT/testing-gpu.json, OUT/layers_torch-gpu.json and
# OUT/layers_jax-gpu.json; each step has its own time limit (GPU_TIMEOUT seconds, default 240) and a failed step does
# not stop the next. Exits 0 when every step passed, 1 otherwise, 2 (before any step) where PyTorch or JAX sees no GPU.
# The CPU reports are never replaced.
set -u
OUT="${1:-benchmarks/results}"
LIMIT="${GPU_TIMEOUT:-240}"
export PYTHONUNBUFFERED=1
if ! python -c "import jax, torch; assert torch.cuda.is_available() and jax.default_backend() == 'gpu'" 2>/dev/null; then
  echo "benchmarks/gpu.sh: PyTorch or JAX sees no GPU here; run it on a GPU machine (the CPU suites: docs/benchmarks.md)" >&2
  exit 2
fi
mkdir -p "$OUT"
status=0
step() {
  echo "== $*"
  local start=$(date +%s)
  timeout "$LIMIT" "$@" || { echo "== exit $? (limit ${LIMIT} s): $*"; status=1; }
  echo "== $(( $(date +%s) - start )) s"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
step python -m renorm.testing --backend torch --backend linen --backend nnx --device gpu --no-progress \
  --json "$OUT/testing-gpu.json"
step python -m benchmarks.layers_torch --device cuda --out "$OUT/layers_torch-gpu.json"
step python -m benchmarks.layers_jax --out "$OUT/layers_jax-gpu.json"
exit $status
