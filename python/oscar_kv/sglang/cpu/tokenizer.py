"""A tokenizer directory for a GGUF file, built once and cached outside the package.

SGLang 0.5.23 reads a tokenizer from ``--tokenizer-path``; given only a ``.gguf`` model path its
loader fails (it hands the file's parent directory, a ``Path``, to the hub client). transformers
can build the tokenizer (vocabulary, merges, special tokens, chat template) from the GGUF
metadata: ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``. `gguf_tokenizer_dir` does that
once per file and saves the result with ``save_pretrained`` under
``$OSCAR_KV_CACHE/tokenizers/<stem>-<key>`` (default ``~/.cache/oscar_kv``), the key a hash of
the file's resolved path, size and modification time, so a replaced file gets a new directory.
The directory is written under a temporary name and renamed into place: concurrent builders
(several servers starting at once) never see a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# What save_pretrained writes that SGLang's loader needs; a directory without it is rebuilt.
MARKER = "tokenizer_config.json"


def cache_root() -> Path:
    """``$OSCAR_KV_CACHE`` or ``~/.cache/oscar_kv`` (the same root `oscar_kv.sglang.server`
    keeps its logs in)."""
    return Path(os.environ.get("OSCAR_KV_CACHE", Path.home() / ".cache" / "oscar_kv"))


def cache_key(gguf: str | os.PathLike[str]) -> str:
    path = Path(gguf).resolve()
    st = path.stat()
    raw = f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def tokenizer_dir_for(gguf: str | os.PathLike[str], root: Path | None = None) -> Path:
    """Where the tokenizer of ``gguf`` is (or will be) cached."""
    path = Path(gguf)
    return (root or cache_root()) / "tokenizers" / f"{path.stem}-{cache_key(path)}"


def has_sidecar_tokenizer(gguf: str | os.PathLike[str]) -> bool:
    """A ``tokenizer_config.json`` beside the file: SGLang loads that one itself."""
    return (Path(gguf).parent / MARKER).is_file()


def gguf_tokenizer_dir(gguf: str | os.PathLike[str], root: Path | None = None) -> Path:
    """The tokenizer directory of a local GGUF file, built on first use."""
    path = Path(gguf).resolve()
    target = tokenizer_dir_for(path, root)
    if (target / MARKER).is_file():
        return target
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    try:
        tmp.replace(target)
    except OSError:  # another process renamed its copy into place first
        if not (target / MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target
