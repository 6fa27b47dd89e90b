"""Can one-row tiles stay exact and issue fewer instructions on the FP16 tensor cores? (GPU)

The layer's FMA tiles (`expert_mma.mxfp4_rows_fma`, tools/fma_stream.py's "a8 W64 R1") decode a
row's MXFP4 weights and multiply them on the FP32 units: exact, but about five instructions a
weight, and from 8 to 64 tokens that issue rate is the limit (docs/PERF.md: FP16 sums at three a
weight were 3-15% faster there, and less accurate). This tool streams the same weights through a
Gluon kernel whose one-row tile is an `mma.sync` m16n8k16 FP16 MMA (gluon's `mma_v2`): each
thread loads its weight bytes straight into the MMA's operand layout (`DotOperandLayout` with
k_width 8: eight consecutive K a thread, so the loads are 8-byte vectors and the decode needs no
shuffle), decodes them to FP16 (exact), and the tensor cores multiply them with the row's FP8
activations (also exact in FP16), summing in FP32; the activation row fills one of the MMA's
eight columns. Each group of 32 is its own MMA (zero accumulator), promoted with its two scales,
as in the FMA tiles. sm_90a: 186 SASS a step of 128 K (the FMA loop: 309).

Variants: `mma kW` (k_width W of the operands; 2 is the MMA's native one) next to the layer's FMA
loop (`fma a8 W64`) and a read-only kernel of the same bytes, each checked against float64
products first (exact products and FP32 sums: relative error below 1e-6).

On an H200 (2026-12-02, run 18 of docs/bench/h200_2026-12-02/): exact (4e-8 against float64,
1.4e-7 from the FMA loop), but not faster: v4-flash L1 at one token 31.7 us (k8 W64) against
30.9 for the FMA loop, L2 17.0 against 18.2, L1 at 8 tokens (44 experts) 155.9 against 135.1;
gpt-oss-120b L1 23.0 against 23.0 and 88.9 against 91.1. k_width 4 and 2 (more, smaller loads)
and 128-row tiles were slower. Fewer instructions (186 SASS a step against 309) did not buy
speed; not profiled, a likely reason is that each group's two dependent MMAs and the promotion
that waits for them sit on the step's critical path.

    python tools/mma_row_stream.py [--cases 4096x4096x6,4096x2048x6,4096x4096x44]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from megamoe.kernels.expert_mma import DECODE_E2M1_PAIR_PTX

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fma_stream import Problem, Variant, print_table, rotations  # noqa: E402  (the same weights and harness)


@gluon.jit
def _decode(packed):
    """`expert_mma.decode_e2m1_pair_packed` in Gluon: four bytes an instruction, elementwise."""
    low, high = gl.inline_asm_elementwise(
        asm=DECODE_E2M1_PAIR_PTX, constraints="=r,=r,r", args=[packed], dtype=(gl.uint8, gl.uint8), is_pure=True,
        pack=4)
    return low.to(gl.float8e4nv, bitcast=True), high.to(gl.float8e4nv, bitcast=True)


@gluon.jit
def _mma_row_kernel(w_ptr, ws_ptr, a_ptr, as_ptr, out_ptr, experts_ptr, tiles_per_expert, steps,
                    stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n, stride_a, stride_as, n_rows,
                    K_WIDTH: gl.constexpr, WARPS: gl.constexpr):
    BLOCK_W: gl.constexpr = 16 * WARPS
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=K_WIDTH)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=K_WIDTH)
    pid = gl.program_id(0)
    slot = pid // tiles_per_expert
    expert = gl.load(experts_ptr + slot).to(gl.int64)
    n0 = (pid % tiles_per_expert) * BLOCK_W
    # A 32-byte chunk of BLOCK_W weight rows: byte j holds element j of one group (low nibble)
    # and of the next (high nibble), so both decode into [BLOCK_W, 32] operands of one layout.
    n = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, A))
    j = gl.arange(0, 32, layout=gl.SliceLayout(0, A))
    w_base = w_ptr + expert * stride_w_e + (n // 32)[:, None] * stride_w_tile + (n % 32)[:, None] * 64 + j[None, :]
    # The activation row as the MMA's B operand, the same row in all eight columns.
    kb = gl.arange(0, 32, layout=gl.SliceLayout(1, B))
    cb = gl.arange(0, 8, layout=gl.SliceLayout(0, B))
    a_base = a_ptr + slot * stride_a + kb[:, None] + 0 * cb[None, :]
    nm = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, MMA))
    ws_base = ws_ptr + expert * stride_ws_e + nm * stride_ws_n
    zero = gl.zeros([BLOCK_W, 8], gl.float32, MMA)
    acc = gl.zeros([BLOCK_W, 8], gl.float32, MMA)
    for step in range(steps):
        for c in gl.static_range(2):
            lo, hi = _decode(gl.load(w_base + step * 2048 + c * 32))
            g = 4 * step + 2 * c
            p_lo = mma_v2(lo.to(gl.float16), gl.load(a_base + 64 * c + 128 * step).to(gl.float16), zero)
            p_hi = mma_v2(hi.to(gl.float16), gl.load(a_base + 64 * c + 128 * step + 32).to(gl.float16), zero)
            s_lo = gl.load(ws_base + g).to(gl.float32) * gl.load(as_ptr + slot * stride_as + g)
            s_hi = gl.load(ws_base + g + 1).to(gl.float32) * gl.load(as_ptr + slot * stride_as + g + 1)
            acc += p_lo * s_lo[:, None] + p_hi * s_hi[:, None]
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out = out_ptr + slot * n_rows + nm[:, None] + 0 * cols[None, :]
    # The decode yields value * 2^-6; column 0 is the row's result (all eight are).
    gl.store(out, acc * 64.0, mask=cols[None, :] == 0)


def run_mma(pr: Problem, k_width: int, warps: int) -> None:
    block_w = 16 * warps
    tiles = pr.n // block_w
    _mma_row_kernel[(pr.slots * tiles,)](
        pr.w, pr.ws, pr.a8, pr.a_scales, pr.out, pr.experts, tiles, pr.k // 128, pr.w.stride(0), pr.w.stride(1),
        pr.ws.stride(0), pr.ws.stride(1), pr.a8.stride(0), pr.a_scales.stride(0), pr.n, K_WIDTH=k_width,
        WARPS=warps, num_warps=warps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=lambda t: [tuple(map(int, c.split("x"))) for c in t.split(",")],
                   default=[(4096, 4096, 6), (4096, 2048, 6), (4096, 4096, 44), (5760, 2816, 4), (5760, 2816, 30)],
                   help="N x K x experts (default: v4-flash L1 and L2 at one token, L1 at 8 tokens; "
                        "gpt-oss-120b L1 at 1 and 8 tokens, K cut to whole steps)")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    mma_variants = [(8, 4), (4, 4), (2, 4), (8, 8)]
    fma = Variant(wide_a=False)
    for kw, warps in mma_variants:
        sp = Problem(4, 128, 512, 3, 1, device)
        run_mma(sp, kw, warps)
        ref = sp.reference()
        err = ((sp.out.cpu().double() - ref).norm() / ref.norm()).item()
        print(f"check mma k{kw} w{warps}: rel err {err:.2e}", flush=True)
        assert err < 1e-6, (kw, warps)
    from megamoe.bench.timing import time_graph
    results = []
    for n, k, experts in args.cases:
        probs, nbytes, read_us = rotations(n, k, experts, 1, device)
        results.append((n, k, experts, "read-only", read_us, nbytes))
        us = time_graph([lambda pr=pr: pr.run(fma, True) for pr in probs])
        results.append((n, k, experts, "fma a8 W64 (layer's loop)", us, nbytes))
        for kw, warps in mma_variants:
            us = time_graph([lambda pr=pr, kw=kw, warps=warps: run_mma(pr, kw, warps) for pr in probs])
            results.append((n, k, experts, f"mma k{kw} W{16 * warps}", us, nbytes))
        # Same results as the FMA loop (both exact up to FP32 sums).
        probs[0].run(fma, True)
        ref_out = probs[0].out.clone()
        run_mma(probs[0], 8, 4)
        diff = ((probs[0].out - ref_out).norm() / ref_out.norm()).item()
        print(f"{n}x{k}x{experts}: mma k8 against fma a8: rel diff {diff:.2e}", flush=True)
        del probs
        torch.cuda.empty_cache()
    print_table(results)

if __name__ == "__main__":
    main()
