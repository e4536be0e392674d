"""V Hadamard fold into an SGLang-shaped attention module (qkv_proj + o_proj); no SGLang."""

from __future__ import annotations

import torch

from oscar_kv.ref import fwht
from oscar_kv.sglang import weights

HQ, HK, D, HIDDEN = 4, 2, 64, 96


class Attn(torch.nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = HQ, HK, D
        self.qkv_proj = torch.nn.Linear(HIDDEN, (HQ + 2 * HK) * D, bias=bias)
        self.o_proj = torch.nn.Linear(HQ * D, HIDDEN, bias=False)


class Model(torch.nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"self_attn": Attn()}) for _ in range(n)
        )


def test_fold_rotates_v_and_keeps_output():
    torch.manual_seed(0)
    weights.reset()
    m = Model().double()
    attn = m.layers[0]["self_attn"]
    x = torch.randn(5, HIDDEN, dtype=torch.float64)
    a = torch.randn(5, HQ, D, dtype=torch.float64)  # an attention output in V's basis
    v_rows = slice((HQ + HK) * D, None)
    v_before = attn.qkv_proj(x)[:, v_rows].view(5, HK, D)
    o_before = attn.o_proj(a.reshape(5, -1))
    qk_before = attn.qkv_proj(x)[:, : (HQ + HK) * D]
    assert weights.fold_v_into_model(m) and weights.fold_enabled()
    v_after = attn.qkv_proj(x)[:, v_rows].view(5, HK, D)
    torch.testing.assert_close(v_after, fwht(v_before))  # the cache sees H v
    # attention mixes tokens only, so its output is H a; W_O' undoes H
    torch.testing.assert_close(attn.o_proj(fwht(a).reshape(5, -1)), o_before)
    torch.testing.assert_close(attn.qkv_proj(x)[:, : (HQ + HK) * D], qk_before)  # Q, K untouched
    weights.reset()


def test_quantized_weights_fall_back_to_online_rotation():
    weights.reset()
    m = Model()
    attn = m.layers[1]["self_attn"]
    attn.o_proj.weight = torch.nn.Parameter(
        torch.zeros_like(attn.o_proj.weight, dtype=torch.int8), requires_grad=False
    )
    before = m.layers[0]["self_attn"].qkv_proj.weight.clone()
    assert not weights.fold_v_into_model(m) and not weights.fold_enabled()
    assert torch.equal(m.layers[0]["self_attn"].qkv_proj.weight, before)  # all or nothing
