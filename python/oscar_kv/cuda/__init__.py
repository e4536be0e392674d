"""CUDA kernels of oscar-kv, built from ``csrc/`` on first use by `oscar_kv.cuda.jit`."""
