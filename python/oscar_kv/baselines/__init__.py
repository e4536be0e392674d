"""The methods oscar-kv is compared against, as named configurations of the same quantizer.

KIVI (per-channel K, per-token V, no rotation, no norm), rotation only, direct scaling
(norm without rotation) and OScaR are one code path with different `OscarConfig`s; bf16
is the unquantized cache (``None``).
"""

from __future__ import annotations

from oscar_kv.config import OscarConfig

BF16 = "bf16"


def method_configs(
    bits: tuple[int, ...] = (2, 4), k_groups: tuple[int, ...] = (32, 128)
) -> dict[str, OscarConfig | None]:
    """Every compared method by label: bf16, KIVI, rotation-only, direct scaling, OScaR
    (norm "token" and "head"), at each bit width and K group size."""
    methods: dict[str, OscarConfig | None] = {BF16: None}
    for b in bits:
        for g in k_groups:
            for cfg in (
                OscarConfig.kivi(b, g),
                OscarConfig.rotation_only(b, g),
                OscarConfig.direct_scaling(b, g),
                OscarConfig(bits=b, k_group=g, norm="token"),
                OscarConfig(bits=b, k_group=g, norm="head"),
            ):
                methods[cfg.label] = cfg
    return methods
