"""Static performance model of the decode and extend kernels, from their sm_90a SASS.

Every row is an estimate, not a measurement: no GPU runs here. For each kernel:

1. Compile it for sm_90a without a GPU: the Triton kernels through Triton's compiler (the
   signature of `oscar_kv.triton.aot`, bf16 q, plus the tt.divisibility=16 marks Triton's
   launcher gives aligned pointers and 16-divisible integers at a serving launch: without
   them the loads would not vectorize; `NOT_DIVISIBLE` lists the exceptions), the CUDA
   decode by nvcc (-O3 -arch=sm_90a -cubin -lineinfo and the flags torch's extension build
   passes) on a one-line instantiation of the ``decode_split_kernel<__nv_bfloat16, D, BITS>``
   template of csrc/include/oscar/decode.cuh. No kernel source is changed.
2. Registers from the cubin (``cuobjdump -res-usage``), spill bytes from ``ptxas -v``.
3. SASS with source lines (``nvdisasm -g``). Loops are the backward branches (a branch
   whose target is at or before it; one whose range spans an EXIT is an out-of-line path
   jumping back, not a loop), nested by address range; the main loop is the one whose backward branch sits on the kernel's per-page loop
   header in the source (`Spec.loop`), i.e. the loop over the tokens of a page: the hottest
   body. Inner loops are weighted by their trip count per main-loop iteration (`Spec.trips`,
   from the shapes; the unroll factor nvcc chose is read from a marker instruction's count
   in the SASS body). Straight-line code in the body counts once per iteration, also where
   a forward branch could skip it: only the CUDA loops have such code (the guards and the
   unrolled remainder copies nvcc puts around its unrolled loops, a few % of the body).
4. Instruction mix per iteration by class (`CLASSES`), times the warps that run it (every
   warp runs the whole body; warp-strided CUDA loops use their per-warp average trip count),
   divided by the KV bytes the iteration consumes: one KV head's share of the packed page
   (codes + scales/zeros + norms, page_bytes / kv_heads, times BT / 128 tokens), or the
   bf16 K and V bytes for the baseline.

Issue-rate ceiling (``est_hbm_fraction``): an SM issues at most 4 warp-instructions per
clock (4 schedulers x 1); the GPU then sustains 4 x SMs x clock warp-instr/s, hence
bytes/s = that / instr_per_kv_byte, and est_hbm_fraction = min(1, bytes/s / HBM bandwidth).

Assumptions (it is an upper bound, not a prediction):
- one warp-instruction covers 32 lanes; counts are warp-level SASS instructions, predicated
  ones included (a predicated-off instruction still takes its issue slot);
- latency, occupancy, memory-level parallelism, bank conflicts, L2 and the split-KV merge
  are not modeled; the tail (bf16 residual tokens) and prologue/epilogue are not counted;
- warps never diverge (the out-of-line divergence paths, BRA.DIV targets, are not counted);
- H100 SXM and H200: 132 SMs at 1.98 GHz boost; HBM 3.35 TB/s (H100 SXM), 4.8 TB/s (H200).

A second, tighter bound (``est_hbm_fraction_pipes``, also an estimate) charges each class to
its pipe at the per-SM rates of the CUDA C++ Programming Guide's throughput table for
compute capability 9.0 (lanes per clock per SM: fp32 FFMA/FMUL/FADD and fp16x2 128;
integer IMAD, IADD3, LOP3/SHF/PRMT, compares 64; int<->float conversions I2F/F2I/F2F and
MUFU 16; shared/global load/store and shuffles 32, 64- and 128-bit shared accesses costing
2 and 4; one m16n8k16 HMMA per SM per clock, the dense fp16 peak; I2FP/F2FP and HADD2.F32
taken as ALU/FMA-pipe ops) and takes the busiest pipe (or issue, whichever is larger),
assuming perfect overlap.

For extend the bytes are per program. The fused kernel ('triton') dequantizes the whole prefix
in every work item of BM new tokens, so per unique prefix byte multiply its instr_per_kv_byte
by the work items; it now serves only requests of one work item. The others' pages are
dequantized once ('triton-ws-dequant', per packed byte) into an fp16 workspace that each work
item reads ('triton-ws', per workspace byte).

    python benches/kernel_static.py            # writes benches/results/kernels_static.csv
                                               # and kernels_static_summary.md
    python benches/kernel_static.py --quick    # the GQA 4 / D 128 / 2-bit rows only

A full run (neither --quick nor --only) also carries the rows of earlier Triton decode
versions ('triton-v1', 'triton-v2', ...) over from the committed CSV, unchanged.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"
CSV_PATH = RESULTS / "kernels_static.csv"
SUMMARY_PATH = RESULTS / "kernels_static_summary.md"
CSRC = ROOT / "csrc"
NOTE = "estimate, not a measurement"

DEVICES = {
    "H100-SXM": {"sms": 132, "clock_hz": 1.98e9, "hbm_bytes_s": 3.35e12},
    "H200": {"sms": 132, "clock_hz": 1.98e9, "hbm_bytes_s": 4.8e12},
}
ISSUE_PER_SM_CLK = 4  # warp-instructions per clock per SM (4 schedulers x 1)

# Display classes, first match wins. An entry with a dot matches that opcode and its
# variants (IMAD.MOV.U32), one without matches the opcode root exactly; any other
# uniform-datapath opcode (UIADD3, ULDC, ...) is "uniform". "conv" includes the bit
# manipulation (LOP3, PRMT) that code extraction costs; HADD2.F32 is the fp16->fp32 convert.
CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("gmem", ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "ATOMG", "ATOM", "RED", "LD", "ST",
              "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "CCTL")),
    ("local", ("LDL", "STL")),
    ("smem", ("LDS", "STS", "LDSM", "STSM", "ATOMS")),
    ("tensor", ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "WARPGROUP")),
    ("conv", ("HADD2.F32", "I2F", "I2FP", "F2F", "F2FP", "F2I", "I2I", "FRND", "PRMT",
              "LOP3")),
    ("fp32", ("FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I", "FMNMX", "FSETP",
              "FSEL", "FSET", "FCHK", "FSWZADD")),
    ("fp16", ("HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "HSET2")),
    ("move", ("IMAD.MOV", "MOV", "MOV32I", "CS2R", "S2R", "S2UR", "LDC", "P2R", "R2P",
              "R2UR")),
    ("int", ("IMAD", "IADD3", "IADD", "VIADD", "VIADDMNMX", "VIMNMX", "IMNMX", "LEA", "SHF",
             "SHL", "SHR", "ISETP", "IABS", "SEL", "POPC", "FLO", "BREV", "IMUL", "ISCADD",
             "SGXT", "BMSK", "PLOP3", "IDP")),
    ("mufu", ("MUFU",)),
    ("warp", ("SHFL", "VOTE", "REDUX", "MATCH")),
    ("bar", ("BAR", "MEMBAR", "DEPBAR", "SYNCS", "ERRBAR", "FENCE", "ARRIVES")),
    ("ctrl", ("BRA", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "NOP", "WARPSYNC", "YIELD", "JMP",
              "BREAK", "KILL", "BPT")),
]  # fmt: skip
CLASS_NAMES = [c for c, _ in CLASSES] + ["uniform", "other"]

COLUMNS = ["op", "impl", "device_model", "bits", "gqa", "head_dim", "regs", "spill_bytes",
           "instr_per_kv_byte", "est_hbm_fraction", "note", "est_hbm_fraction_pipes",
           "issue_gb_per_s", "dominant", "binding_pipe", "warps", "tokens_per_iter",
           "kv_bytes_per_iter", "warp_instr_per_iter", "loop_sass_instr", "main_loop",
           "top_ops", *[f"mix_{c}" for c in CLASS_NAMES]]  # fmt: skip


def op_class(op: str) -> str:
    root = op.split(".")[0]
    for name, entries in CLASSES:
        for e in entries:
            if ("." in e and (op == e or op.startswith(e + "."))) or root == e:
                return name
    if len(root) > 1 and root[0] == "U":
        return "uniform"
    return "other"


# ---- pipe model (secondary bound): warp-instructions per clock per SM, and per-op cost.
PIPE_RATE = {"fma": 4.0, "alu": 2.0, "imad": 2.0, "xu": 0.5, "lsu": 1.0, "tensor": 1.0}


def op_pipe(op: str) -> tuple[str, float] | None:
    """(pipe, cost in pipe slots) of one warp-instruction; None: issue slot only."""
    root = op.split(".")[0]
    if root in ("FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I", "HFMA2", "HADD2",
                "HMUL2"):  # fmt: skip
        return "fma", 1.0
    if root == "IMAD" or root == "IMUL":
        return "imad", 1.0
    if root in ("MUFU", "I2F", "F2I", "F2F", "I2I", "FRND", "POPC", "FLO", "BREV"):
        return "xu", 1.0
    if root in ("LDS", "STS", "ATOMS", "LDSM", "STSM"):
        width = 4.0 if ".128" in op else 2.0 if ".64" in op else 1.0
        if root in ("LDSM", "STSM"):
            width = 4.0 if ".X4" in op else 2.0 if ".X2" in op else 1.0
        return "lsu", width
    if root in ("LDG", "STG", "LDL", "STL", "LDGSTS", "ATOMG", "RED", "SHFL"):
        return "lsu", 1.0
    if root == "HMMA":
        # m16n8k16 = 4096 flop: one per SM per clock at the dense fp16 peak; m16n8k8 half.
        return "tensor", 1.0 if ".16816" in op else 0.5
    if root == "HGMMA":
        # m64nNk16 = 2048 N flop per warpgroup, issued by each of its 4 warps: N / 8 each.
        m = re.search(r"64x(\d+)x\d+", op)
        return "tensor", int(m.group(1)) / 8 if m else 8.0
    if root in ("IADD3", "VIADD", "LOP3", "SHF", "PRMT", "LEA", "ISETP", "SEL", "IMNMX",
                "VIMNMX", "FMNMX", "FSETP", "FSEL", "FSET", "PLOP3", "P2R", "R2P", "MOV",
                "IABS", "I2FP", "F2FP", "SGXT", "BMSK", "CS2R", "HMNMX2", "HSETP2"):  # fmt: skip
        return "alu", 1.0
    return None


# ---- SASS parsing.
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LOC = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    args: str
    file: str
    line: int
    target: int | None = None  # branch target address


@dataclass
class Loop:
    start: int
    end: int  # address of the backward branch
    file: str
    line: int
    children: list[Loop] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and self is not other


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``nvdisasm -g`` output (one function), with source lines and branch
    targets resolved from the .L_x labels."""
    out: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    file, line = "", 0
    raw_targets: list[str | None] = []
    for ln in text.splitlines():
        if m := _LOC.search(ln):
            file, line = m.group(1), int(m.group(2))
            continue
        if m := _LABEL.match(ln):
            pending.append(m.group(1))
            continue
        if m := _INSTR.search(ln):
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            args = m.group(4)
            t = re.search(r"`\((\.L_x_\d+)\)", args)
            out.append(
                Instr(addr, (m.group(2) or "").strip(), m.group(3), args.strip(), file, line)
            )
            raw_targets.append(t.group(1) if t else None)
    for ins, lab in zip(out, raw_targets, strict=True):
        if lab is not None:
            ins.target = labels.get(lab)
    return out


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loops from backward conditional branches, nested by address containment; top level
    first. Branches after the last EXIT's straight-line code (out-of-line paths that jump
    back into the body) do not start loops: a loop may not contain an EXIT."""
    exits = [i.addr for i in instrs if i.op == "EXIT"]
    by_start: dict[int, Loop] = {}
    for i in instrs:
        if not i.op.startswith("BRA") or i.target is None or i.target >= i.addr:
            continue
        if any(i.target <= e <= i.addr for e in exits):
            continue
        lp = by_start.get(i.target)
        if lp is None or i.addr > lp.end:
            by_start[i.target] = Loop(i.target, i.addr, i.file, i.line)
    loops = sorted(by_start.values(), key=lambda lp: (lp.start, -lp.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for lp in loops:
        while stack and not stack[-1].contains(lp):
            stack.pop()
        (stack[-1].children if stack else roots).append(lp)
        stack.append(lp)
    return roots


def walk(loops: list[Loop]):
    for lp in loops:
        yield lp
        yield from walk(lp.children)


@cache
def source_line(path: str, line: int) -> str:
    try:
        return Path(path).read_text().splitlines()[line - 1].strip()
    except (OSError, IndexError):
        return ""


# ---- kernels.
@dataclass
class Trip:
    """Trip count of an inner loop per iteration of its enclosing loop (per warp, averaged
    over the warps for warp-strided loops)."""

    header: str  # regex on the source text of the loop's backward-branch line
    n: Callable[[dict], float]  # source-level iterations, from the shape dict
    marker: tuple[str, int] | None = None  # (opcode prefix, count per source iteration)


@dataclass
class Spec:
    op: str
    impl: str
    bits: int
    gqa: int
    head_dim: int
    loop: tuple[str, str]  # (source file name, regex on the main loop header's text)
    warps: int
    tokens_per_iter: int
    kv_bytes_per_iter: float
    trips: list[Trip] = field(default_factory=list)
    shape: dict = field(default_factory=dict)
    extra_note: str = ""


@dataclass
class Compiled:
    sass: str
    regs: int
    spill_bytes: int


def triton_bin(name: str) -> str:
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name) or shutil.which(f"/usr/local/cuda/bin/{name}")
    if not found:
        raise RuntimeError(f"{name} not found (Triton's bundled CUDA tools or /usr/local/cuda)")
    return found


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc") if os.path.exists(p)),
        None,
    )  # fmt: skip


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-4000:]}")
    return r


def _ptxas_info(log: str, fn: str | None = None) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas -v output (of function ``fn`` if given)."""
    blocks = log.split("Compiling entry function")[1:] or [log]
    for b in blocks:
        if fn is None or fn in b.splitlines()[0]:
            regs = re.search(r"Used (\d+) registers", b)
            spill = re.search(r"(\d+) bytes spill stores", b)
            return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1
    raise RuntimeError(f"no ptxas -v entry for {fn}")


def _disasm(cubin: bytes) -> tuple[str, int]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        sass = _run([triton_bin("nvdisasm"), "-g", "-c", str(path)]).stdout
        res = _run([triton_bin("cuobjdump"), "-res-usage", str(path)]).stdout
    regs = re.search(r"REG:(\d+)", res)
    return sass, int(regs.group(1)) if regs else -1


# Arguments a serving launch does not pass 16-divisible (or 16-byte aligned); Triton's
# launcher marks every other pointer and integer argument tt.divisibility=16 for the shapes
# served (torch allocations are 16-byte aligned, strides are multiples of head_dim >= 64,
# page_bytes a multiple of 16), and that is what lets it vectorize the loads.
NOT_DIVISIBLE = {
    "pt_stride",
    "pages_per_split",
    "work_q0_ptr",
    "qk_scale",
    "NSPLIT",
    "n_rows",
    "n_cols",
    "col0",
}


def compile_triton(fn, constexprs: dict, num_warps: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget

    from oscar_kv.triton import aot

    types = {"pool_ptr": "*u8", "pt_ptr": "*i32", "npages_ptr": "*i32", "tidx_ptr": "*i32",
             "tlen_ptr": "*i32", "seq_lens_ptr": "*i32", "cu_ptr": "*i32",
             "work_req_ptr": "*i32", "work_q0_ptr": "*i32", "mid_o_ptr": "*fp32",
             "mid_m_ptr": "*fp32", "mid_l_ptr": "*fp32", "qk_scale": "fp32", "ws_k_ptr": "*fp16",
             "ws_v_ptr": "*fp16", "st_m_ptr": "*fp32", "st_l_ptr": "*fp32",
             "st_acc_ptr": "*fp32"}  # fmt: skip
    for p in ("q_ptr", "kt_ptr", "vt_ptr", "k_ptr", "v_ptr", "kn_ptr", "vn_ptr", "out_ptr"):
        types[p] = "*bf16"
    sig = aot._params(fn, constexprs, types)
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if sig[name] != "constexpr" and not sig[name].startswith("fp") and name not in NOT_DIVISIBLE
    }
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    except TypeError:  # older Triton spells it `constants`
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constants=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    sass, regs = _disasm(k.asm["cubin"])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        # Triton's bundled ptxas-blackwell reads newer PTX than its plain ptxas (as in aot).
        errors = []
        for name in ("ptxas-blackwell", "ptxas"):
            try:
                cmd = [triton_bin(name), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull]
                log = _run(cmd)
                break
            except RuntimeError as e:
                errors.append(str(e))
        else:
            raise RuntimeError("\n".join(errors))
    finally:
        os.unlink(f.name)
    _, spill = _ptxas_info(log.stderr)
    return Compiled(sass, regs, spill)


# What torch.utils.cpp_extension passes to nvcc (tests/test_cuda_compile.py).
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]  # fmt: skip


def compile_cuda_decode(d: int, bits: int) -> Compiled:
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "inst.cu"
        src.write_text(
            '#include "oscar/decode.cuh"\n'
            f"template __global__ void oscar::decode_split_kernel<__nv_bfloat16, {d}, {bits}>"
            "(oscar::DecodeArgs);\n"
        )
        cubin = Path(tmp) / "inst.cubin"
        log = _run([nvcc, *NVCC_FLAGS, "-arch=sm_90a", "-cubin", "-lineinfo", "-Xptxas", "-v",
                    f"-I{CSRC / 'include'}", str(src), "-o", str(cubin)])  # fmt: skip
        sass, regs = _disasm(cubin.read_bytes())
    ptx_regs, spill = _ptxas_info(log.stderr, "decode_split_kernel")
    return Compiled(sass, regs if regs > 0 else ptx_regs, spill)


# ---- the model.
def analyze(spec: Spec, comp: Compiled) -> dict:
    instrs = parse_sass(comp.sass)
    loops = find_loops(instrs)
    fname, pattern = spec.loop
    main = [
        lp for lp in walk(loops)
        if Path(lp.file).name == fname and re.search(pattern, source_line(lp.file, lp.line))
    ]  # fmt: skip
    if not main:
        listing = "; ".join(
            f"{Path(lp.file).name}:{lp.line} {source_line(lp.file, lp.line)!r}"
            for lp in walk(loops)
        )
        raise RuntimeError(f"{spec.impl} {spec.op}: no loop at {fname} /{pattern}/: {listing}")
    top = max(main, key=lambda lp: lp.end - lp.start)
    notes: list[str] = []

    def body(lp: Loop) -> list[Instr]:
        return [i for i in instrs if lp.start <= i.addr <= lp.end]

    def own(lp: Loop) -> list[Instr]:
        return [
            i for i in body(lp)
            if not any(c.start <= i.addr <= c.end for c in lp.children)
        ]  # fmt: skip

    # Trip counts of inner loops: loops of one source header share its iterations; the
    # most-unrolled copies take n // u, the remainder loops (smaller u) n % u_max.
    trips: dict[int, float] = {}
    groups: dict[int, list[tuple[Loop, int]]] = {}
    for lp in walk(top.children):
        text = source_line(lp.file, lp.line)
        k = next((k for k, t in enumerate(spec.trips) if re.search(t.header, text)), None)
        if k is None:
            trips[id(lp)] = 1.0
            notes.append(f"inner loop {Path(lp.file).name}:{lp.line} unmodeled (1 trip)")
            continue
        t = spec.trips[k]
        u = 1
        if t.marker is not None:
            pfx, per = t.marker
            cnt = sum(1 for i in own(lp) if i.op.startswith(pfx))
            u = max(1, cnt // per)
        groups.setdefault(k, []).append((lp, u))
    for k, members in groups.items():
        n = spec.trips[k].n(spec.shape)
        umax = max(u for _, u in members)
        for lp, u in members:
            if umax == 1:  # not unrolled: a per-warp average may be fractional (G / 4)
                trips[id(lp)] = n
            else:
                trips[id(lp)] = n // umax if u == umax else (n % umax) // u

    def weighted(lp: Loop) -> Counter:
        c = Counter(i.op for i in own(lp))
        for ch in lp.children:
            for op, v in weighted(ch).items():
                c[op] += v * trips[id(ch)]
        return c

    per_warp = weighted(top)
    ops = Counter({op: v * spec.warps for op, v in per_warp.items()})
    total = sum(ops.values())
    mix = Counter()
    for op, v in ops.items():
        mix[op_class(op)] += v
    pipes = Counter()
    for op, v in ops.items():
        pc = op_pipe(op)
        if pc is not None:
            pipes[pc[0]] += v * pc[1]
    pipe_clk = {p: v / PIPE_RATE[p] for p, v in pipes.items()}
    pipe_clk["issue"] = total / ISSUE_PER_SM_CLK
    binding = max(pipe_clk, key=pipe_clk.get)
    return {
        "instr_per_kv_byte": total / spec.kv_bytes_per_iter,
        "warp_instr_per_iter": total,
        "loop_sass_instr": len(body(top)),
        "main_loop": f"{fname}:{top.line} [{top.start:#x},{top.end:#x}]"
        + (f" {len(list(walk(top.children)))} inner" if top.children else ""),
        "mix": mix,
        "clk_per_iter_pipes": pipe_clk[binding],
        "binding_pipe": binding,
        "notes": notes,
        "ops": ops,
        "loops": [(lp, trips.get(id(lp)), lp is top) for lp in walk(loops)],
    }


def rows_for(spec: Spec, comp: Compiled, verbose: bool = False) -> list[dict]:
    a = analyze(spec, comp)
    if verbose:
        for lp, t, is_main in a["loops"]:
            tag = " MAIN" if is_main else "" if t is None else f" x{t:g}"
            print(f"  loop {Path(lp.file).name}:{lp.line} [{lp.start:#x},{lp.end:#x}] "
                  f"{(lp.end - lp.start) // 16 + 1} instr{tag} "
                  f"{source_line(lp.file, lp.line)!r}", file=sys.stderr)  # fmt: skip
        ops = sorted(a["ops"].items(), key=lambda kv: -kv[1])
        print("  " + ", ".join(f"{op} {v:g}" for op, v in ops), file=sys.stderr)
    mix = a["mix"]
    dominant = max((c for c in CLASS_NAMES if c != "ctrl"), key=lambda c: mix[c])
    top = sorted(a["ops"].items(), key=lambda kv: (-kv[1], kv[0]))[:6]
    top_ops = "; ".join(f"{op} {v:g}" for op, v in top)
    out = []
    for dev, p in DEVICES.items():
        rate = ISSUE_PER_SM_CLK * p["sms"] * p["clock_hz"]
        bps = rate / a["instr_per_kv_byte"]
        bps_pipes = spec.kv_bytes_per_iter * p["sms"] * p["clock_hz"] / a["clk_per_iter_pipes"]
        note = "; ".join([NOTE, *([spec.extra_note] if spec.extra_note else []), *a["notes"]])
        out.append({
            "op": spec.op, "impl": spec.impl, "device_model": dev, "bits": spec.bits,
            "gqa": spec.gqa, "head_dim": spec.head_dim, "regs": comp.regs,
            "spill_bytes": comp.spill_bytes,
            "instr_per_kv_byte": f"{a['instr_per_kv_byte']:.4f}",
            "est_hbm_fraction": f"{min(1.0, bps / p['hbm_bytes_s']):.3f}", "note": note,
            "est_hbm_fraction_pipes": f"{min(1.0, bps_pipes / p['hbm_bytes_s']):.3f}",
            "issue_gb_per_s": f"{bps / 1e9:.0f}",
            "dominant": dominant, "binding_pipe": a["binding_pipe"], "warps": spec.warps,
            "tokens_per_iter": spec.tokens_per_iter,
            "kv_bytes_per_iter": f"{spec.kv_bytes_per_iter:g}",
            "warp_instr_per_iter": f"{a['warp_instr_per_iter']:g}",
            "loop_sass_instr": a["loop_sass_instr"], "main_loop": a["main_loop"],
            "top_ops": top_ops,
            **{f"mix_{c}": f"{mix[c]:g}" for c in CLASS_NAMES},
        })  # fmt: skip
    return out


KV_HEADS = 8  # Qwen3-8B / Llama-3.1-8B shape; the page's shared token norms split over them
BT = 32  # tokens per Triton inner step (extend_attention default; decode: decode_block_tokens)


def triton_page_kernels(op: str, bits: int, group: int, d: int):
    """(Spec, compile thunk) of the Triton decode or extend over packed pages."""
    import triton

    from oscar_kv import OscarConfig
    from oscar_kv.layout import PageLayout
    from oscar_kv.triton.api import (
        EXTEND_WARPS,
        _layout_args,
        decode_block_tokens,
        extend_block_tokens,
    )

    cfg = OscarConfig(bits=bits)
    layout = PageLayout.of(cfg, KV_HEADS, d)
    la = _layout_args(layout)
    # The decode runs the block size its launcher picks by default (api.decode_block_tokens).
    bt = decode_block_tokens(d, group) if op == "decode" else BT
    kv_bytes = layout.page_bytes / KV_HEADS * bt / 128
    gp = triton.next_power_of_2(group)
    if op == "decode":
        from oscar_kv.triton.decode import decode_split_kernel as fn

        ce = {**la, "HKV": KV_HEADS, "G": group, "GP": max(16, gp), "PRECISE": False,
              "ROT_Q": True, "BT": bt}  # fmt: skip
        warps, loop, note = 4, ("decode.py", r"for it in range\(start \* NSUB"), ""
    elif op == "extend":
        from oscar_kv.triton.extend import extend_kernel as fn

        bm = extend_block_tokens(group, d)
        ce = {**la, "G": group, "GP": gp, "BM": bm, "PRECISE": False, "ROT_Q": True,
              "ROT_V": True, "BT": BT, "SPLIT": True}  # fmt: skip
        warps, loop = EXTEND_WARPS, ("extend.py", r"for it in range\(n_pages \* NSUB")
        note = (f"per program of {bm} new tokens x {gp} heads; fused: serves the requests whose"
                " new tokens fit one program (others: triton-ws)")  # fmt: skip
    elif op == "extend-ws":
        from oscar_kv.triton.extend import extend_ws_kernel as fn

        bm = extend_block_tokens(group, d)
        ce = {k: la[k] for k in ("D", "LOG2D", "NORM", "OFF_N")}
        ce |= {"H": KV_HEADS, "G": group, "GP": gp, "BM": bm, "PRECISE": False, "ROT_Q": True,
               "ROT_V": True, "BT": BT, "FIRST": True, "LAST": True}  # fmt: skip
        warps, loop = EXTEND_WARPS, ("extend.py", r"for it in range\(cols \* NSUB")
        kv_bytes = 2.0 * BT * d * 2  # the fp16 workspace K and V it reads
        note = (f"per program of {bm} new tokens x {gp} heads; KV bytes = the fp16 workspace"
                " (written once per page by triton-ws-dequant) it reads")  # fmt: skip
    else:
        from oscar_kv.triton.extend import dequantize_prefix_kernel as fn

        ce = {k: la[k] for k in ("OFF_KC", "OFF_VC", "OFF_KS", "OFF_KZ", "OFF_VS", "OFF_VZ", "D",
                                 "BITS", "KG", "VG")}  # fmt: skip
        ce |= {"H": KV_HEADS, "BM": extend_block_tokens(group, d), "TC": 32}
        warps, loop = 4, ("extend.py", r"for t0 in range\(0, T, TC\)")
        kv_bytes = layout.page_bytes / KV_HEADS * 32 / 128
        note = "once per prefix page and KV head; writes the fp16 workspace"
    impl = {"extend-ws": "triton-ws", "extend-dequant": "triton-ws-dequant"}.get(op, "triton")
    tokens = 32 if op == "extend-dequant" else bt
    op = "extend" if op.startswith("extend") else op
    spec = Spec(op, impl, bits, group, d, loop, warps, tokens, kv_bytes, extra_note=note)
    return spec, lambda: compile_triton(fn, ce, warps)


def triton_bf16(group: int, d: int):
    import triton

    from oscar_kv.triton.bf16 import bf16_split_kernel

    ce = {"HKV": KV_HEADS, "G": group, "GP": max(16, triton.next_power_of_2(group)), "D": d,
          "PAGE": 128, "INTERP": False, "BT": BT}  # fmt: skip
    spec = Spec("decode", "triton-bf16-baseline", 16, group, d,
                ("bf16.py", r"for it in range\(start \* NSUB"), 4, BT, 2.0 * BT * d * 2)  # fmt: skip
    return spec, lambda: compile_triton(bf16_split_kernel, ce, 4)


def cuda_decode(bits: int, group: int, d: int):
    """Spec of the CUDA decode (one page per main-loop iteration, 128 threads = 4 warps).

    G is a runtime argument: the SASS is the same for every GQA ratio (the per-head work is
    unrolled to kMaxGroup = 16 and predicated), only the trip counts of the per-page
    precomputation and the softmax loops depend on it.
    """
    from oscar_kv import OscarConfig
    from oscar_kv.layout import PageLayout

    cfg = OscarConfig(bits=bits)
    layout = PageLayout.of(cfg, KV_HEADS, d)
    ngk, nvg, rb = 128 // cfg.k_group, d // cfg.v_group, d * bits // 8
    shape = {"G": group, "D": d, "NGK": ngk, "NVG": nvg, "RB": rb}
    trips = [
        Trip(r"idx < NGK \* G \* D", lambda s: s["NGK"] * s["G"] * s["D"] // 128, ("STS", 1)),
        Trip(r"pair < NGK \* G", lambda s: s["NGK"] * s["G"] / 4),
        Trip(r"c < D; c \+= 32", lambda s: s["D"] // 32),
        Trip(r"idx < kBlockTokens \* RB / 16", lambda s: 128 * s["RB"] // 16 // 128, ("STS", 1)),
        Trip(r"idx < kBlockTokens \* NVG", lambda s: s["NVG"], ("STS", 1)),
        Trip(r"w16 < RB / 16", lambda s: s["RB"] // 16),
        Trip(r"g < G; g \+= kDecodeThreads / 32", lambda s: s["G"] / 4),
        Trip(r"t = lane; t < (n_valid|kBlockTokens); t \+= 32", lambda s: 128 // 32),
        Trip(r"t < kBlockTokens; \+\+t", lambda s: 128, ("I2F", 1)),
    ]
    spec = Spec("decode", "cuda", bits, group, d,
                ("decode.cuh", r"for \(int pi = start; pi < end; \+\+pi\)"), 4, 128,
                layout.page_bytes / KV_HEADS, trips, shape,
                "same SASS for every GQA <= 16 (per-head work predicated to 16)")  # fmt: skip
    return spec, lambda: compile_cuda_decode(d, bits)


# Every decode shape: bits x GQA group x head_dim (the model check's ranges).
DECODE_GRID = [(b, g, d) for b in (2, 4) for g in (1, 4, 8, 16) for d in (64, 128, 256)]


def all_specs(quick: bool):
    """(spec, compile key, compile thunk) for every row; rows sharing a key share a compile."""
    shapes = [(2, 4, 128)] if quick else DECODE_GRID
    out = []
    for bits, g, d in shapes:
        s, c = triton_page_kernels("decode", bits, g, d)
        out.append((s, ("triton-decode", bits, g, d), c))
    for bits, g, d in shapes:
        s, c = cuda_decode(bits, g, d)
        out.append((s, ("cuda-decode", bits, d), c))
    for _, g, d in dict.fromkeys((1, g, d) for bits, g, d in shapes):
        s, c = triton_bf16(g, d)
        out.append((s, ("bf16", g, d), c))
    for op in ("extend", "extend-ws", "extend-dequant"):
        s, c = triton_page_kernels(op, 2, 4, 128)
        out.append((s, (f"triton-{op}", 2, 4, 128), c))
    return out


def row_key(r: dict) -> tuple:
    return tuple(str(r[k]) for k in ("op", "impl", "device_model", "bits", "gqa", "head_dim"))


def carried_rows(path: Path, fresh: list[dict]) -> list[dict]:
    """Rows of earlier kernel versions (impl 'triton-v<N>') from the committed CSV, kept as
    they are: a rerun models only today's kernels, and these keep the gain visible."""
    if not path.exists():
        return []
    with path.open() as f:
        old = [r for r in csv.DictReader(f) if re.fullmatch(r"triton-v\d+", r["impl"])]
    have = {row_key(r) for r in fresh}
    return [r for r in old if row_key(r) not in have]


def order_rows(rows: list[dict]) -> list[dict]:
    """Each op's rows by implementation in first-seen order, 'triton-v<N>' rows right after
    'triton', newest version first."""
    ops = list(dict.fromkeys(r["op"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    def key(r: dict) -> tuple:
        m = re.fullmatch(r"triton-v(\d+)", r["impl"])
        base = "triton" if m and "triton" in impls else r["impl"]
        return (ops.index(r["op"]), impls.index(base), -int(m.group(1)) if m else -(1 << 30))

    return sorted(rows, key=key)


def write_csv(rows: list[dict], path: Path) -> None:
    seen: set[tuple] = set()
    for r in rows:
        if row_key(r) in seen:
            raise RuntimeError(f"duplicate row {row_key(r)}")
        seen.add(row_key(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


# Earlier versions of the Triton decode whose rows a full run carries over.
VERSIONS = {
    "triton-v2": "the Triton decode of commit 22d9d2a (fp16 codes unpacked per packed plane,"
    " per-plane dots, K scale rows split into planes by byte permutes), modeled by this"
    " script on that commit's kernels",
    "triton-v1": "the Triton decode before issue 15 (fp32 dequantization, stride-4 scale loads,"
    " 32-token blocks)",
}


def versions_table(rows: list[dict]) -> list[str]:
    """Today's Triton decode next to each carried version, per shape (H100 / H200)."""
    cur = {(r["bits"], r["gqa"], r["head_dim"], r["device_model"]): r for r in rows
           if r["op"] == "decode" and r["impl"] == "triton"}  # fmt: skip
    versions = [v for v in VERSIONS if any(r["impl"] == v for r in rows)]
    if not cur or not versions:
        return []
    old = {(r["impl"], str(r["bits"]), str(r["gqa"]), str(r["head_dim"]), r["device_model"]): r
           for r in rows if r["impl"] in versions}  # fmt: skip
    head = ["bits", "gqa", "D", "regs", "spill B", "instr/KV B", "est HBM H100", "est HBM H200"]
    for v in versions:
        head += [f"{v} instr/KV B", f"{v} H100", f"{v} H200"]
    out = ["", "## Triton decode: today vs earlier versions (estimates)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for (bits, g, d, dev), r in cur.items():
        if dev != "H100-SXM":
            continue
        h2 = cur[(bits, g, d, "H200")]
        cells = [bits, g, d, r["regs"], r["spill_bytes"], r["instr_per_kv_byte"],
                 r["est_hbm_fraction"], h2["est_hbm_fraction"]]  # fmt: skip
        for v in versions:
            o1 = old.get((v, str(bits), str(g), str(d), "H100-SXM"))
            o2 = old.get((v, str(bits), str(g), str(d), "H200"))
            cells += ([o1["instr_per_kv_byte"], o1["est_hbm_fraction"], o2["est_hbm_fraction"]]
                      if o1 and o2 else ["", "", ""])  # fmt: skip
        out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return out


def summary(rows: list[dict]) -> str:
    head = ["op", "impl", "bits", "gqa", "D", "regs", "spill B", "instr/KV B",
            "issue GB/s", "est HBM H100", "est HBM H200", "pipe bound H100",
            "dominant class", "binding pipe"]  # fmt: skip
    lines = [
        "# Static performance model of the decode / extend kernels (estimates, not measurements)",
        "",
        "Generated by `python benches/kernel_static.py` from the sm_90a SASS (no GPU ran).",
        "Per main-loop iteration (the loop over the tokens of a page): warp-level SASS",
        "instructions of all warps / KV bytes consumed; ceiling = 4 warp-instr/clk/SM x 132 SMs",
        "x 1.98 GHz / instr per byte, as a fraction of HBM (3.35 TB/s H100 SXM, 4.8 TB/s H200).",
        "An upper bound: latency, occupancy and memory effects are not modeled. 'pipe bound'",
        "also charges each instruction to its pipe (fp32 128, int 64, conversions/MUFU 16,",
        "load/store 32 lanes/clk/SM) and takes the busiest. bits 16 = the bf16 baseline;",
        "'issue GB/s' is the uncapped bytes/s the instruction stream allows.",
        "",
        "Main loop: the backward branch on the per-page loop header (Triton: the flattened",
        "(page, block) loop, in the block size the launcher runs by default",
        "(`api.decode_block_tokens`: 128 tokens for the decode at D 64, 64 at D 128, 32 at",
        "D 256; the 'triton-v2' rows 64 at D <= 128, else 32); CUDA: the page loop, its inner",
        "loops weighted by their trip counts). Counts include predicated-off instructions",
        "(they take issue slots).",
        "The CUDA decode's SASS is the same for every GQA <= 16: its per-head work is",
        "unrolled to 16 heads and predicated. Extend rows are per program (BM new tokens):",
        "'triton' (fused) dequantizes the prefix pages in registers in each program and serves",
        "the requests whose new tokens fit one program; for the others 'triton-ws-dequant'",
        "dequantizes each prefix page once per KV head into an fp16 workspace (its KV bytes: the",
        "packed page) and 'triton-ws' reads that workspace in each program (its KV bytes: the",
        "fp16 workspace). See the module docstring for all assumptions.",
        "",
        "Budget: a ceiling of 70% of HBM needs at most "
        + ", ".join(
            f"{ISSUE_PER_SM_CLK * p['sms'] * p['clock_hz'] / (0.7 * p['hbm_bytes_s']):.3f} ({name})"
            for name, p in DEVICES.items()
        )
        + " warp-instructions per KV byte.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    versions = [v for v in VERSIONS if any(r["impl"] == v for r in rows)]
    if versions:
        lines[-4:-4] = [
            *(f"Rows '{v}': {VERSIONS[v]}." for v in versions),
            "They are carried over from the committed CSV unchanged, for comparison.",
            "",
        ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["op"], r["impl"], r["bits"], r["gqa"], r["head_dim"]), {})[
            r["device_model"]
        ] = r
    for (op, impl, bits, g, d), devs in by_key.items():
        h1, h2 = devs["H100-SXM"], devs["H200"]
        lines.append("| " + " | ".join(str(x) for x in (
            op, impl, bits, g, d, h1["regs"], h1["spill_bytes"], h1["instr_per_kv_byte"],
            h1["issue_gb_per_s"], h1["est_hbm_fraction"], h2["est_hbm_fraction"], h1["est_hbm_fraction_pipes"],
            h1["dominant"], h1["binding_pipe"])) + " |")  # fmt: skip
    lines += versions_table(rows)
    lines += ["", "## Instruction mix of the main loop (warp-instructions per KV byte)", ""]
    shown = [c for c in CLASS_NAMES if any(float(r[f"mix_{c}"]) for r in rows)]
    lines.append("| op | impl | bits | gqa | D | " + " | ".join(shown) + " |")
    lines.append("|" + "---|" * (5 + len(shown)))
    for (op, impl, bits, g, d), devs in by_key.items():
        r = devs["H100-SXM"]
        kvb = float(r["kv_bytes_per_iter"])
        cells = [f"{float(r[f'mix_{c}']) / kvb:.3f}" for c in shown]
        lines.append(f"| {op} | {impl} | {bits} | {g} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "## What limits each kernel (GQA 4, D 128)", ""]
    lines += [f"- {x}" for x in limits(by_key)]
    lines.append("")
    return "\n".join(lines)


def limits(by_key: dict) -> list[str]:
    out = []
    for (op, impl, bits, g, d), devs in by_key.items():
        if g != 4 or d != 128 or bits == 4:
            continue
        r = devs["H100-SXM"]
        kvb = float(r["kv_bytes_per_iter"])
        total = float(r["warp_instr_per_iter"])
        top = sorted(CLASS_NAMES, key=lambda c: -float(r[f"mix_{c}"]))[:3]
        parts = ", ".join(f"{c} {float(r[f'mix_{c}']) / total:.0%}" for c in top)
        out.append(
            f"{op} {impl} ({bits}-bit): {total / kvb:.3f} warp-instr per KV byte, "
            f"issue ceiling {r['est_hbm_fraction']} of H100 HBM "
            f"({devs['H200']['est_hbm_fraction']} of H200); largest classes {parts}; "
            f"binding pipe in the pipe model: {r['binding_pipe']} "
            f"({r['est_hbm_fraction_pipes']} of H100 HBM); top opcodes per iteration "
            f"({r['tokens_per_iter']} tokens, {r['warps']} warps): {r['top_ops']}."
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="GQA 4 / D 128 / 2-bit rows only")
    ap.add_argument("--out", type=Path, default=None, help="directory (default benches/results)")
    ap.add_argument("--verbose", action="store_true", help="loops and opcode counts")
    ap.add_argument("--only", default=None, help="regex on impl (e.g. 'cuda', 'bf16')")
    args = ap.parse_args(argv)
    # Compiled, not interpreted, kernels (set before oscar_kv.triton is imported: Triton reads
    # it when a kernel is decorated); Triton 3.9's default FP fusion, set so it says nothing.
    if "oscar_kv.triton.decode" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != "0":
        sys.exit("run in a fresh process: the kernels here were created in interpreter mode")
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    csv_path, md_path = CSV_PATH, SUMMARY_PATH
    if args.out is not None:
        csv_path, md_path = args.out / CSV_PATH.name, args.out / SUMMARY_PATH.name
    compiled: dict[tuple, Compiled] = {}
    rows: list[dict] = []
    for spec, key, thunk in all_specs(args.quick):
        if args.only and not re.search(args.only, f"{spec.impl}-{spec.op}"):
            continue
        if key not in compiled:
            print(f"compiling {key} ...", file=sys.stderr, flush=True)
            compiled[key] = thunk()
        rs = rows_for(spec, compiled[key], args.verbose)
        r = rs[0]
        print(f"{spec.op} {spec.impl} b{spec.bits} g{spec.gqa} d{spec.head_dim}: "
              f"{r['regs']} regs, {r['spill_bytes']} B spill, {r['instr_per_kv_byte']} "
              f"instr/B, est {r['est_hbm_fraction']} of H100 HBM ({r['main_loop']})",
              file=sys.stderr, flush=True)  # fmt: skip
        rows += rs
    if not args.quick and not args.only:
        rows = order_rows(rows + carried_rows(CSV_PATH, rows))
    write_csv(rows, csv_path)
    md_path.write_text(summary(rows))
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
