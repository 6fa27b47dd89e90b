"""Can CUDA-core FMAs stream MXFP4 weights faster than the tensor-core decode tiles? (GPU)

At one to eight tokens each expert gets one row or two, so the decode tiles' MMAs (16 rows on
the narrow side) mostly multiply padding, and each step's chain (shared-memory stage, decode,
four MMAs, wait, promotion) holds v4-flash's L1 at about 1.6 TB/s on an H200 (docs/PERF.md).
This tool streams v4-flash's L1 and L2 weights (6 or 44 experts, the kernels' tiled layout,
weights.py) through a kernel with no MMA: each thread loads 16 bytes of a weight row a step (32
weights: 16 of one scale group in the low nibbles, 16 of the next in the high ones), decodes
them, multiplies them with the row's activations on the FP32 units, and keeps a partial sum per
group, promoted with the group's weight scale. Variants:

    a8 / a32   activations read as FP8 with their scales / as FP32 with the scale applied
    W, w, R    weight rows a program, warps, activation rows a program
    U2         two steps an iteration, each step's bytes loaded a step ahead
    S2, S4     split K: 2 or 4 programs a tile, summed with FP32 atomics (the output zeroed first)

next to a plain read-only kernel of the same bytes (4 disjoint copies in rotation, as for the
variants). Every variant is first checked against float64 products on a small problem. On an
H200 (2026-12-02, docs/PERF.md "v14"): at 6 experts the FMA loop matched the MMA tiles (a8 W64:
30.9 us against the layer's L1 stage of 34.2) and U2 or split K took 10-18% off; at 44 experts
a8 W64 took 135 us against 236 for the layer's MMA L1 at 8 tokens. The layer's FMA tiles
(expert_mma.mxfp4_rows_fma) are a8 W64 R1, with U2 at one token.

    python tools/fma_stream.py [--cases 4096x4096x6,4096x2048x6]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megamoe.formats import e2m1_lut
from megamoe.kernels.expert_mma import _load_scales, decode_e2m1_pair_packed
from megamoe.kernels.common import decode_e2m1_pair
from megamoe.weights import TILE_ROWS, tile_steps


@dataclass(frozen=True)
class Variant:
    wide_a: bool = True
    block_w: int = 64
    warps: int = 4
    rows: int = 1
    unroll2: bool = False
    split: int = 1

    @property
    def name(self) -> str:
        return (f"{'a32' if self.wide_a else 'a8'} W{self.block_w} w{self.warps} R{self.rows}"
                + (" U2" if self.unroll2 else "") + (f" S{self.split}" if self.split > 1 else ""))


VARIANTS = [Variant(), Variant(block_w=32), Variant(block_w=32, unroll2=True, split=2),
            Variant(unroll2=True), Variant(block_w=32, unroll2=True), Variant(block_w=128, warps=8, unroll2=True),
            Variant(split=2), Variant(split=4), Variant(block_w=32, split=2), Variant(unroll2=True, split=2),
            Variant(wide_a=False), Variant(wide_a=False, unroll2=True), Variant(rows=2), Variant(rows=2, unroll2=True),
            Variant(rows=2, wide_a=False, unroll2=True)]


@triton.jit
def _row_partials(lo, hi, a_ptr, as_ptr, row, stride_a, stride_as, step, k_lo, g_lo, WIDE_A: tl.constexpr,
                  PTX: tl.constexpr):
    """[BLOCK_W, 4] partial sums of one activation row against a step's decoded weights."""
    if WIDE_A:
        base = a_ptr + row * stride_a + 128 * step
        x_lo = tl.load(base + k_lo)
        x_hi = tl.load(base + k_lo + 32)
        return tl.sum(lo * x_lo, axis=2, keep_dims=True), tl.sum(hi * x_hi, axis=2, keep_dims=True)
    else:
        base = a_ptr + row * stride_a + 128 * step
        x_lo = tl.load(base + k_lo).to(tl.float32)
        x_hi = tl.load(base + k_lo + 32).to(tl.float32)
        s_lo = _load_scales(as_ptr + row * stride_as + 4 * step + g_lo, PTX)
        s_hi = _load_scales(as_ptr + row * stride_as + 4 * step + g_lo + 1, PTX)
        return (tl.sum(lo * x_lo, axis=2, keep_dims=True) * s_lo,
                tl.sum(hi * x_hi, axis=2, keep_dims=True) * s_hi)


@triton.jit
def _step(raw, step, acc0, acc1, ws_base, a_ptr, as_ptr, row0, stride_a, stride_as, k_lo, g_lo,
          BLOCK_W: tl.constexpr, R: tl.constexpr, WIDE_A: tl.constexpr, PTX: tl.constexpr):
    """One 128-wide step of K: the loaded bytes [BLOCK_W, 64] decoded and multiplied in."""
    packed = tl.reshape(raw, (BLOCK_W, 4, 16))
    if PTX:
        lo, hi = decode_e2m1_pair_packed(packed)
    else:
        lo, hi = decode_e2m1_pair(packed)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    sw_lo = _load_scales(ws_base + 4 * step, PTX)
    sw_hi = _load_scales(ws_base + 4 * step + 1, PTX)
    p_lo, p_hi = _row_partials(lo, hi, a_ptr, as_ptr, row0, stride_a, stride_as, step, k_lo, g_lo, WIDE_A, PTX)
    acc0 += p_lo * sw_lo + p_hi * sw_hi
    if R > 1:
        p_lo, p_hi = _row_partials(lo, hi, a_ptr, as_ptr, row0 + 1, stride_a, stride_as, step, k_lo, g_lo, WIDE_A,
                                   PTX)
        acc1 += p_lo * sw_lo + p_hi * sw_hi
    return acc0, acc1


@triton.jit
def _fma_kernel(w_ptr, ws_ptr, a_ptr, as_ptr, out_ptr, experts_ptr, tiles_per_expert, steps,
                stride_w_e, stride_w_tile, stride_ws_e, stride_ws_n, stride_a, stride_as, n_rows,
                BLOCK_W: tl.constexpr, R: tl.constexpr, WIDE_A: tl.constexpr, PTX: tl.constexpr,
                UNROLL2: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    slot = pid // tiles_per_expert
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    n = (pid % tiles_per_expert) * BLOCK_W + tl.arange(0, BLOCK_W)
    q = tl.arange(0, 4)
    b = tl.arange(0, 16)
    # A row's 64 bytes of a step as one contiguous axis, so each thread loads 16 of them at once
    # and a warp's threads take consecutive 16-byte pieces; reshaped to [row, piece, byte] below.
    w_base = (w_ptr + expert * stride_w_e + (n // 32)[:, None] * stride_w_tile + (n % 32)[:, None] * 64
              + tl.arange(0, 64)[None, :])
    # Byte j of chunk c holds element 64c + j (low nibble) and 64c + 32 + j (high nibble).
    k_lo = (64 * (q // 2) + 16 * (q % 2))[None, :, None] + b[None, None, :]
    # Scale tensors and partial sums are [BLOCK_W, 4, 1]: the layout of the weights' reduction.
    g_lo = 2 * (q // 2)[None, :, None]
    ws_base = ws_ptr + expert * stride_ws_e + n[:, None, None] * stride_ws_n + g_lo
    acc0 = tl.zeros((BLOCK_W, 4, 1), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_W, 4, 1), dtype=tl.float32)
    row0 = slot * R
    per = steps // SPLIT
    first = tl.program_id(1) * per
    if UNROLL2:
        # Two steps an iteration, each step's bytes loaded one step ahead into a register set
        # of its own (a rotation of loaded registers would wait for the load at the back edge).
        a_raw = tl.load(w_base + first * 2048)
        for step in range(first, first + per, 2):
            b_raw = tl.load(w_base + (step + 1) * 2048)
            acc0, acc1 = _step(a_raw, step, acc0, acc1, ws_base, a_ptr, as_ptr, row0, stride_a, stride_as, k_lo,
                               g_lo, BLOCK_W, R, WIDE_A, PTX)
            a_raw = tl.load(w_base + tl.minimum(step + 2, first + per - 1) * 2048)
            acc0, acc1 = _step(b_raw, step + 1, acc0, acc1, ws_base, a_ptr, as_ptr, row0, stride_a, stride_as,
                               k_lo, g_lo, BLOCK_W, R, WIDE_A, PTX)
    else:
        for step in range(first, first + per):
            raw = tl.load(w_base + step * 2048)
            acc0, acc1 = _step(raw, step, acc0, acc1, ws_base, a_ptr, as_ptr, row0, stride_a, stride_as, k_lo,
                               g_lo, BLOCK_W, R, WIDE_A, PTX)
    out = out_ptr + row0 * n_rows + n
    if SPLIT == 1:
        tl.store(out, tl.sum(tl.sum(acc0, axis=2), axis=1) * 64.0)
        if R > 1:
            tl.store(out + n_rows, tl.sum(tl.sum(acc1, axis=2), axis=1) * 64.0)
    else:
        tl.atomic_add(out, tl.sum(tl.sum(acc0, axis=2), axis=1) * 64.0, sem="relaxed")
        if R > 1:
            tl.atomic_add(out + n_rows, tl.sum(tl.sum(acc1, axis=2), axis=1) * 64.0, sem="relaxed")


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_chunks, CHUNK: tl.constexpr):
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros((CHUNK,), dtype=tl.int32)
    for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        acc += tl.load(src_ptr + c * CHUNK + offs).to(tl.int32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


class Problem:
    """`experts` experts of [n, k] MXFP4 weights in the tiled layout, slots x R activation rows."""

    def __init__(self, experts, n, k, slots, rows, device):
        self.n, self.k, self.slots, self.rows = n, k, slots, rows
        # The packed rows as weights.py builds them (chunks of 64: low nibble j, high nibble 32 + j).
        self.packed = torch.randint(0, 256, (experts, n, k // 2), dtype=torch.uint8, device=device)
        self.w = tile_steps(self.packed)
        exps = torch.randint(120, 130, (experts, n, k // 32), device=device)
        self.ws = torch.pow(2.0, (exps - 127).float()).bfloat16()
        self.experts = torch.randint(0, experts, (slots,), device=device).to(torch.int32)
        m = slots * rows
        x = torch.randn(m, k, device=device) * 100
        self.a8 = x.clamp(-448, 448).to(torch.float8_e4m3fn)
        self.a_scales = torch.pow(2.0, torch.randint(-4, 4, (m, k // 32), device=device).float())
        self.a32 = (self.a8.float() * self.a_scales.repeat_interleave(32, dim=1)).contiguous()
        self.out = torch.empty(m, n, dtype=torch.float32, device=device)

    def weights_f64(self, e):
        n, half = self.packed[e].shape
        chunks = self.packed[e].view(n, half // 32, 1, 32).cpu()
        codes = torch.cat([chunks & 0xF, chunks >> 4], dim=2).reshape(n, 2 * half)
        values = e2m1_lut(torch.device("cpu"))[codes.long()].double()
        return values * self.ws[e].cpu().double().repeat_interleave(32, dim=1)

    def reference(self):
        out = torch.empty(self.slots * self.rows, self.n, dtype=torch.float64)
        for s in range(self.slots):
            w = self.weights_f64(int(self.experts[s]))
            a = self.a32[s * self.rows:(s + 1) * self.rows].cpu().double()
            out[s * self.rows:(s + 1) * self.rows] = a @ w.T
        return out

    def run(self, v: Variant, ptx: bool):
        tiles = self.n // v.block_w
        a = self.a32 if v.wide_a else self.a8
        if v.split > 1:
            self.out.zero_()
        _fma_kernel[(self.slots * tiles, v.split)](
            self.w, self.ws, a, self.a_scales, self.out, self.experts, tiles, self.k // 128,
            self.w.stride(0), self.w.stride(1), self.ws.stride(0), self.ws.stride(1), a.stride(0),
            self.a_scales.stride(0), self.n, BLOCK_W=v.block_w, R=v.rows, WIDE_A=v.wide_a, PTX=ptx,
            UNROLL2=v.unroll2, SPLIT=v.split, num_warps=v.warps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=lambda t: [tuple(map(int, c.split("x"))) for c in t.split(",")],
                   default=[(4096, 4096, 6), (4096, 2048, 6), (4096, 4096, 44)],
                   help="N x K x experts, comma-separated (default: v4-flash L1 and L2 at one token, "
                        "L1 at 8 tokens)")
    p.add_argument("--check-only", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ptx = device.type == "cuda"
    torch.manual_seed(0)
    for v in VARIANTS:
        sp = Problem(4, 128, 512, 3, v.rows, device)
        sp.run(v, ptx)
        ref = sp.reference()
        err = ((sp.out.cpu().double() - ref).norm() / ref.norm()).item()
        print(f"check {v.name:20s} rel err {err:.2e}")
        assert err < 1e-6, v.name
    if args.check_only or device.type != "cuda":
        return
    from megamoe.bench.timing import time_graph
    results = []
    for n, k, experts in args.cases:
        probs, nbytes, read_us = rotations(n, k, experts, 4, device)
        results.append((n, k, experts, "read-only", read_us, nbytes))
        for v in VARIANTS:
            if v.rows > 1 and experts * v.rows > 64:
                continue
            us = time_graph([lambda pr=pr, v=v: pr.run(v, ptx) for pr in probs])
            results.append((n, k, experts, v.name, us, nbytes))
        del probs
        torch.cuda.empty_cache()
    print_table(results)


def rotations(n, k, experts, rows, device):
    """Four Problems over disjoint sets of `experts` of one 256-expert set of weights, to run in
    rotation so the weights are not served from the L2 cache; their bytes; and the time of the
    read-only kernel over 4 disjoint ranges of as many bytes."""
    from megamoe.bench.timing import time_graph
    big = Problem(256, n, k, experts, rows, device)
    probs = []
    for i in range(4):
        sub = Problem.__new__(Problem)
        sub.__dict__.update(big.__dict__)
        sub.experts = torch.arange(i * experts, (i + 1) * experts, dtype=torch.int32, device=device)
        sub.out = torch.empty_like(big.out)
        probs.append(sub)
    nbytes = experts * n * k // 2 + experts * n * k // 32 * 2
    srcs = [big.w.view(-1)[i * nbytes:(i + 1) * nbytes] for i in range(4)]
    sums = torch.empty(132 * 8, dtype=torch.int32, device=device)
    read_us = time_graph([lambda src=src: _read_kernel[(sums.numel(),)](src, sums, nbytes // 4096, CHUNK=4096,
                                                                         num_warps=8) for src in srcs])
    return probs, nbytes, read_us


def print_table(results):
    """results: (N, K, experts, variant, us, bytes) rows."""
    print(f"{'N x K':12s} {'experts':>7s} {'variant':28s} {'us':>8s} {'TB/s':>6s}")
    for n, k, experts, name, us, nbytes in results:
        print(f"{f'{n}x{k}':12s} {experts:7d} {name:28s} {us:8.1f} {nbytes / us / 1e6:6.2f}")


if __name__ == "__main__":
    main()
