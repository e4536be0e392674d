"""`OscarConfig`: what one KV-cache quantizer does, for OScaR, KIVI and the ablations alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BLOCK_TOKENS = 128
"""Tokens per page. A page is one residual block and one unit of quantization (DESIGN.md)."""

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
    """

    bits: int = 2
    k_group: int = 32
    v_group: int = 32
    block: int = BLOCK_TOKENS
    norm: NormMode = "token"
    rotation: RotationMode = "hadamard"
    fold_v: bool = False

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
        return f"{self.method}-{self.bits}b-g{self.k_group}-{self.norm}"

    @classmethod
    def kivi(cls, bits: int = 2, k_group: int = 32) -> OscarConfig:
        return cls(bits=bits, k_group=k_group, norm="none", rotation="none")

    @classmethod
    def rotation_only(cls, bits: int = 2, k_group: int = 32) -> OscarConfig:
        return cls(bits=bits, k_group=k_group, norm="none", rotation="hadamard")

    @classmethod
    def direct_scaling(cls, bits: int = 2, k_group: int = 32) -> OscarConfig:
        return cls(bits=bits, k_group=k_group, norm="token", rotation="none")
