#!/usr/bin/env bash
# The GPU proof on a CUDA machine. A lent machine gives one command at most 10 minutes (15 in
# all per issue), so the checks come in stages that each fit in one call:
#
#   bash scripts/gpu_check.sh kernels   # ~5 min: build the CUDA extension (oscar_kv.cuda.jit,
#                                       # cached in ~/.cache/oscar_kv); every op on CUDA and
#                                       # Triton vs the reference (tests/test_ops_gpu.py); the
#                                       # kernel tests in compiled Triton (kernel_cases.DEVICE
#                                       # is cuda on a GPU)
#   bash scripts/gpu_check.sh graphs    # ~3 min: benches/gpu_graph_check.py, SGLang (offline
#                                       # Engine, a random-weight Llama, kv_quant="oscar") with
#                                       # CUDA graphs on vs off: same greedy tokens across a
#                                       # page boundary; tokens/s of both into
#                                       # benches/results/gpu_graph_check.csv (needs SGLang)
#   bash scripts/gpu_check.sh bench     # benches/bench_decode.py + bench_extend.py into
#                                       # benches/results/ (CSV + PNG + summary, device name and
#                                       # commit in every row); extra arguments go to
#                                       # bench_decode.py (e.g. --batch 1 8 --context 4096 131072)
#   bash scripts/gpu_check.sh all       # the three in that order
#
# Needs a CUDA build of torch, triton and nvcc; the package installed (pip install -e .).
# Every stage prints the device, the commit and its own wall time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
stage=${1:-all}
[ $# -gt 0 ] && shift

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name())'
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

run_stage() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "[gpu_check] stage ${name}"
    "$@"
    echo "[gpu_check] stage ${name} done in $((SECONDS - t0)) s"
}

kernels() {
    "$PYTHON" -c 'from oscar_kv.cuda import jit; jit.load(verbose=True)'
    "$PYTHON" -m pytest -q -m gpu tests/test_ops_gpu.py
    "$PYTHON" -m pytest -q tests/test_triton_decode.py tests/test_triton_quant.py \
        tests/test_ops_extend.py
}

graphs() {
    "$PYTHON" benches/gpu_graph_check.py
}

bench() {
    "$PYTHON" benches/bench_decode.py "$@"
    "$PYTHON" benches/bench_extend.py
}

case "$stage" in
    kernels) run_stage kernels kernels ;;
    graphs) run_stage graphs graphs ;;
    bench) run_stage bench bench "$@" ;;
    all)
        run_stage kernels kernels
        run_stage graphs graphs
        run_stage bench bench "$@"
        ;;
    *)
        echo "usage: bash scripts/gpu_check.sh [kernels|graphs|bench|all] [bench_decode args]" >&2
        exit 2
        ;;
esac
