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

Two more variants take the step's loads off that path (2026-12-03, runs 34-36 of
docs/bench/h200_2026-12-03/, README there):
* `--ahead A` (`_mma_ahead_kernel`): K unrolled at compile time, each step's loads (weights,
  activations, scales) issued A steps before the step before it is multiplied. v4-flash L1 at
  one token 25.1 us with A = 2 (the FMA loop 31.2); every other case as before or slower (8
  tokens 153 against 134); ptxas reorders the unrolled loads, so A changes the code only at
  32 steps.
* `--ring S` (`_mma_ring_kernel`): the weight bytes and scales copied into cp.async rings of S
  stages, the activations loaded when used ("mma ring S") or in rings too ("+act").
  Without "+act" no faster at any S (bytes in flight are not the limit); with it gpt-oss-120b's
  L1 at one token 18.7 us against 23.1, v4-flash's 29.8 against 31.0, 8 tokens 10-51% slower.
Neither is built into the layer (docs/PERF.md, "The versions").

    python tools/mma_row_stream.py [--cases 4096x4096x6,4096x2048x6,4096x4096x44] [--ahead 0,1,2] [--ring 3,4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

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
def _row_tile(w_ptr, ws_ptr, a_ptr, experts_ptr, tiles_per_expert, stride_w_e, stride_w_tile, stride_ws_e,
              stride_ws_n, stride_a, BLOCK_W: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr):
    """This program's expert slot, expert and weight rows (nm, in the accumulator's row layout),
    and step 0's addresses of its operands: the weight bytes in A's layout, the activation row
    as the B operand, the weight scales."""
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
    return slot, expert, nm, w_base, a_base, ws_base


@gluon.jit
def _store_row(out_ptr, slot, n_rows, nm, acc, MMA: gl.constexpr):
    """Column 0 of the accumulator into out[slot]: the row's result (all eight columns hold it)."""
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    out = out_ptr + slot * n_rows + nm[:, None] + 0 * cols[None, :]
    # The decode yields value * 2^-6.
    gl.store(out, acc * 64.0, mask=cols[None, :] == 0)


@gluon.jit
def _mma_row_kernel(w_ptr, ws_ptr, a_ptr, as_ptr, out_ptr, experts_ptr, tiles_per_expert, steps,
                    stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n, stride_a, stride_as, n_rows,
                    K_WIDTH: gl.constexpr, WARPS: gl.constexpr):
    BLOCK_W: gl.constexpr = 16 * WARPS
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=K_WIDTH)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=K_WIDTH)
    slot, expert, nm, w_base, a_base, ws_base = _row_tile(w_ptr, ws_ptr, a_ptr, experts_ptr, tiles_per_expert,
                                                          stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n,
                                                          stride_a, BLOCK_W, MMA, A, B)
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
    _store_row(out_ptr, slot, n_rows, nm, acc, MMA)


@gluon.jit
def _step_operands(w_base, a_base, ws_base, as_base, step, last):
    """One 128-wide step's loads for `_mma_ahead_kernel`: the packed bytes of its two 32-byte
    chunks, the activation row's 128 FP8 values as four k32 B operands, and the four groups'
    weight and activation scales. A step past the last re-reads the last (its sums are dropped)."""
    s = gl.minimum(step, last)
    w0 = gl.load(w_base + s * 2048)
    w1 = gl.load(w_base + s * 2048 + 32)
    a0 = gl.load(a_base + 128 * s)
    a1 = gl.load(a_base + 128 * s + 32)
    a2 = gl.load(a_base + 128 * s + 64)
    a3 = gl.load(a_base + 128 * s + 96)
    g = 4 * s
    sw = (gl.load(ws_base + g), gl.load(ws_base + g + 1), gl.load(ws_base + g + 2), gl.load(ws_base + g + 3))
    sa = (gl.load(as_base + g), gl.load(as_base + g + 1), gl.load(as_base + g + 2), gl.load(as_base + g + 3))
    return (w0, w1, a0, a1, a2, a3) + sw + sa


@gluon.jit
def _step_mma(acc, ops, zero):
    """acc + one step of `_step_operands`' loads: each group of 32 is its own MMA (zero
    accumulator), promoted with its two scales. The FP8 operands go to the FP16 tensor cores
    (exact; two m16n8k16 MMAs a group): Hopper has no FP8 `mma.sync`, and ptxas's own lowering
    of an e4m3 m16n8k32 MMA (conversions and two HMMAs) took 385 SASS a step (sm_90a) against
    350 for the explicit conversion in the same runtime loop."""
    w0, w1, a0, a1, a2, a3, sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3 = ops
    lo0, hi0 = _decode(w0)
    lo1, hi1 = _decode(w1)
    # Chunk c's low nibbles are group 2c, its high nibbles group 2c + 1 (K 64c .. 64c + 63).
    acc += mma_v2(lo0.to(gl.float16), a0.to(gl.float16), zero) * (sw0.to(gl.float32) * sa0)[:, None]
    acc += mma_v2(hi0.to(gl.float16), a1.to(gl.float16), zero) * (sw1.to(gl.float32) * sa1)[:, None]
    acc += mma_v2(lo1.to(gl.float16), a2.to(gl.float16), zero) * (sw2.to(gl.float32) * sa2)[:, None]
    acc += mma_v2(hi1.to(gl.float16), a3.to(gl.float16), zero) * (sw3.to(gl.float32) * sa3)[:, None]
    return acc


@gluon.jit
def _mma_ahead_kernel(w_ptr, ws_ptr, a_ptr, as_ptr, out_ptr, experts_ptr, tiles_per_expert,
                     stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n, stride_a, stride_as, n_rows,
                     K_WIDTH: gl.constexpr, WARPS: gl.constexpr, AHEAD: gl.constexpr, STEPS: gl.constexpr):
    """`_mma_row_kernel` with each step's loads (weights, activations, scales) issued AHEAD
    steps before the step before them is multiplied (AHEAD = 0: a step's loads are issued
    just before the previous step's MMAs), K unrolled (STEPS steps of 128)."""
    BLOCK_W: gl.constexpr = 16 * WARPS
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=K_WIDTH)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=K_WIDTH)
    slot, expert, nm, w_base, a_base, ws_base = _row_tile(w_ptr, ws_ptr, a_ptr, experts_ptr, tiles_per_expert,
                                                          stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n,
                                                          stride_a, BLOCK_W, MMA, A, B)
    as_base = as_ptr + slot * stride_as + 0 * nm
    zero = gl.zeros([BLOCK_W, 8], gl.float32, MMA)
    acc = gl.zeros([BLOCK_W, 8], gl.float32, MMA)
    # Unrolled over K (STEPS constexpr): a loaded tensor carried around a runtime loop is kept
    # as one register a byte and repacked before its decode (sm_90a: 350 SASS a step, 108 of
    # them PRMT); unrolled, each load stays a packed vector and "moving" a step's loads down
    # the window is a renaming.
    r0 = _step_operands(w_base, a_base, ws_base, as_base, 0, STEPS - 1)
    if AHEAD >= 1:
        r1 = _step_operands(w_base, a_base, ws_base, as_base, 1, STEPS - 1)
    if AHEAD >= 2:
        r2 = _step_operands(w_base, a_base, ws_base, as_base, 2, STEPS - 1)
    if AHEAD >= 3:
        r3 = _step_operands(w_base, a_base, ws_base, as_base, 3, STEPS - 1)
    for i in gl.static_range(STEPS):
        if i + AHEAD + 1 < STEPS:
            nxt = _step_operands(w_base, a_base, ws_base, as_base, i + AHEAD + 1, STEPS - 1)
        acc = _step_mma(acc, r0, zero)
        if AHEAD == 0:
            r0 = nxt
        elif AHEAD == 1:
            r0 = r1
            r1 = nxt
        elif AHEAD == 2:
            r0 = r1
            r1 = r2
            r2 = nxt
        else:
            r0 = r1
            r1 = r2
            r2 = r3
            r3 = nxt
    _store_row(out_ptr, slot, n_rows, nm, acc, MMA)


@gluon.jit
def _mma_ring_kernel(w_ptr, ws_ptr, a_ptr, as_ptr, out_ptr, experts_ptr, tiles_per_expert, steps,
                     stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n, stride_a, stride_as, n_rows,
                     WARPS: gl.constexpr, STAGES: gl.constexpr, ACT_RING: gl.constexpr):
    """`_mma_row_kernel` (k_width 8) with the weight stream (packed bytes and bf16 scales, read
    as int32 pairs) copied into shared-memory rings with cp.async, STAGES - 1 steps ahead: the
    bytes in flight no longer need registers or a compiler schedule. The activation row and its
    scales, the same for every program, are loaded when used (cache hits), or, ACT_RING, copied
    into rings of their own with the weights (eight rows, one a column of the MMA, as a decode
    tile of eight tokens would have them; here all eight are the one row)."""
    BLOCK_W: gl.constexpr = 16 * WARPS
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=8)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=8)
    CP_W: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    CP_WS: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [WARPS, 1], [1, 0])
    PLAIN_2D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    w_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_W, 64], PLAIN_2D)
    ws_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_W, 2], PLAIN_2D)
    PLAIN_1D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    CP_A: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [2, WARPS // 2], [1, 0])
    CP_S: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 8, 128], PLAIN_2D)
    s_rings = (gl.allocate_shared_memory(gl.float32, [STAGES, 8], PLAIN_1D),
               gl.allocate_shared_memory(gl.float32, [STAGES, 8], PLAIN_1D),
               gl.allocate_shared_memory(gl.float32, [STAGES, 8], PLAIN_1D),
               gl.allocate_shared_memory(gl.float32, [STAGES, 8], PLAIN_1D))
    slot_e, expert, nm, _, a_base, _ = _row_tile(w_ptr, ws_ptr, a_ptr, experts_ptr, tiles_per_expert, stride_w_e,
                                                 stride_w_tile, stride_ws_e, stride_ws_n, stride_a, BLOCK_W, MMA, A, B)
    n0 = (gl.program_id(0) % tiles_per_expert) * BLOCK_W
    nw = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_W))
    wb = gl.arange(0, 64, layout=gl.SliceLayout(0, CP_W))
    w_src = w_ptr + expert * stride_w_e + (nw // 32)[:, None] * stride_w_tile + (nw % 32)[:, None] * 64 + wb[None, :]
    nws = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_WS))
    wq = gl.arange(0, 2, layout=gl.SliceLayout(0, CP_WS))
    ws_src = (ws_ptr + expert * stride_ws_e + nws[:, None] * stride_ws_n + 2 * wq[None, :]).to(
        gl.pointer_type(gl.int32), bitcast=True)
    as_base = as_ptr + slot_e * stride_as + 0 * nm
    ar = gl.arange(0, 8, layout=gl.SliceLayout(1, CP_A))
    ak = gl.arange(0, 128, layout=gl.SliceLayout(0, CP_A))
    a_src = a_ptr + slot_e * stride_a + 0 * ar[:, None] + ak[None, :]
    s_src = as_ptr + slot_e * stride_as + 0 * gl.arange(0, 8, layout=CP_S)
    for s in gl.static_range(STAGES - 1):
        more = s < steps
        async_copy.async_copy_global_to_shared(w_ring.index(s), w_src + s * 2048, mask=more)
        async_copy.async_copy_global_to_shared(ws_ring.index(s), ws_src + 2 * s, mask=more)
        if ACT_RING:
            _copy_act(a_ring, s_rings, a_src, s_src, s, s, more)
        async_copy.commit_group()
    zero = gl.zeros([BLOCK_W, 8], gl.float32, MMA)
    acc = gl.zeros([BLOCK_W, 8], gl.float32, MMA)
    for step in range(steps):
        slot = step % STAGES
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        # Refill the slot the previous step read (every warp is past it: the barrier above).
        nxt = step + STAGES - 1
        fill = nxt % STAGES
        async_copy.async_copy_global_to_shared(w_ring.index(fill), w_src + nxt * 2048, mask=nxt < steps)
        async_copy.async_copy_global_to_shared(ws_ring.index(fill), ws_src + 2 * nxt, mask=nxt < steps)
        if ACT_RING:
            _copy_act(a_ring, s_rings, a_src, s_src, fill, nxt, nxt < steps)
        async_copy.commit_group()
        w = w_ring.index(slot)
        lo0, hi0 = _decode(w.slice(0, 32, dim=1).load(A))
        lo1, hi1 = _decode(w.slice(32, 32, dim=1).load(A))
        # Each thread holds its rows' two scale words (groups 0-1 and 2-3, bf16 pairs).
        q01, q23 = gl.split(ws_ring.index(slot).load(MMA))
        g = 4 * step
        if ACT_RING:
            b = a_ring.index(slot)
            b0 = b.slice(0, 32, dim=1).permute((1, 0)).load(B)
            b1 = b.slice(32, 32, dim=1).permute((1, 0)).load(B)
            b2 = b.slice(64, 32, dim=1).permute((1, 0)).load(B)
            b3 = b.slice(96, 32, dim=1).permute((1, 0)).load(B)
            COLS: gl.constexpr = gl.SliceLayout(0, MMA)
            s0 = s_rings[0].index(slot).load(COLS)[None, :]
            s1 = s_rings[1].index(slot).load(COLS)[None, :]
            s2 = s_rings[2].index(slot).load(COLS)[None, :]
            s3 = s_rings[3].index(slot).load(COLS)[None, :]
        else:
            a = a_base + 128 * step
            b0 = gl.load(a)
            b1 = gl.load(a + 32)
            b2 = gl.load(a + 64)
            b3 = gl.load(a + 96)
            sa = as_base + g
            s0 = gl.load(sa)[:, None]
            s1 = gl.load(sa + 1)[:, None]
            s2 = gl.load(sa + 2)[:, None]
            s3 = gl.load(sa + 3)[:, None]
        acc += mma_v2(lo0.to(gl.float16), b0.to(gl.float16), zero) * (
            (q01 << 16).to(gl.float32, bitcast=True)[:, None] * s0)
        acc += mma_v2(hi0.to(gl.float16), b1.to(gl.float16), zero) * (
            (q01 & -65536).to(gl.float32, bitcast=True)[:, None] * s1)
        acc += mma_v2(lo1.to(gl.float16), b2.to(gl.float16), zero) * (
            (q23 << 16).to(gl.float32, bitcast=True)[:, None] * s2)
        acc += mma_v2(hi1.to(gl.float16), b3.to(gl.float16), zero) * (
            (q23 & -65536).to(gl.float32, bitcast=True)[:, None] * s3)
    async_copy.wait_group(0)
    _store_row(out_ptr, slot_e, n_rows, nm, acc, MMA)


@gluon.jit
def _copy_act(a_ring, s_rings, a_src, s_src, slot, step, more):
    """cp.async of step `step`'s eight activation rows and their four group scales into ring slot `slot`."""
    async_copy.async_copy_global_to_shared(a_ring.index(slot), a_src + 128 * step, mask=more)
    for q in gl.static_range(4):
        async_copy.async_copy_global_to_shared(s_rings[q].index(slot), s_src + 4 * step + q, mask=more)


def run_mma_ring(pr: Problem, warps: int, stages: int, act_ring: bool = False) -> None:
    block_w = 16 * warps
    tiles = pr.n // block_w
    _mma_ring_kernel[(pr.slots * tiles,)](
        pr.w, pr.ws, pr.a8, pr.a_scales, pr.out, pr.experts, tiles, pr.k // 128, pr.w.stride(0), pr.w.stride(1),
        pr.ws.stride(0), pr.ws.stride(1), pr.a8.stride(0), pr.a_scales.stride(0), pr.n, WARPS=warps, STAGES=stages,
        ACT_RING=act_ring, num_warps=warps)


def run_mma_ahead(pr: Problem, k_width: int, warps: int, ahead: int) -> None:
    block_w = 16 * warps
    tiles = pr.n // block_w
    _mma_ahead_kernel[(pr.slots * tiles,)](
        pr.w, pr.ws, pr.a8, pr.a_scales, pr.out, pr.experts, tiles, pr.w.stride(0), pr.w.stride(1),
        pr.ws.stride(0), pr.ws.stride(1), pr.a8.stride(0), pr.a_scales.stride(0), pr.n, K_WIDTH=k_width,
        WARPS=warps, AHEAD=ahead, STEPS=pr.k // 128, num_warps=warps)


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
    p.add_argument("--ahead", type=lambda t: [int(a) for a in t.split(",")], default=[],
                   help="steps loaded ahead of the unrolled FP16 MMA loop (`_mma_ahead_kernel`), e.g. 0,1,2,3; "
                        "given, only k_width 8 of the runtime-loop kernel runs beside it")
    p.add_argument("--ring", type=lambda t: [int(a) for a in t.split(",")], default=[],
                   help="ring stages of the cp.async kernel (`_mma_ring_kernel`), e.g. 3,4,6")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    mma_variants = [(8, 4)] if args.ahead or args.ring else [(8, 4), (4, 4), (2, 4), (8, 8)]
    ahead_variants = [(a, w) for a in args.ahead for w in (2, 4)]
    ring_variants = [(s, w, act) for s in args.ring for w in (2, 4) for act in (False, True)]
    fma = Variant(wide_a=False)
    for kw, warps in mma_variants:
        sp = Problem(4, 128, 512, 3, 1, device)
        run_mma(sp, kw, warps)
        ref = sp.reference()
        err = ((sp.out.cpu().double() - ref).norm() / ref.norm()).item()
        print(f"check mma k{kw} w{warps}: rel err {err:.2e}", flush=True)
        assert err < 1e-6, (kw, warps)
    for ahead, warps in ahead_variants:
        for k in (512, 2816):
            sp = Problem(4, 128, k, 3, 1, device)
            run_mma_ahead(sp, 8, warps, ahead)
            ref = sp.reference()
            err = ((sp.out.cpu().double() - ref).norm() / ref.norm()).item()
            print(f"check mma ahead {ahead} w{warps} K {k}: rel err {err:.2e}", flush=True)
            assert err < 1e-6, (ahead, warps, k)
    for stages, warps, act in ring_variants:
        for k in (512, 2816):
            sp = Problem(4, 128, k, 3, 1, device)
            run_mma_ring(sp, warps, stages, act)
            ref = sp.reference()
            err = ((sp.out.cpu().double() - ref).norm() / ref.norm()).item()
            print(f"check mma ring {stages} stages w{warps} act ring {act} K {k}: rel err {err:.2e}", flush=True)
            assert err < 1e-6, (stages, warps, act, k)
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
        for ahead, warps in ahead_variants:
            us = time_graph([lambda pr=pr, a=ahead, w=warps: run_mma_ahead(pr, 8, w, a) for pr in probs])
            results.append((n, k, experts, f"mma unrolled ahead {ahead} W{16 * warps}", us, nbytes))
        for stages, warps, act in ring_variants:
            us = time_graph([lambda pr=pr, s=stages, w=warps, a=act: run_mma_ring(pr, w, s, a) for pr in probs])
            results.append((n, k, experts, f"mma ring {stages}{' +act' if act else ''} W{16 * warps}", us, nbytes))
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
