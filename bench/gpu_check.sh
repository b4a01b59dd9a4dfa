#!/usr/bin/env bash
# GPU check of the Triton kernels (tersa/kernels): the kernel tests compiled, not interpreted, on
# CUDA tensors (launchers with fixed tiles, the dispatcher with autotuned configs), QuantLinear's
# forward through them (its CUDA tests in tests/quant/test_qlinear_dispatch.py), then the
# benchmark table of bench/kernels.py. Fails on the first error, on a test that was skipped (the
# Triton path did not run), or when a step outlives its time limit. About 5 minutes on an H100 or
# H200 with a cold Triton cache (compiling ~120 kernel variants dominates); 8 at most.
#
# Usage: bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter; default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

"$PY" - <<'PYEOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible; run this on a GPU machine")
import triton

print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
PYEOF

export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1
log=$(mktemp)
trap 'rm -f "$log"' EXIT

fail_on_skips() {
    if grep -Eq "[0-9]+ skipped" "$log"; then
        echo "gpu_check: FAILED: tests were skipped, so a Triton path did not run on the GPU" >&2
        exit 1
    fi
}

echo "== kernel tests, compiled (tests/kernels, gpu and not gpu)"
timeout 330 "$PY" -m pytest -q -rs -p no:cacheprovider tests/kernels -m "gpu or not gpu" | tee "$log"
fail_on_skips

# Only the gpu tests: the others force the Triton path on CPU tensors, which needs the interpreter.
# The 4-bit variants are the ones compiled above, so this step mostly re-tunes (~1 minute at most).
echo "== QuantLinear through the kernels, compiled (tests/quant/test_qlinear_dispatch.py -m gpu)"
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/quant/test_qlinear_dispatch.py -m gpu \
    | tee "$log"
fail_on_skips

echo "== benchmark (bench/kernels.py)"
timeout 150 "$PY" bench/kernels.py
echo "gpu_check: OK"
