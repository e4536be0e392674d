"""SGLang integration of oscar-kv (needs ``sglang``; see the ``sglang`` extra).

Submodules import SGLang themselves, so importing this package does not:
- ``radix``: ``OscarRadixCache``, SGLang's prefix cache over the Rust radix tree, and
  ``register_backend()`` for ``--radix-cache-backend oscar``.
"""
