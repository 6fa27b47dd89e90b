"""Variants of the Gluon prefill GEMM cores (`kernels/prefill_wgmma._gemm`, `_gemm_t`) in isolation (GPU).

Runs the layer's GEMM core on a precomputed tile table and stores the accumulator as bf16
[N, rows] (no SwiGLU, no requant): warps a program (4: one warpgroup, 64 weight rows; 8: two,
128 rows sharing the activation tile), tokens a program and ring stages. Checked against
float64 on a few experts (random codes, group exponents 0-3 binades apart and a few 20 below,
past the fold's exact range), then timed on v4-flash's L1 and L2 GEMMs (uniform routing, rows
sorted by expert and contiguous). Compare with the layer's stages (`python -m
megamoe.bench.breakdown`) in the same run.

History (H200, 2026-12-02, docs/bench/h200_2026-12-02/): the first version (run 20) read each
step's weight scales with plain loads, a memory latency a step on the critical path: L1 at
4096 tokens 3393 us; through the cp.async ring and with one shared-memory tile per scale group
(no barriers between the decode's stores, run 21): 2654 us, against the Triton L1 stage's 5480.
2026-12-03 (runs 24-26): two warpgroups a program (8x...), gathered rows (g) and the
warp-specialized core (w) were 1-2%, 2% and 8-13% slower than 4x128x4.
Exact products (docs/bench/h200_2026-12-03/, runs 47-50, v4-flash L1 at 4096 tokens): FP16
weights and activations both in shared memory (the activations converted from the FP8 ring each
step) 4883-7629 us against FP8's 3210-3239 (runs 47-48, patches in versions/); `_gemm_t` (t:
the activations as the register operand) 3256 us against 3233, L2 1750 against 1826 (run 50).

    python tools/wgmma_prefill.py [--tokens 4096,8192] [--variants 4x128x4,4x128x4g,8x128x3t]
"""

from __future__ import annotations

import argparse

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from megamoe.kernels import prefill_wgmma as pw
from megamoe.weights import ExpertWeights

@gluon.jit
def _gemm_kernel(a_ptr, as_ptr, src_ptr, w_ptr, ws_ptr, lut_ptr, out_ptr, tiles_ptr, num_rows, k_size,
                 stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n,
                 WARPS: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, GATHER: gl.constexpr,
                 WS: gl.constexpr, TRANSPOSED: gl.constexpr):
    """The layer's GEMM core (`prefill_wgmma._gemm`) on a precomputed tile table, storing the
    accumulator as bf16 [N, rows]: program (n, t) covers weight rows 16 WARPS n ... of tile t.
    GATHER: row i of the table reads activation row src[i] (as L1 reads token rows through
    the sorted-row index), else row i. WS: the warp-specialized core (`prefill_wgmma._gemm_ws`,
    four more warps).
    TRANSPOSED: `_gemm_t` (exact products, the activations as the register operand): program
    (n, t) covers weight rows BLOCK_T n ... (BLOCK_T of them) and 16 WARPS rows of tile t."""
    BLOCK_W: gl.constexpr = 16 * WARPS
    C: gl.constexpr = pw._accumulator_layout(WARPS, BLOCK_T, BLOCK_W, False, False)
    CP_A: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [WARPS, 1], [1, 0])
    CP_S: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    CP_W: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    CP_WS: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [WARPS, 1], [1, 0])
    n0 = gl.program_id(0) * BLOCK_W
    t = gl.program_id(1)
    expert = gl.load(tiles_ptr + 3 * t).to(gl.int64)
    r0 = gl.load(tiles_ptr + 3 * t + 1)
    r1 = gl.load(tiles_ptr + 3 * t + 2)
    if TRANSPOSED:
        BW: gl.constexpr = BLOCK_T    # the variant's second number: weight rows (tokens: 16 WARPS)
        CT: gl.constexpr = pw._accumulator_layout(WARPS, 16 * WARPS, BW, True, True)
        nt = gl.program_id(0) * BW
        ra = r0 + gl.arange(0, 16 * WARPS, layout=gl.SliceLayout(1, CP_A))
        rs = r0 + gl.arange(0, 16 * WARPS, layout=CP_S)
        acc_t = pw._gemm_t(a_ptr, k_size, as_ptr, 4 * gl.cdiv(k_size, 128), (ra, rs), (ra < r1, rs < r1),
                           w_ptr + expert * stride_w_e, stride_w_tile, ws_ptr + expert * stride_ws_e, stride_ws_n,
                           (nt + gl.arange(0, BW, layout=gl.SliceLayout(1, CP_W)),
                            nt + gl.arange(0, BW, layout=gl.SliceLayout(1, CP_WS))), lut_ptr, k_size,
                           CT, CP_A, CP_S, CP_W, CP_WS, WARPS, BW, STAGES)
        tok_t = r0 + gl.arange(0, 16 * WARPS, layout=gl.SliceLayout(1, CT))
        n_t = nt + gl.arange(0, BW, layout=gl.SliceLayout(0, CT))
        out_t = out_ptr + n_t.to(gl.int64)[None, :] * num_rows + tok_t[:, None]
        gl.store(out_t, acc_t.to(gl.bfloat16), mask=gl.broadcast((tok_t < r1)[:, None], out_t)[0])
    else:
        if WS:
            acc = pw._gemm_ws(a_ptr, k_size, as_ptr, 4 * gl.cdiv(k_size, 128), src_ptr, 1, r0, r1,
                              w_ptr + expert * stride_w_e, stride_w_tile, ws_ptr + expert * stride_ws_e, stride_ws_n,
                              n0, gl.num_programs(0) * BLOCK_W, lut_ptr, k_size, C, GATHER, False, BLOCK_T, STAGES)
        else:
            ra = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, CP_A))
            rs = r0 + gl.arange(0, BLOCK_T, layout=CP_S)
            src_a, src_s = ra, rs
            if GATHER:
                src_a = gl.load(src_ptr + ra, mask=ra < r1, other=0)
                src_s = gl.load(src_ptr + rs, mask=rs < r1, other=0)
            acc = pw._gemm(a_ptr, k_size, as_ptr, 4 * gl.cdiv(k_size, 128), (src_a, src_s), (ra < r1, rs < r1),
                           w_ptr + expert * stride_w_e, stride_w_tile, ws_ptr + expert * stride_ws_e, stride_ws_n,
                           (n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_W)),
                            n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_WS))), lut_ptr, k_size,
                           C, CP_A, CP_S, CP_W, CP_WS, WARPS, BLOCK_T, STAGES, False)
        tok = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, C))
        nc = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, C))
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
        step_sc = torch.exp2(torch.randint(-12, -4, (self.rows, steps), device=device).float())
        self.a_sc = step_sc.repeat_interleave(4, dim=1).contiguous()   # [rows, G4], as rebased rows
        self.out = torch.empty(n, self.rows, dtype=torch.bfloat16, device=device)
        # For GATHER: a random order of the activation rows.
        self.src = torch.randperm(self.rows, generator=g).to(torch.int32).to(device)
        self.lut = pw.fold_table(device)
        self.device = device

    def tiles(self, bt: int) -> torch.Tensor:
        t = []
        for e in range(self.experts):
            lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
            for r in range(lo, hi, bt):
                t.append((e, r, min(r + bt, hi)))
        return torch.tensor(t, dtype=torch.int32, device=self.device).flatten()

    def run(self, warps: int, bt: int, stages: int, tiles: torch.Tensor, gather: bool = False,
            ws: bool = False, transposed: bool = False) -> None:
        extra = dict(maxnreg=pw.WS_MAXNREG) if ws else {}
        _gemm_kernel[(self.n // (bt if transposed else 16 * warps), tiles.numel() // 3)](
            self.a8, self.a_sc, self.src, self.w, self.ws.view(torch.int32), self.lut, self.out, tiles, self.rows,
            self.k, self.w.stride(0), self.w.stride(1), self.ws.stride(0) // 2, self.ws.stride(1) // 2,
            WARPS=warps, BLOCK_T=bt, STAGES=stages, GATHER=gather, WS=ws,
            TRANSPOSED=transposed, num_warps=warps, **extra)

    def check(self, experts=(0, 1, 2, 3), gather: bool = False) -> float:
        ew = ExpertWeights("fp8xfp4", self.w, self.ws, self.experts, self.n, self.k)
        num, den = 0.0, 0.0
        for e in experts:
            lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
            rows = self.src[lo:hi].long() if gather else torch.arange(lo, hi, device=self.device)
            a = self.a8[rows].double() * self.a_sc[rows].double().repeat_interleave(32, dim=1)
            ref = ew.dequantize(e).double() @ a.t()
            got = self.out[:, lo:hi].double()
            num += (got - ref).norm().item() ** 2
            den += ref.norm().item() ** 2
        return (num / den) ** 0.5

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.n * self.k


VARIANTS = ["4x128x4", "8x128x3t", "8x128x2t", "4x128x2t", "4x64x3t"]
"""WARPSxBLOCK_TxSTAGES, then `g` for GATHER, `w` for WS (4 warps only) and `t` for TRANSPOSED
(`_gemm_t`, exact products on the FP16 tensor cores: 16 WARPS tokens a tile, the second number
its weight rows)."""


def parse_variant(v: str) -> dict:
    """Problem.run's keyword arguments of variant `v`, and `tile_rows`: the rows of a tile."""
    flags = v[len(v.rstrip("gwt")):]
    w, bt, st = map(int, v.rstrip("gwt").split("x"))
    if "t" in flags and ("w" in flags or "g" in flags):
        raise ValueError(f"variant {v}: `_gemm_t` runs neither warp-specialized nor on gathered rows here")
    return dict(warps=w, bt=bt, stages=st, gather="g" in flags, ws="w" in flags, transposed="t" in flags,
                tile_rows=16 * w if "t" in flags else bt)


def _launch(pr, v: dict, tiles) -> None:
    pr.run(v["warps"], v["bt"], v["stages"], tiles, v["gather"], v["ws"], v["transposed"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4096,8192")
    p.add_argument("--variants", default=",".join(VARIANTS), help="WARPSxBLOCK_TxSTAGES[g],...")
    p.add_argument("--once", action="store_true",
                   help="one launch of the first variant on v4-flash's L1 at the first token count, "
                        "nothing else (for a profiler: ncu -k regex:_gemm_kernel -c 1)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    device = torch.device("cuda")
    if args.once:
        v = parse_variant(variants[0])
        pr = Problem(256, 4096, 4096, int(args.tokens.split(",")[0]), 6, device)
        _launch(pr, v, pr.tiles(v["tile_rows"]))
        torch.cuda.synchronize()
        return
    from megamoe.bench.timing import time_graph
    small = Problem(8, 256, 512, 96, 6, device, spread_rows=0.05)
    for v in variants:
        pv = parse_variant(v)
        small.out.zero_()
        _launch(small, pv, small.tiles(pv["tile_rows"]))
        err = small.check(range(8), pv["gather"])
        print(f"check {v}: rel err against float64 {err:.2e}", flush=True)
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for name, n, k in (("v4-flash L1", 4096, 4096), ("v4-flash L2", 4096, 2048)):
            pr = Problem(256, n, k, tokens, 6, device)
            for v in variants:
                pv = parse_variant(v)
                tiles = pr.tiles(pv["tile_rows"])
                pr.out.zero_()
                _launch(pr, pv, tiles)
                err = pr.check(gather=pv["gather"])
                us = time_graph([lambda: _launch(pr, pv, tiles)], replays=5, min_calls=3)
                rows.append((name, tokens, v, us, pr.flops / us / 1e6, err))
                print(f"{name} {tokens} {v}: {us:.1f} us, {pr.flops / us / 1e6:.0f} TFLOP/s, err {err:.2e}", flush=True)
            del pr
            torch.cuda.empty_cache()
    print("\n| GEMM | tokens | warps x tokens x stages (g: gathered rows) | us | TFLOP/s | rel err |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.0f} | {r[5]:.1e} |")


if __name__ == "__main__":
    main()
