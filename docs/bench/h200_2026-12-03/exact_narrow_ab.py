"""Session 18, runs 60-62: exact products (mma="fp16-l1") where L1's row tiles are narrow.

Run 60 ran this file's first version, before v20: fp8 and fp16-l1 on the heuristic, then L1
forced onto the Gluon kernels (the "l1wide" variant below) with `_gemm_t` in three shapes
(EXACT_WARPS x EXACT_ROWS_W x EXACT_STAGES 4x128x2, 4x128x3, 8x128x3) and with FP8 `_gemm`.
From v20 on, these modes (run from the repository root, PYTHONPATH=src):

    python exact_narrow_ab.py SHAPE TOKENS layer     run 61: fp8 against fp16-l1 and fp16, each on
                                                     the heuristic (v20: `_gemm_t` from 3 rows an expert)
    python exact_narrow_ab.py SHAPE TOKENS sweep     run 61: `_gemm_t`'s narrow shape (warps x weight
                                                     rows x stages) on fp16-l1
    python exact_narrow_ab.py SHAPE TOKENS probe     run 62: FP8 L1 forced onto `_gemm` with 16, 32,
                                                     64 and 128 tokens a tile (ROWS_T), against the
                                                     Triton FP8 row tiles and fp16-l1 (v20)
    python exact_narrow_ab.py SHAPE TOKENS small     run 64: exact `_gemm` (weights the M side,
                                                     16-64 tokens the N side) against v20's `_gemm_t`
                                                     at up to 64 rows an expert, fp16-l1, and FP8

Run 64 ran exact `_gemm` with its first tile rule (the power of two from 16 to 64 at or above
mean + sqrt(mean) rows an expert; "small" below sets EXACT_SMALL_UP_TO, and v21 keeps 16
tokens a tile up to 12 rows an expert, where that rule gives 16 too).
"""
import sys

from megamoe.bench import breakdown as bd
from megamoe.kernels import prefill_wgmma as pw
from megamoe.kernels.config import GemmConfig

shape, tokens, what = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
bd.VARIANTS["l1wide"] = dict(l1=GemmConfig(64, 64, 8, 3))     # L1 only onto the Gluon kernels


def narrow(warps, rows, stages):
    pw.EXACT_NARROW_WARPS, pw.EXACT_ROWS_W, pw.EXACT_NARROW_STAGES = warps, rows, stages


def rows_t(tokens):
    pw.ROWS_T = tokens


def small_up_to(rows):
    pw.EXACT_SMALL_UP_TO = rows


RUNS = {  # (label, mma, variant, setup)
    "layer": [("fp8", "fp8", "default", None), ("fp16-l1", "fp16-l1", "default", None),
              ("fp16", "fp16", "default", None)],
    "sweep": [(f"t{w}x{r}x{s}", "fp16-l1", "default", (w, r, s))
              for w, r, s in ((4, 128, 2), (4, 64, 2), (4, 64, 3), (4, 128, 3), (4, 256, 2))],
    "probe": [("fp8", "fp8", "default", None), ("fp16-l1", "fp16-l1", "default", None)]
             + [(f"fp8-gluon-t{t}", "fp8", "l1wide", (t,)) for t in (16, 32, 64, 128)],
    "small": [("fp8", "fp8", "default", None), ("f16-gemm_t", "fp16-l1", "default", (0,)),
              ("f16-gemm", "fp16-l1", "default", (64,))],
}[what]
rows = []
print(bd.HEADER, flush=True)
for label, mma, variant, setup in RUNS:
    if setup:
        {"probe": rows_t, "small": small_up_to}.get(what, narrow)(*setup)
    try:
        for r in bd.breakdown(shape, tokens, [variant], mma=mma, log=lambda s: None):
            rows.append((label, r))
            print(f"{label:<14}", bd.format_row(r), flush=True)
    except Exception as e:   # a shape that does not compile or fit: report it, go on
        print(f"{label:<14} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
print(f"\n{shape}: L1 / L2 / layer us by tokens (same run)")
print(f"{'run':<14}" + "".join(f"{t:>22}" for t in tokens))
for label, *_ in RUNS:
    print(f"{label:<14}" + "".join(f"{r['l1_us']:>7.0f}{r['l2_us']:>7.0f}{r['total_us']:>8.0f}"
                                   for lab, r in rows if lab == label))
print("errors")
for label, *_ in RUNS:
    print(f"{label:<14}" + "".join(f"{r['rel_err']:>22.1e}" for lab, r in rows if lab == label))
