#!/usr/bin/env bash
# The kernels' proof on a CUDA machine, in one command (the issue's GPU checklist):
#   1. build the CUDA extension (oscar_kv.cuda.jit, cached in ~/.cache/oscar_kv);
#   2. the GPU tests (every op on CUDA and Triton vs the reference) and the kernel tests in
#      compiled Triton (on a GPU kernel_cases.DEVICE is cuda);
#   3. benches/bench_decode.py and benches/bench_extend.py into benches/results/
#      (CSV + PNG + summary, device name and commit in every row);
#   4. benches/gpu_graph_check.py: SGLang (offline Engine, a small random-weight Llama,
#      kv_quant="oscar") with CUDA graphs on vs off gives the same greedy tokens for a batch
#      of prompts that cross a 128-token page while decoding; device and decode tokens/s of
#      both runs into benches/results/gpu_graph_check.csv. Needs SGLang (pip install -e .[sglang]).
# Needs a CUDA build of torch, triton and nvcc; the package installed (pip install -e .).
# Extra arguments go to bench_decode.py (e.g. --batch 1 8 --context 4096 131072).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name())'
echo "commit: $(git rev-parse --short HEAD)"
"$PYTHON" -c 'from oscar_kv.cuda import jit; jit.load(verbose=True)'
"$PYTHON" -m pytest -q -m gpu tests/test_ops_gpu.py
"$PYTHON" -m pytest -q tests/test_triton_decode.py tests/test_triton_quant.py tests/test_ops_extend.py
"$PYTHON" benches/bench_decode.py "$@"
"$PYTHON" benches/bench_extend.py
"$PYTHON" benches/gpu_graph_check.py
