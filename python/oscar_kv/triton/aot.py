"""Compile the Triton kernels for a GPU architecture without a GPU (compile check only).

The interpreter accepts code a real compile rejects (layouts, dot shapes, unsupported
casts), so CI also lowers every kernel to a cubin for sm_80 and sm_90a. Run as
``TRITON_INTERPRET=0 python -m oscar_kv.triton.aot 90`` (it must not be imported into a
process whose kernels were created in interpreter mode).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from oscar_kv import OscarConfig
from oscar_kv.layout import PageLayout
from oscar_kv.triton.api import EXTEND_WARPS, _layout_args, extend_block_tokens
from oscar_kv.triton.bf16 import bf16_split_kernel
from oscar_kv.triton.decode import decode_split_kernel, merge_kernel
from oscar_kv.triton.extend import dequantize_prefix_kernel, extend_kernel, extend_ws_kernel
from oscar_kv.triton.quant import dequantize_pages_kernel, fwht_kernel, quantize_pages_kernel

CONFIGS = [
    (OscarConfig(), 8, 128),
    (OscarConfig(bits=4, k_group=64, norm="head"), 4, 64),
    (OscarConfig(k_group=128, norm="none", rotation="none"), 2, 256),
]


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object], cap: int, **opts):
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError:  # older Triton spells it `constants`
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constants=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)


def _params(fn, constexprs: dict[str, object], types: dict[str, str]) -> dict[str, str]:
    """Signature in parameter order; unnamed scalars are i32, as Triton specializes ints
    that fit (strides, counts) at launch."""
    return {p: ("constexpr" if p in constexprs else types.get(p, "i32")) for p in fn.arg_names}


def ptxas_usage(ptx: str, cap: int) -> str:
    """Registers and spills of a kernel per ptxas -v ('' when no suitable ptxas is found)."""
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    arch = f"sm_{cap}{'a' if cap == 90 else ''}"
    for name in ("ptxas-blackwell", "ptxas"):
        exe = os.path.join(base, name)
        if not os.path.exists(exe):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            r = subprocess.run(
                [exe, "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        finally:
            os.unlink(f.name)
        if r.returncode == 0:
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spill = re.search(r"(\d+) bytes spill stores", r.stderr)
            return (
                f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spill"
            )
    return ""


def compile_all(cap: int, full: bool = True) -> list[tuple[str, float, int, str]]:
    """Compile the kernels for representative shapes: (name, seconds, cubin bytes, usage).

    ``full=False``: the Qwen3-8B-shaped config only, fast enough for the default test run.
    """
    out = []
    ptr = {
        "pool_ptr": "*u8",
        "src_ptr": "*i32",
        "page_ids_ptr": "*i32",
        "pt_ptr": "*i32",
        "npages_ptr": "*i32",
        "tidx_ptr": "*i32",
        "tlen_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "mid_o_ptr": "*fp32",
        "mid_m_ptr": "*fp32",
        "mid_l_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "qk_scale": "fp32",
        "NSPLIT": "i32",
        "n_rows": "i32",
        "pages_per_split": "i32",
    }
    ptr.update({"cu_ptr": "*i32", "work_req_ptr": "*i32", "work_q0_ptr": "*i32"})
    bf = {"kn_ptr": "*bf16", "vn_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "q_ptr": "*bf16", "kt_ptr": "*bf16",
          "vt_ptr": "*bf16", "out_ptr": "*bf16", "x_ptr": "*bf16", "k_out_ptr": "*fp32",
          "v_out_ptr": "*fp32", "ws_k_ptr": "*fp16", "ws_v_ptr": "*fp16", "st_m_ptr": "*fp32",
          "st_l_ptr": "*fp32", "st_acc_ptr": "*fp32"}  # fmt: skip
    types = {**ptr, **bf}

    def run(label, fn, constexprs, **opts):
        t0 = time.perf_counter()
        k = _compile(fn, _params(fn, constexprs, types), constexprs, cap, **opts)
        secs = time.perf_counter() - t0
        out.append((label, secs, len(k.asm["cubin"]), ptxas_usage(k.asm["ptx"], cap)))

    for cfg, h, d in CONFIGS if full else CONFIGS[:1]:
        layout = PageLayout.of(cfg, h, d)
        la = _layout_args(layout)
        rot = {"ROT_K": cfg.rotation == "hadamard", "ROT_V": cfg.rotates_v_online}
        tag = f"{cfg.label}-h{h}-d{d}"
        run(f"quantize[{tag}]", quantize_pages_kernel, {**la, "H": h, **rot},
            num_warps=8 if d <= 128 else 16, enable_fp_fusion=False)  # fmt: skip
        run(f"dequantize[{tag}]", dequantize_pages_kernel, {**la, "H": h, **rot}, num_warps=4)
        for group, precise in ((4, False), (1, True), (8, False)) if full else ((4, False),):
            dec = {**la, "HKV": h, "G": group, "GP": 16, "PRECISE": precise,
                   "ROT_Q": cfg.rotation == "hadamard", "BT": 32}  # fmt: skip
            run(f"decode[{tag}-g{group}{'-precise' if precise else ''}]", decode_split_kernel,
                dec, num_warps=4)  # fmt: skip
            gp = triton.next_power_of_2(group)
            run(f"merge[{tag}-g{group}]", merge_kernel,
                {"HKV": h, "G": group, "GP": gp, "D": d, "LOG2D": int(math.log2(d)),
                 "ROT_V": cfg.rotates_v_online, "HAS_LSE": group == 4}, num_warps=4)  # fmt: skip
        for group in (4, 1, 8) if full else (4,):
            gp = triton.next_power_of_2(group)
            ext = {**la, "G": group, "GP": gp, "BM": extend_block_tokens(group, d),
                   "PRECISE": False, "ROT_Q": cfg.rotation == "hadamard",
                   "ROT_V": cfg.rotates_v_online, "BT": 32}  # fmt: skip
            run(f"extend[{tag}-g{group}]", extend_kernel,
                {**ext, "SPLIT": group == 4, "HAS_LSE": group == 4},
                num_warps=EXTEND_WARPS)  # fmt: skip
            ws = {k: ext[k] for k in ("G", "GP", "BM", "D", "LOG2D", "NORM", "ROT_Q", "ROT_V",
                                      "PRECISE", "BT")}  # fmt: skip
            run(f"extend_ws[{tag}-g{group}]", extend_ws_kernel,
                {**ws, "OFF_N": la["OFF_N"], "H": h, "FIRST": group != 8, "LAST": group != 1,
                 "HAS_LSE": group == 4},
                num_warps=EXTEND_WARPS)  # fmt: skip
        deq = {k: la[k] for k in ("OFF_KC", "OFF_VC", "OFF_KS", "OFF_KZ", "OFF_VS", "OFF_VZ", "D",
                                  "BITS", "KG", "VG")}  # fmt: skip
        run(f"dequantize_prefix[{tag}]", dequantize_prefix_kernel,
            {**deq, "H": h, "BM": extend_block_tokens(4, d), "TC": 32}, num_warps=4)  # fmt: skip
        run(f"fwht[d{d}]", fwht_kernel, {"ROWS": max(1, min(64, 2048 // d)), "D": d,
                                          "LOG2D": int(math.log2(d))}, num_warps=4)  # fmt: skip
        run(f"bf16_decode[h{h}-d{d}]", bf16_split_kernel,
            {"HKV": h, "G": 4, "GP": 16, "D": d, "PAGE": 128, "INTERP": False, "BT": 32}, num_warps=4)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caps", nargs="*", type=int, default=[80, 90], help="e.g. 80 90")
    ap.add_argument("--quick", action="store_true", help="main config only")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    for cap in args.caps:
        for label, secs, size, usage in compile_all(cap, full=not args.quick):
            arch = f"sm_{cap}{'a' if cap == 90 else ''}"
            print(f"{arch} {label}: {size} B cubin, {usage or 'no ptxas -v'}, {secs:.1f} s")


if __name__ == "__main__":
    main()
