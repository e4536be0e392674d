#!/usr/bin/env bash
# Installs SGLang 0.5.23 next to oscar-kv WITHOUT letting pip replace the installed torch.
#
#   bash scripts/install_sglang.sh        # after scripts/install.sh; PYTHON=... to override
#
# SGLang 0.5.23 pins torch==2.14.1 (CUDA 13 build), transformers==5.19.0, tokenizers==0.23.2
# and ~40 GPU-only packages (flashinfer, sglang-kernel, deep-gemm, ...). On a CPU machine (and
# to keep the CPU build of torch 2.13 that scripts/install.sh installs) the wheel is installed
# with --no-deps and then the pure-Python/CPU dependencies that the server and the
# cache/attention modules import, each pinned exactly, among them SGLang's own pins of
# transformers and tokenizers (oscar-kv's ranges include them). The installed torch is passed
# as a pin too, so the resolver can only keep it, never replace it.
# `sgl_kernel` (no wheel for CPU) and torchvision are handled at import time by
# oscar_kv.sglang._testing / the plugin's CPU shims, not installed here.
# Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
log() { printf '[install_sglang] %s\n' "$*"; }

TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
# SGLang 0.5.23's pins (also in scripts/install.sh).
SGLANG_PINS=(transformers==5.19.0 tokenizers==0.23.2)
log "keeping torch==$TORCH; SGLang's pins ${SGLANG_PINS[*]}"

log "pip install --no-deps sglang==0.5.23 xgrammar==0.2.7"
"$PYTHON" -m pip install -q --no-deps sglang==0.5.23 xgrammar==0.2.7

DEPS=(
    aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 anthropic==2.12.0
    apache-tvm-ffi==0.1.11 blobfile==3.0.0 compressed-tensors==0.18.0 dill==0.4.1
    distro==1.9.0 docstring_parser==0.18.0 easydict==1.14 einops==0.8.2 fastapi==0.165.0
    frozenlist==1.8.0 interegular==0.3.3 jiter==0.19.0 loguru==0.7.3 lxml==6.1.3
    msgspec==0.22.0 multidict==7.2.1 nvidia-ml-py==13.615.71 openai-harmony==0.0.4
    opentelemetry-api==1.45.2 partial-json-parser==0.2.1.1.post7 prometheus_client==0.26.0
    propcache==0.5.4 pybase64==1.5.1 pycryptodomex==3.24.2 python-multipart==0.0.34
    pyzmq==27.3.0 sentencepiece==0.2.1 setproctitle==1.3.8 soundfile==0.13.1
    starlette==1.10.0 tiktoken==0.14.0 uvicorn==0.54.0 uvloop==0.23.0 watchfiles==1.3.0
    xxhash==4.1.0 yarl==1.25.1 zstandard==0.25.0 openai==2.8.0 httpx==0.28.1 httpcore==1.0.9
    scipy==1.17.1 jsonschema==4.26.0 orjson==3.13.0 ipython==8.12.3 psutil==7.2.2 pydantic==2.13.4
    datasets==5.2.0 multiprocess==0.70.19 pandas==3.1.1 pyarrow==26.0.1
    pillow==13.0.0 python-dateutil==2.9.0.post0
)
# SGLang imports triton at start-up; torch's CPU build does not bring it (its CUDA builds
# do). The range of oscar-kv's gpu/dev extras: an installed one in it is kept.
TRITON="triton>=3.6,<3.10"
log "pip install ${#DEPS[@]} pinned dependencies, $TRITON"
"$PYTHON" -m pip install -q "${DEPS[@]}" "$TRITON" "torch==$TORCH" "${SGLANG_PINS[@]}"

# SGLang's router, for scale-out (docs/scale-out.md; the `router` extra): its dependencies
# are among the pins above, so this adds the one package.
ROUTER=sglang-router==0.3.2
log "pip install $ROUTER"
"$PYTHON" -m pip install -q "$ROUTER" "${DEPS[@]}" "torch==$TORCH" "${SGLANG_PINS[@]}"

# Every version SGLang's metadata states holds, except torch==2.14.1 (the CPU build is kept);
# its GPU-only packages, left out on purpose, show as "not installed" and are not checked.
conflicts=$("$PYTHON" -m pip check 2>/dev/null | grep -E '^(sglang|oscar-kv) .* has requirement ' \
    | grep -v ' has requirement torch==' || true)
if [ -n "$conflicts" ]; then
    printf '[install_sglang] error: versions SGLang or oscar-kv exclude:\n%s\n' "$conflicts" >&2
    exit 1
fi

"$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch, transformers
from oscar_kv.sglang._testing import import_sglang_cache
import_sglang_cache()  # fails here, not in a skipped test, when a dependency is missing
print("[install_sglang] sglang", md.version("sglang"), "torch", torch.__version__,
      "transformers", transformers.__version__)
EOF
