"""Where the C++/CUDA sources are and where their builds go (shared by the CUDA and the CPU
kernel loaders).

The sources ship inside the package, ``oscar_kv/csrc`` (the repository's ``csrc/`` links
there), so any install can build them; ``OSCAR_KV_CSRC`` points elsewhere. Builds go to
``$OSCAR_KV_CACHE`` or ``~/.cache/oscar_kv/<name>_<key>``, outside the package, keyed by a
hash of the sources and of whatever else changes the binary (torch version, flags, target).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def csrc_dir() -> Path:
    env = os.environ.get("OSCAR_KV_CSRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "csrc"


def headers(root: Path) -> list[Path]:
    inc = root / "include" / "oscar"
    return sorted(inc.glob("*.cuh")) + sorted(inc.glob("*.h"))


def build_key(files: Iterable[Path], *extra: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def cache_dir(name: str, key: str) -> Path:
    base = os.environ.get("OSCAR_KV_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "oscar_kv"
    path = root / f"{name}_{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path
