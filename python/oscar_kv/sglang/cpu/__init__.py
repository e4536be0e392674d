"""Serving SGLang 0.5.23 on a CPU-only machine (no ``sgl_kernel`` wheel, no AVX-512/AMX).

What stands between ``python -m sglang.launch_server`` and a working server on such a machine
is listed, with measurements, in the project's notes (``notes/sglang-on-this-cpu.md``). This
package removes each obstacle without editing SGLang's files:

- `standins`: import-time stand-ins for ``sgl_kernel`` (the few ops a dense Llama/Qwen model
  calls on CPU, in torch; everything else raises NotImplementedError naming the op) and for
  ``torchvision`` (only where it is not installed, and invisible to availability probes so
  transformers keeps its image code off).
- `boot`: what the ``oscar_kv_sglang_cpu.pth`` file installed with the package runs at
  interpreter start when ``SGLANG_USE_CPU_ENGINE=1``: the stand-ins (they must be in place
  before SGLang's modules run ``from sgl_kernel import ...``, in every process SGLang spawns)
  and thread defaults. It imports neither torch nor SGLang.
- `gguf`: GGUF weights on CPU (SGLang binds its GGUF matmuls only on CUDA/MUSA/NPU): each
  quantized weight is dequantized once after loading and served by a dense matmul; and the
  rotary-style fix for llama.cpp's permuted Q/K rows in Llama GGUF files.

- `tokenizer`: a tokenizer directory built once from a GGUF file's metadata and cached under
  ``~/.cache/oscar_kv/tokenizers`` (SGLang cannot load a tokenizer from a ``.gguf`` path).

The plugin (`oscar_kv.sglang.plugin`) applies the GGUF hooks in every SGLang process when
serving on CPU. Under ``--kv-quant oscar --device cpu`` its argument hook sets
``SGLANG_USE_CPU_ENGINE=1`` itself in the launching process, before SGLang spawns its
schedulers, and installs the stand-ins there (docs/cpu-serving.md). Set
``OSCAR_KV_CPU_BOOT=0`` to turn the stand-ins and hooks off.
"""
