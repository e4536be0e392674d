"""benches/kernel_static.py: the static (SASS) performance model of the decode kernels.

- the SASS parser, loop finder and trip-count weighting on a hand-written listing;
- the model end to end on one kernel (the Triton decode, compiled for sm_90a without a GPU,
  in a subprocess with ``TRITON_INTERPRET=0``): positive counts, the CSV header;
- the committed benches/results/kernels_static.csv has the header and the estimate note.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
import kernel_static as ks

SRC = """\
int main() {
  for (int page = 0; page < n; ++page) {
    for (int t = 0; t < 128; ++t) {
      acc += p[t] * v[t];
    }
  }
}
"""


def listing(src: Path) -> str:
    f = f'\t//## File "{src}", line {{}}\n'
    return "".join([
        ".text.k:\n", f.format(1),
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;\n",
        ".L_x_0:\n", f.format(3),
        "        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;\n",
        "        /*0020*/                   I2FP.F32.U32 R5, R4 ;\n",
        ".L_x_1:\n", f.format(4),
        "        /*0030*/                   LDS R6, [R7] ;\n",
        "        /*0040*/               @P1 FFMA R8, R6, R5, R8 ;\n",
        "        /*0050*/                   HMMA.16816.F32 R8, R12, R16, R8 ;\n", f.format(3),
        "        /*0060*/                   ISETP.NE.AND P0, PT, R9, 0x80, PT ;\n",
        "        /*0070*/               @P0 BRA `(.L_x_1) ;\n", f.format(2),
        "        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n",
        "        /*0090*/              @!P2 BRA `(.L_x_0) ;\n",
        "        /*00a0*/                   EXIT ;\n",
        ".L_x_2:\n",
        "        /*00b0*/                   BRA `(.L_x_2);\n",
    ])  # fmt: skip


def test_parse_loops_and_weighting(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(SRC)
    instrs = ks.parse_sass(listing(src))
    assert len(instrs) == 12
    assert instrs[7].op == "BRA" and instrs[7].target == 0x30 and instrs[7].pred == "@P0"
    (outer,) = ks.find_loops(instrs)  # the self-branch after EXIT is no loop
    assert (outer.start, outer.end, outer.line) == (0x10, 0x90, 2)
    (inner,) = outer.children
    assert (inner.start, inner.end, inner.line) == (0x30, 0x70, 3)
    classes = [ks.op_class(i.op) for i in instrs]
    assert classes[:10] == ["move", "gmem", "conv", "smem", "fp32", "tensor", "int", "ctrl",
                            "bar", "ctrl"]  # fmt: skip
    assert ks.op_class("IMAD.MOV.U32") == "move" and ks.op_class("IMAD.WIDE") == "int"
    assert ks.op_class("HADD2.F32") == "conv" and ks.op_class("HADD2") == "fp16"
    assert ks.op_class("UIADD3") == "uniform" and ks.op_class("LDSM.16.M88.4") == "smem"

    spec = ks.Spec("decode", "test", 2, 4, 128, ("k.cu", r"for \(int page"), warps=4,
                   tokens_per_iter=128, kv_bytes_per_iter=1000.0,
                   trips=[ks.Trip(r"t < 128", lambda s: 128, ("FFMA", 1))])  # fmt: skip
    a = ks.analyze(spec, ks.Compiled(listing(src), 1, 0))
    # 4 warps x (4 own instructions + 128 x 5 inner ones)
    assert a["warp_instr_per_iter"] == 4 * (4 + 128 * 5)
    assert a["mix"]["fp32"] == 4 * 128 and a["mix"]["bar"] == 4
    assert a["instr_per_kv_byte"] == pytest.approx(4 * 644 / 1000)
    rows = ks.rows_for(spec, ks.Compiled(listing(src), 1, 0))
    assert {r["device_model"] for r in rows} == set(ks.DEVICES)
    for r in rows:
        assert list(r) == ks.COLUMNS and r["note"].startswith(ks.NOTE)
        assert 0 < float(r["est_hbm_fraction"]) <= 1


def test_model_on_the_triton_decode(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "kernel_static.py"), "--quick", "--only",
         "^triton-decode$", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    with (tmp_path / "kernels_static.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ks.COLUMNS
        rows = list(reader)
    assert [(r["op"], r["impl"], r["device_model"]) for r in rows] == [
        ("decode", "triton", "H100-SXM"),
        ("decode", "triton", "H200"),
    ]
    for row in rows:
        assert int(row["regs"]) > 0 and int(row["spill_bytes"]) >= 0
        assert float(row["instr_per_kv_byte"]) > 0
        assert 0 < float(row["est_hbm_fraction"]) <= 1
        assert "decode.py:" in row["main_loop"]
        for c in ("gmem", "tensor", "conv", "fp32", "int"):
            assert float(row[f"mix_{c}"]) > 0, c
        assert row["note"].startswith("estimate, not a measurement")
    # H200's HBM is faster: the same instruction stream covers a smaller fraction.
    assert float(rows[1]["est_hbm_fraction"]) <= float(rows[0]["est_hbm_fraction"])
    assert "estimates, not measurements" in (tmp_path / "kernels_static_summary.md").read_text()


def test_committed_results_match_the_model():
    with ks.CSV_PATH.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ks.COLUMNS
        rows = list(reader)
    assert rows and all(r["note"].startswith(ks.NOTE) for r in rows)
    impls = {(r["op"], r["impl"]) for r in rows}
    assert {("decode", "triton"), ("decode", "cuda"), ("decode", "triton-bf16-baseline"),
            ("extend", "triton")} <= impls  # fmt: skip
    assert {r["device_model"] for r in rows} == set(ks.DEVICES)
    assert "estimates, not measurements" in ks.SUMMARY_PATH.read_text()
