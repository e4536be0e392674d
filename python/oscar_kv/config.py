"""`OscarConfig`: what one KV-cache quantizer does, for OScaR, KIVI and the ablations alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

BLOCK_TOKENS = 128
"""Tokens per page. A page is one residual block and one unit of quantization (docs/design.md)."""

SUPPORTED_BITS = (2, 4)
SUPPORTED_K_GROUPS = (32, 64, 128)
SUPPORTED_V_GROUPS = (16, 32, 64, 128)
NormMode = Literal["token", "head", "none"]
RotationMode = Literal["hadamard", "none"]


@dataclass(frozen=True)
class OscarConfig:
    """Quantization settings of the KV cache.

    bits: code width of K and V (2 or 4).
    k_group: tokens per per-channel K quantization group (32, 64 or 128; divides a page).
    v_group: channels per per-token V quantization group.
    block: tokens per page; fixed at 128, the page size SGLang runs with.
    norm: "token" divides each rotated key token by one L2 norm over all KV heads (the paper),
        "head" by one norm per (token, KV head), "none" keeps K unscaled.
    rotation: "hadamard" rotates Q, K (and V online unless `fold_v`) by H_D / sqrt(D).
    fold_v: V arrives already rotated because H was folded into W_V / W_O, so the cache
        neither rotates V nor un-rotates the attention output.
    sink_bits: beyond the paper (None: off): the first page of every sequence, which holds the
        attention-sink tokens, is quantized at this width (4) or kept exact in bf16 (16); the
        rest at ``bits``. It costs (sink page bytes - page bytes) once per sequence; on
        SmolLM2 2-bit it lowered perplexity and raised passkey/agreement at +6 B/token at 2K
        (benches/results/quality/). A per-sequence policy: `oscar_kv.cache.OscarCache` and the
        paged serving pool (`oscar_kv.sink`, docs/sink-pages.md) apply it; the reference
        quantizer and `PageLayout` hold one page width and refuse it (`page_config` /
        `sink_config` are the two uniform halves).
    """

    bits: int = 2
    k_group: int = 32
    v_group: int = 32
    block: int = BLOCK_TOKENS
    norm: NormMode = "token"
    rotation: RotationMode = "hadamard"
    fold_v: bool = False
    sink_bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.k_group not in SUPPORTED_K_GROUPS:
            raise ValueError(f"k_group must be one of {SUPPORTED_K_GROUPS}, got {self.k_group!r}")
        if self.v_group not in SUPPORTED_V_GROUPS:
            raise ValueError(f"v_group must be one of {SUPPORTED_V_GROUPS}, got {self.v_group!r}")
        if self.block != BLOCK_TOKENS:
            raise ValueError(
                f"block must be {BLOCK_TOKENS} (a page is one quantization block), got {self.block!r}"
            )
        if self.norm not in ("token", "head", "none"):
            raise ValueError(f"norm must be 'token', 'head' or 'none', got {self.norm!r}")
        if self.rotation not in ("hadamard", "none"):
            raise ValueError(f"rotation must be 'hadamard' or 'none', got {self.rotation!r}")
        if self.fold_v and self.rotation != "hadamard":
            raise ValueError("fold_v=True needs rotation='hadamard' (it says V is already rotated)")
        if self.sink_bits is not None and (
            self.sink_bits not in (*SUPPORTED_BITS, 16) or self.sink_bits <= self.bits
        ):
            raise ValueError(
                f"sink_bits must be None, a width in {SUPPORTED_BITS} above bits={self.bits}, "
                f"or 16 (first page exact), got {self.sink_bits!r}"
            )

    @property
    def uniform_pages(self) -> bool:
        """Every page has the same width (what the packed pool and `quantize_kv` hold)."""
        return self.sink_bits is None

    @property
    def page_config(self) -> OscarConfig:
        """The config of every page but a sequence's first."""
        return self if self.sink_bits is None else replace(self, sink_bits=None)

    @property
    def sink_config(self) -> OscarConfig | None:
        """The config of a sequence's first page; None when it is kept exact (16) or off."""
        if self.sink_bits is None or self.sink_bits == 16:
            return None
        return replace(self, bits=self.sink_bits, sink_bits=None)

    def require_uniform_pages(self, what: str) -> None:
        if not self.uniform_pages:
            raise ValueError(
                f"{what} holds pages of one width; OscarConfig(sink_bits={self.sink_bits}) "
                "quantizes a sequence's first page differently (use oscar_kv.cache.OscarCache, "
                "or pass config.page_config / config.sink_config for the two kinds of page)"
            )

    @property
    def rotates_v_online(self) -> bool:
        return self.rotation == "hadamard" and not self.fold_v

    @property
    def method(self) -> str:
        """The method's family name: oscar, kivi, rotation-only or direct-scaling."""
        if self.rotation == "hadamard":
            return "oscar" if self.norm != "none" else "rotation-only"
        return "direct-scaling" if self.norm != "none" else "kivi"

    @property
    def label(self) -> str:
        """A short unique label, e.g. ``oscar-2b-g32-token``."""
        base = f"{self.method}-{self.bits}b-g{self.k_group}-{self.norm}"
        return base if self.sink_bits is None else f"{base}+sink{self.sink_bits}"

    @classmethod
    def kivi(cls, bits: int = 2, k_group: int = 32) -> OscarConfig:
        return cls(bits=bits, k_group=k_group, norm="none", rotation="none")

    @classmethod
    def rotation_only(cls, bits: int = 2, k_group: int = 32) -> OscarConfig:
        return cls(bits=bits, k_group=k_group, norm="none", rotation="hadamard")

    @classmethod
    def direct_scaling(cls, bits: int = 2, k_group: int = 32) -> OscarConfig:
        return cls(bits=bits, k_group=k_group, norm="token", rotation="none")
