"""Session 19, run 66: exact products (mma="fp16-l1") at 0.75-12 rows an expert, on v22.

v22 runs the MMA launch of a split GEMM on exact products (`GemmConfig.fma_mix`: up to 3 rows
an expert, the experts with three rows or more) on the Gluon exact `_gemm` instead of the
Triton FP16 row tiles. Run 66 switched that with a boolean, on at every row count; from its
result v22 takes it above one row an expert only (`config.EXACT_GLUON_MIX_FROM`), which this
script sets to 0 or infinity. Variants, each on the heuristic, same run (run from the
repository root, PYTHONPATH=src):

    fp8        FP8 MMAs (the v21 default)
    v21        fp16-l1, the split's MMA launch on the Triton FP16 tiles
    v22        fp16-l1, the split's MMA launch on exact `_gemm`
    v22s3      ... and exact `_gemm` on 3 ring stages (EXACT_SMALL_STAGES; 4 in v21-v22)
    v22s2      ... on 2 ring stages (54400 bytes of shared memory: 4 programs an SM, against 3)

    python docs/bench/h200_2026-12-03/mix_ab.py SHAPE TOKENS
"""
import sys

from megamoe.bench import breakdown as bd
from megamoe.kernels import config
from megamoe.kernels import prefill_wgmma as pw

shape, tokens = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
RUNS = [("fp8", "fp8", True, 4), ("v21", "fp16-l1", False, 4), ("v22", "fp16-l1", True, 4),
        ("v22s3", "fp16-l1", True, 3), ("v22s2", "fp16-l1", True, 2)]
rows = []
print(bd.HEADER, flush=True)
for label, mma, mix, stages in RUNS:
    config.EXACT_GLUON_MIX_FROM, pw.EXACT_SMALL_STAGES = (0.0 if mix else float("inf")), stages
    try:
        for r in bd.breakdown(shape, tokens, ["default"], mma=mma, log=lambda s: None):
            rows.append((label, r))
            print(f"{label:<8}", bd.format_row(r), flush=True)
    except Exception as e:   # report it, go on
        print(f"{label:<8} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
print(f"\n{shape}: L1 / L2 / layer us by tokens (same run)")
print(f"{'run':<8}" + "".join(f"{t:>22}" for t in tokens))
for label, *_ in RUNS:
    print(f"{label:<8}" + "".join(f"{r['l1_us']:>7.0f}{r['l2_us']:>7.0f}{r['total_us']:>8.0f}"
                                 for lab, r in rows if lab == label))
print("layer / fp8")
base = {r["tokens"]: r["total_us"] for lab, r in rows if lab == "fp8"}
for label, *_ in RUNS[1:]:
    print(f"{label:<8}" + "".join(f"{r['total_us'] / base[r['tokens']]:>22.3f}" for lab, r in rows
                                 if lab == label and r["tokens"] in base))
print("errors")
for label, *_ in RUNS:
    print(f"{label:<8}" + "".join(f"{r['rel_err']:>22.1e}" for lab, r in rows if lab == label))
