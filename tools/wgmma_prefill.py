"""Can a prefill tile keep the tensor cores busy while it decodes MXFP4? (Gluon prototype, GPU)

The layer's prefill tiles (`expert_mma.mxfp4_rows_dot`, more than 32 rows) run at 11-12% of the
H200's FP8 rate (docs/PERF.md): each of a step's four register-operand MMAs is waited for
before the next decode, a promotion per group of 32 needs its own partial product, and one
255-register program fills an SM. This prototype tries the structure that "What limits it"
points to, in Gluon with asynchronous wgmma:

* The weight scales are folded into the decoded FP8 values. In each 128-wide step of a weight
  row, with m the largest of its four group exponents, group g decodes to
  round_e4m3(value * 2^(6 - (m - e_g))): the row's step is then one FP8 matrix with one scale
  2^(m - 133), so a step is four chained k32 MMAs into one partial tile and one promotion
  (acc += tile * weight scale * activation scale), as in DeepGEMM's FP8 GEMMs. Exact while a
  row's groups of a step span at most 14 binades (6 * 2^6 = 384 fits e4m3, 0.5 * 2^-8 is its
  smallest subnormal); past that values round to the nearest e4m3 (an error of at most 2^-10
  of 2^m, as `kernels/rebase.py` does for the activations). The decode is a byte permute per
  four codes from an 8-entry table per (row, group): `prmt` picks each code's e4m3 magnitude
  out of the two table words, the sign bit is or-ed in.
* Activation rows (already rebased to one scale per step) are gathered into a 128B-swizzled
  shared ring with cp.async, the packed weight bytes into a second ring; the decoded weights
  go straight into wgmma's register operand (the weights are the MMA's M side, 64 rows a
  warpgroup; the tokens its N side, up to 128), never through shared memory.
* The MMAs of step k run asynchronously while the program decodes step k + 1; then it waits,
  promotes, and moves on. A program is one warpgroup (or two), so two programs an SM can
  overlap one's promotion with the other's MMAs.

Checked against float64 on a few experts, then timed on v4-flash's L1 and L2 GEMMs at 4096
and 8192 tokens (uniform routing, rows already sorted by expert and contiguous). Output:
bf16 [N, rows] (no SwiGLU): the GEMM alone, to compare with the layer's L1 and L2 stages
(`python -m megamoe.bench.breakdown`) in the same run.

    python tools/wgmma_prefill.py [--tokens 4096,8192]
"""

from __future__ import annotations

import argparse

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from megamoe.formats import E2M1_VALUES
from megamoe.weights import ExpertWeights

LUT_ROWS = 24
"""Table rows: the spread d = m - e_g of a group below its step's largest, clamped (from 19 on
every entry rounds to zero)."""

FOLD_PTX = gl.constexpr("""{
        .reg .b32 t, u, s;
        and.b32 t, $2, 0x07070707;
        shr.b32 u, t, 4;
        or.b32 t, t, u;
        prmt.b32 s, t, t, 0x20;
        prmt.b32 t, $3, $4, s;
        shl.b32 u, $2, 4;
        and.b32 u, u, 0x80808080;
        or.b32 $0, t, u;
        shr.b32 t, $2, 4;
        and.b32 t, t, 0x07070707;
        shr.b32 u, t, 4;
        or.b32 t, t, u;
        prmt.b32 s, t, t, 0x20;
        prmt.b32 t, $5, $6, s;
        and.b32 u, $2, 0x80808080;
        or.b32 $1, t, u;
        }""")
"""Four packed bytes ($2) -> the e4m3 bytes of their low ($0) and high ($1) nibbles, each
magnitude looked up in its group's table (low: words $3, $7; high: $11, $15; each table word
arrives four times, once per packed element). The magnitudes c0..c3 (3 bits a byte) are
gathered into the four selector nibbles of `prmt` (t | t >> 4 puts c_i and c_i+1 in one byte;
bytes 0 and 2 of that hold all four), the sign is bit 3 (low) or 7 (high) of each code."""


def fold_table(device) -> torch.Tensor:
    """int32 [LUT_ROWS, 2]: row d holds the e4m3 bytes of the eight e2m1 magnitudes times
    2^(6 - d), rounded to nearest even, little-endian (word 0: codes 0-3, word 1: codes 4-7)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    d = torch.arange(LUT_ROWS, dtype=torch.float32)
    values = mags[None, :] * torch.exp2(6.0 - d)[:, None]
    return values.to(torch.float8_e4m3fn).view(torch.uint8).contiguous().view(torch.int32).to(device)


@gluon.jit
def _fold_decode(raw, l0, l1, h0, h1):
    """int32 words of packed bytes -> int32 words of the e4m3 bytes of their low and high
    nibbles (FOLD_PTX), the table words given per element (broadcast along a row)."""
    return gl.inline_asm_elementwise(
        asm=FOLD_PTX, constraints="=r,=r,r,r,r,r,r", args=[raw, l0, l1, h0, h1], dtype=(gl.int32, gl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _table_words(lut_ptr, top, e, like):
    d = gl.minimum(top - e, 23)
    w0, _ = gl.broadcast(gl.load(lut_ptr + 2 * d)[:, None], like)
    w1, _ = gl.broadcast(gl.load(lut_ptr + 2 * d + 1)[:, None], like)
    return w0, w1


@gluon.jit
def _decode_step(w_words, d0, d1, d2, d3, ws_slot, lut_ptr, RAW: gl.constexpr):
    """Decode one step's packed bytes (int32 view [BW, 16] of a ring slot) into FP8 in shared
    memory (d0-d3: int32 views [BW, 8] of the four groups' [BW, 32] e4m3 tiles), each row's scales
    (ws_slot: the step's bf16 scales read as int16 [BW, 4]) folded in (module docstring).
    Returns each row's largest group exponent (layout SliceLayout(1, RAW))."""
    e = (ws_slot.load(RAW).to(gl.int32) >> 7) & 0xFF
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, RAW))[None, :]
    e0 = gl.sum(gl.where(q == 0, e, 0), axis=1)
    e1 = gl.sum(gl.where(q == 1, e, 0), axis=1)
    e2 = gl.sum(gl.where(q == 2, e, 0), axis=1)
    e3 = gl.sum(gl.where(q == 3, e, 0), axis=1)
    top = gl.max(e, axis=1)
    # Chunk c (words 8c .. 8c + 7 of a row's 64 bytes): byte j's low nibble is element j of
    # group 2c (decoded words 16c ..), its high nibble element j of group 2c + 1 (words 16c + 8 ..).
    # Both chunks are loaded before any store, and each group's tile is an allocation of its
    # own, so the shared-memory hazard analysis puts no barrier between the stores.
    raw0 = w_words.slice(0, 8, dim=1).load(RAW)
    raw1 = w_words.slice(8, 8, dim=1).load(RAW)
    l0, l1 = _table_words(lut_ptr, top, e0, raw0)
    h0, h1 = _table_words(lut_ptr, top, e1, raw0)
    lo0, hi0 = _fold_decode(raw0, l0, l1, h0, h1)
    l0, l1 = _table_words(lut_ptr, top, e2, raw1)
    h0, h1 = _table_words(lut_ptr, top, e3, raw1)
    lo1, hi1 = _fold_decode(raw1, l0, l1, h0, h1)
    d0.store(lo0)
    d1.store(hi0)
    d2.store(lo1)
    d3.store(hi1)
    return top


@gluon.jit
def _prefill_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, lut_ptr, out_ptr, tiles_ptr, num_rows, k_size,
                    stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n,
                    WARPS: gl.constexpr, BT: gl.constexpr, STAGES: gl.constexpr):
    BW: gl.constexpr = 16 * WARPS
    C: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BT, 32])
    ROWS_C: gl.constexpr = gl.SliceLayout(1, C)
    COLS_C: gl.constexpr = gl.SliceLayout(0, C)
    RAW: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [WARPS, 1], [1, 0])
    CP_A: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [WARPS, 1], [1, 0])
    CP_W: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    CP_S: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    CP_WS: gl.constexpr = gl.BlockedLayout([1, 2], [16, 2], [WARPS, 1], [1, 0])
    FP8_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    GROUP_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=8, rank=2)
    GROUP_WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=32, rank=2)
    PLAIN_2D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    PLAIN_1D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])

    n0 = gl.program_id(0) * BW
    t = gl.program_id(1)
    expert = gl.load(tiles_ptr + 3 * t).to(gl.int64)
    r0 = gl.load(tiles_ptr + 3 * t + 1)
    r1 = gl.load(tiles_ptr + 3 * t + 2)
    steps = k_size // 128

    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BT, 128], FP8_SMEM)
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BT], PLAIN_1D)
    w_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BW, 64], PLAIN_2D)
    ws_ring = gl.allocate_shared_memory(gl.int16, [STAGES, BW, 4], PLAIN_2D)
    # The decoded weights, double-buffered: one [BW, 32] tile per group of the step.
    dec0 = gl.allocate_shared_memory(gl.float8e4nv, [2, BW, 32], GROUP_SMEM)
    dec1 = gl.allocate_shared_memory(gl.float8e4nv, [2, BW, 32], GROUP_SMEM)
    dec2 = gl.allocate_shared_memory(gl.float8e4nv, [2, BW, 32], GROUP_SMEM)
    dec3 = gl.allocate_shared_memory(gl.float8e4nv, [2, BW, 32], GROUP_SMEM)

    ar = r0 + gl.arange(0, BT, layout=gl.SliceLayout(1, CP_A))
    ak = gl.arange(0, 128, layout=gl.SliceLayout(0, CP_A))
    a_src = a_ptr + ar.to(gl.int64)[:, None] * k_size + ak[None, :]
    a_mask, _ = gl.broadcast((ar < r1)[:, None], a_src)
    sr = r0 + gl.arange(0, BT, layout=CP_S)
    s_src = as_ptr + sr
    s_mask = sr < r1
    wr = n0 + gl.arange(0, BW, layout=gl.SliceLayout(1, CP_W))
    wb = gl.arange(0, 64, layout=gl.SliceLayout(0, CP_W))
    w_src = (w_ptr + expert * stride_w_e + (wr // 32).to(gl.int64)[:, None] * stride_w_tile
             + (wr % 32)[:, None] * 64 + wb[None, :])
    w_all = gl.full(w_src.shape, 1, gl.int1, CP_W)
    wsr = n0 + gl.arange(0, BW, layout=gl.SliceLayout(1, CP_WS))
    wsq = gl.arange(0, 4, layout=gl.SliceLayout(0, CP_WS))
    ws_src = ws_ptr + expert * stride_ws_e + wsr[:, None] * stride_ws_n + wsq[None, :]
    ws_all = gl.full(ws_src.shape, 1, gl.int1, CP_WS)
    for s in gl.static_range(STAGES - 1):
        async_copy.async_copy_global_to_shared(a_ring.index(s), a_src + s * 128, mask=a_mask)
        async_copy.async_copy_global_to_shared(s_ring.index(s), s_src + s * num_rows, mask=s_mask)
        async_copy.async_copy_global_to_shared(w_ring.index(s), w_src + s * 2048)
        async_copy.async_copy_global_to_shared(ws_ring.index(s), ws_src + s * 4)
        async_copy.commit_group()

    tok = r0 + gl.arange(0, BT, layout=COLS_C)
    acc = gl.zeros([BW, BT], gl.float32, C)

    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()
    top = _decode_step(w_ring.index(0)._reinterpret(gl.int32, [BW, 16], PLAIN_2D),
                       dec0.index(0)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                       dec1.index(0)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                       dec2.index(0)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                       dec3.index(0)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS), ws_ring.index(0), lut_ptr, RAW)
    fence_async_shared()
    gl.thread_barrier()
    for step in range(steps):
        slot = step % STAGES
        b = a_ring.index(slot)
        cur = step % 2
        part = warpgroup_mma(dec0.index(cur), b.slice(0, 32, dim=1).permute((1, 0)), acc, use_acc=False,
                             is_async=True)
        part = warpgroup_mma(dec1.index(cur), b.slice(32, 32, dim=1).permute((1, 0)), part, is_async=True)
        part = warpgroup_mma(dec2.index(cur), b.slice(64, 32, dim=1).permute((1, 0)), part, is_async=True)
        part = warpgroup_mma(dec3.index(cur), b.slice(96, 32, dim=1).permute((1, 0)), part, is_async=True)
        # Refill the slot step - 1 used: its MMAs were waited for; the compiler puts a CTA
        # barrier before these copies (its reads of the slot), so every warp is past them.
        nxt = step + STAGES - 1
        fill = (slot + STAGES - 1) % STAGES
        more = nxt < steps
        async_copy.async_copy_global_to_shared(a_ring.index(fill), a_src + nxt * 128, mask=a_mask & more)
        async_copy.async_copy_global_to_shared(s_ring.index(fill), s_src + nxt * num_rows, mask=s_mask & more)
        async_copy.async_copy_global_to_shared(w_ring.index(fill), w_src + nxt * 2048, mask=w_all & more)
        async_copy.async_copy_global_to_shared(ws_ring.index(fill), ws_src + nxt * 4, mask=ws_all & more)
        async_copy.commit_group()
        # Decode the next step while this one's MMAs run.
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        # (After the last step this decodes a slot of zeros that nothing reads.)
        nb = 1 - cur
        ntop = _decode_step(w_ring.index((step + 1) % STAGES)._reinterpret(gl.int32, [BW, 16], PLAIN_2D),
                            dec0.index(nb)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                            dec1.index(nb)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                            dec2.index(nb)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                            dec3.index(nb)._reinterpret(gl.int32, [BW, 8], GROUP_WORDS),
                            ws_ring.index((step + 1) % STAGES), lut_ptr, RAW)
        fence_async_shared()
        part = warpgroup_mma_wait(0, deps=[part])
        sw = gl.convert_layout(((top - 6) << 23).to(gl.float32, bitcast=True), ROWS_C)
        sa = s_ring.index(slot).load(COLS_C)
        acc += part * (sw[:, None] * sa[None, :])
        top = ntop
    async_copy.wait_group(0)

    nc = n0 + gl.arange(0, BW, layout=ROWS_C)
    out = out_ptr + nc.to(gl.int64)[:, None] * num_rows + tok[None, :]
    gl.store(out, acc.to(gl.bfloat16), mask=gl.broadcast((tok < r1)[None, :], out)[0])


class Problem:
    """One grouped GEMM: `experts` experts' MXFP4 [n, k] weights (kernel layout) times rows
    routed to them, sorted by expert and contiguous (FP8, one scale per row and step)."""

    def __init__(self, experts: int, n: int, k: int, tokens: int, topk: int, device, spread_rows: float = 0.01):
        g = torch.Generator(device="cpu").manual_seed(0)
        choice = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices
        counts = torch.bincount(choice.flatten(), minlength=experts)
        self.offsets = torch.zeros(experts + 1, dtype=torch.int64)
        self.offsets[1:] = counts.cumsum(0)
        self.rows = int(self.offsets[-1])
        self.n, self.k, self.experts = n, k, experts
        steps = k // 128
        self.w = torch.randint(0, 256, (experts, n // 32, steps, 32, 64), dtype=torch.uint8, device=device)
        # Group exponents: a per-row base and 0-3 binades above it; a few groups 20 below
        # (past the fold's exact range) so the rounding path runs too.
        base = torch.randint(110, 124, (experts, n, 1), device=device)
        expo = base + torch.randint(0, 4, (experts, n, 4 * steps), device=device)
        far = torch.rand(expo.shape, device=device) < spread_rows
        expo = torch.where(far, expo - 20, expo)
        self.ws = (expo.to(torch.int32) << 23).view(torch.float32).to(torch.bfloat16)
        self.a8 = (torch.randn(self.rows, k, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        self.a_sc = torch.exp2(torch.randint(-12, -4, (steps, self.rows), device=device).float()).contiguous()
        self.out = torch.empty(n, self.rows, dtype=torch.bfloat16, device=device)
        self.lut = fold_table(device)
        self.device = device

    def tiles(self, bt: int) -> torch.Tensor:
        t = []
        for e in range(self.experts):
            lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
            for r in range(lo, hi, bt):
                t.append((e, r, min(r + bt, hi)))
        return torch.tensor(t, dtype=torch.int32, device=self.device).flatten()

    def run(self, warps: int, bt: int, stages: int, tiles: torch.Tensor) -> None:
        _prefill_kernel[(self.n // (16 * warps), tiles.numel() // 3)](
            self.a8, self.a_sc, self.w, self.ws.view(torch.int16), self.lut, self.out, tiles, self.rows, self.k,
            self.w.stride(0), self.w.stride(1), self.ws.stride(0), self.ws.stride(1),
            WARPS=warps, BT=bt, STAGES=stages, num_warps=warps)

    def check(self, experts=(0, 1, 2, 3)) -> float:
        ew = ExpertWeights("fp8xfp4", self.w, self.ws, self.experts, self.n, self.k)
        num, den = 0.0, 0.0
        for e in experts:
            lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
            a = self.a8[lo:hi].double() * self.a_sc[:, lo:hi].t().double().repeat_interleave(128, dim=1)
            ref = ew.dequantize(e).double() @ a.t()
            got = self.out[:, lo:hi].double()
            num += (got - ref).norm().item() ** 2
            den += ref.norm().item() ** 2
        return (num / den) ** 0.5

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.n * self.k


VARIANTS = [(4, 128, 3), (4, 128, 4), (4, 64, 4)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4096,8192")
    p.add_argument("--variants", default=",".join(f"{w}x{b}x{s}" for w, b, s in VARIANTS),
                   help="WARPSxBTxSTAGES,...")
    args = p.parse_args(argv)
    variants = [tuple(map(int, v.split("x"))) for v in args.variants.split(",")]
    device = torch.device("cuda")
    from megamoe.bench.timing import time_graph
    small = Problem(8, 256, 512, 96, 6, device, spread_rows=0.05)
    for w, bt, st in variants:
        small.out.zero_()
        small.run(w, bt, st, small.tiles(bt))
        err = small.check(range(8))
        print(f"check {w}x{bt}x{st}: rel err against float64 {err:.2e}", flush=True)
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for name, n, k in (("v4-flash L1", 4096, 4096), ("v4-flash L2", 4096, 2048)):
            pr = Problem(256, n, k, tokens, 6, device)
            for w, bt, st in variants:
                tiles = pr.tiles(bt)
                pr.out.zero_()
                pr.run(w, bt, st, tiles)
                err = pr.check()
                us = time_graph([lambda: pr.run(w, bt, st, tiles)], replays=5, min_calls=3)
                rows.append((name, tokens, f"{w}x{bt}x{st}", us, pr.flops / us / 1e6, err))
                print(f"{name} {tokens} {w}x{bt}x{st}: {us:.1f} us, {pr.flops / us / 1e6:.0f} TFLOP/s, "
                      f"err {err:.2e}", flush=True)
            del pr
            torch.cuda.empty_cache()
    print("\n| GEMM | tokens | warps x tokens x stages | us | TFLOP/s | rel err |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.1e} |")


if __name__ == "__main__":
    main()
