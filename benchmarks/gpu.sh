#!/usr/bin/env bash
# The GPU check of this project in one go, on a CUDA node: the CUDA tests (none may
# skip; they include the compiled call), then benchmarks/gpu.py (model, eager and
# compiled in reduce-overhead mode, PIMD through i-PI in each transport, HTTP), which
# prints one table, then the committee table (benchmarks/committee.py). The timeouts
# are ceilings that add up to 580 s, inside one 600 s device command; the compiles
# (tens of seconds per shape) are most of the time. Fails
# loudly where torch sees no GPU.
#
#   bash benchmarks/gpu.sh            # PYTHON=/path/to/python to use another interpreter
#   GPU_BENCH_ARGS=--no-compile bash benchmarks/gpu.sh   # eager rows only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: error: torch sees no CUDA device ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))" >&2
    exit 1
fi
export CACE_REFERENCE_DIR=${CACE_REFERENCE_DIR:-$(cd .. && pwd)/shared/reference}
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
# -rs lists skips; a CUDA test that skips on a GPU node is a failure here
out=$(timeout 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1) || { echo "$out"; exit 1; }
echo "$out" | tail -n 3
if echo "$out" | grep -q "SKIPPED"; then echo "benchmarks/gpu.sh: error: CUDA tests skipped" >&2; exit 1; fi
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of flags
timeout 300 "$PY" benchmarks/gpu.py ${GPU_BENCH_ARGS:-}
timeout 80 "$PY" benchmarks/committee.py --device cuda --rounds 10
