"""How fast can a Triton program stream weight tiles into FP8 MMAs? (GPU)

The decode GEMMs move weights at 1.3-1.5 TB/s on an H100, about half its copy bandwidth, however
many programs an SM holds and however few instructions the K loop has (docs/PERF.md). This tool
streams the bytes of v4-flash's L1 at one token (6 experts x 2I rows x H/2 bytes = 50 MB)
through a bare load -> tl.dot loop with nothing else in it, in several variants, next to a
device copy and a plain read-only kernel of the same size:

    rows     the layout before v9: step s of a tile reads bytes [64 s, 64 s + 64) of its rows
    rows128  the same rows, 128 bytes a row per step (half the steps)
    tiled    the kernels' layout since v9 (weights.py): each step's 32 rows x 64 bytes are one
             contiguous 2 KB block

and, on `rows`, more pipeline stages, wider tiles, more warps, split K (programs per tile,
summed with atomics) and TMA loads (host tensor descriptors). Measured on an H100 (2026-11-28,
docs/PERF.md): the read-only kernel 1.77 TB/s, every streaming variant 0.74-1.21 TB/s, the
layouts within 3% of each other; the kernels' L1 moved 1.49 TB/s on the same machine.

    python tools/weight_stream.py [--experts 6] [--hidden 4096] [--intermediate 2048]

Every variant is first checked against float64 products on a small problem. Under
TRITON_INTERPRET=1 it only runs that check (the interpreter has no TMA).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from megamoe.bench.timing import time_eager
from megamoe.weights import TILE_ROWS, tile_steps

BLOCK_M = 16
LAYOUTS = {"rows": (False, 64), "rows128": (False, 128), "tiled": (True, 64)}


@dataclass(frozen=True)
class Variant:
    """One way of streaming the weights: layout, rows per program, warps, pipeline stages, K split
    (programs per row tile, summed with atomics) and whether the loads go through TMA."""
    layout: str
    block_w: int = 64
    warps: int = 4
    stages: int = 4
    split: int = 1
    tma: bool = False

    @property
    def name(self) -> str:
        extra = (f" split{self.split}" if self.split > 1 else "") + (" tma" if self.tma else "")
        return f"{self.layout} W{self.block_w} w{self.warps} s{self.stages}{extra}"


# The kernels' shape (rows W64 w4 s4) first, then one change at a time.
VARIANTS = [Variant("rows"), Variant("rows128"), Variant("tiled"),
            Variant("rows", stages=8), Variant("rows", block_w=128), Variant("rows", block_w=128, warps=8, stages=6),
            Variant("rows", split=2), Variant("rows", split=4), Variant("tiled", stages=8),
            Variant("rows", tma=True), Variant("rows", stages=8, tma=True), Variant("rows", block_w=128, tma=True),
            Variant("rows", split=2, stages=6, tma=True)]


@triton.jit
def _stream_kernel(w_ptr, b_ptr, out_ptr, row_bytes, steps, TILED: tl.constexpr, STEP_BYTES: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr):
    tile = tl.program_id(0)
    r = tl.arange(0, BLOCK_W)
    c = tl.arange(0, STEP_BYTES)
    m = tl.arange(0, BLOCK_M)
    b = tl.load(b_ptr + c[:, None] * BLOCK_M + m[None, :]).to(tl.float8e4nv, bitcast=True)
    acc = tl.zeros((BLOCK_W, BLOCK_M), dtype=tl.float32)
    per = steps // SPLIT
    for s in range(tl.program_id(1) * per, tl.program_id(1) * per + per):
        if TILED:
            n = tile * BLOCK_W + r
            offs = ((n // TILE) * steps + s)[:, None] * (TILE * STEP_BYTES) + (n % TILE)[:, None] * STEP_BYTES \
                + c[None, :]
        else:
            offs = (tile * BLOCK_W + r[:, None]) * row_bytes + s * STEP_BYTES + c[None, :]
        w = tl.load(w_ptr + offs)
        acc += tl.dot(w.to(tl.float8e4nv, bitcast=True), b)
    _store(out_ptr, tile * BLOCK_W + r, m, acc, BLOCK_M, SPLIT)


@triton.jit
def _stream_tma_kernel(w_desc, b_ptr, out_ptr, steps, BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr,
                       SPLIT: tl.constexpr):
    """The rows layout through TMA: each step's [BLOCK_W, 64] box lands in shared memory."""
    tile = tl.program_id(0)
    r = tl.arange(0, BLOCK_W)
    c = tl.arange(0, 64)
    m = tl.arange(0, BLOCK_M)
    b = tl.load(b_ptr + c[:, None] * BLOCK_M + m[None, :]).to(tl.float8e4nv, bitcast=True)
    acc = tl.zeros((BLOCK_W, BLOCK_M), dtype=tl.float32)
    per = steps // SPLIT
    for s in range(tl.program_id(1) * per, tl.program_id(1) * per + per):
        acc += tl.dot(w_desc.load([tile * BLOCK_W, s * 64]), b)
    _store(out_ptr, tile * BLOCK_W + r, m, acc, BLOCK_M, SPLIT)


@triton.jit
def _store(out_ptr, rows, m, acc, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    ptrs = out_ptr + rows[:, None] * BLOCK_M + m[None, :]
    if SPLIT == 1:
        tl.store(ptrs, acc)
    else:
        tl.atomic_add(ptrs, acc, sem="relaxed")


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_chunks, CHUNK: tl.constexpr):
    """Pure read bandwidth: each program sums CHUNK-byte blocks, strided over the grid."""
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros((CHUNK // 16, 16), dtype=tl.int32)
    for i in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
        acc += tl.reshape(tl.load(src_ptr + i.to(tl.int64) * CHUNK + offs), (CHUNK // 16, 16)).to(tl.int32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))


def prepare(w_rows: torch.Tensor, v: Variant):
    """The weight argument of variant v for the row-major weights w_rows [rows, row_bytes]."""
    if v.tma:
        return TensorDescriptor.from_tensor(w_rows.view(torch.float8_e4m3fn), [v.block_w, 64])
    return tile_steps(w_rows[None]).view(-1) if LAYOUTS[v.layout][0] else w_rows


def stream(w, b: torch.Tensor, out: torch.Tensor, rows: int, row_bytes: int, v: Variant) -> None:
    """out = the products of w's rows with b, streaming w as variant v says (w from `prepare`)."""
    tiled, step_bytes = LAYOUTS[v.layout]
    grid = (rows // v.block_w, v.split)
    if v.split > 1:
        out.zero_()
    if v.tma:
        _stream_tma_kernel[grid](w, b[:64], out, row_bytes // 64, BLOCK_W=v.block_w, BLOCK_M=BLOCK_M,
                                 SPLIT=v.split, num_warps=v.warps, num_stages=v.stages)
        return
    _stream_kernel[grid](w, b[:step_bytes], out, row_bytes, row_bytes // step_bytes, TILED=tiled,
                         STEP_BYTES=step_bytes, BLOCK_W=v.block_w, BLOCK_M=BLOCK_M, TILE=TILE_ROWS, SPLIT=v.split,
                         num_warps=v.warps, num_stages=v.stages)


def random_fp8_bytes(shape, device, generator) -> torch.Tensor:
    """Random e4m3 bit patterns below the NaN codes, as uint8."""
    return torch.randint(0, 0x78, shape, dtype=torch.uint8, device=device, generator=generator) | (
        torch.randint(0, 2, shape, dtype=torch.uint8, device=device, generator=generator) << 7)


def check(device, variants) -> None:
    """Every variant gives the float64 products on a small problem."""
    g = torch.Generator(device=device).manual_seed(0)
    rows, row_bytes = 256, 1024
    w = random_fp8_bytes((rows, row_bytes), device, g)
    b = random_fp8_bytes((128, BLOCK_M), device, g)
    for v in variants:
        step_bytes = LAYOUTS[v.layout][1]
        ref = torch.zeros(rows, BLOCK_M, dtype=torch.float64, device=device)
        b_step = b[:step_bytes].view(torch.float8_e4m3fn).double()
        for s in range(row_bytes // step_bytes):
            ref += w[:, s * step_bytes:(s + 1) * step_bytes].view(torch.float8_e4m3fn).double() @ b_step
        out = torch.empty(rows, BLOCK_M, dtype=torch.float32, device=device)
        stream(prepare(w, v), b, out, rows, row_bytes, v)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        if err > 1e-3:
            raise AssertionError(f"{v.name}: relative error {err:.2e} against the float64 products")
    print(f"checked {len(variants)} variants against float64 products")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--sets", type=int, default=4, help="weight copies rotated so that L2 holds none")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        # The interpreter has no TMA; it checks the pointer variants.
        check(torch.device("cpu"), [v for v in VARIANTS if not v.tma])
        return
    device = torch.device("cuda")
    check(device, VARIANTS)
    rows, row_bytes = args.experts * 2 * args.intermediate, args.hidden // 2
    nbytes = rows * row_bytes
    g = torch.Generator(device=device).manual_seed(1)
    b = random_fp8_bytes((128, BLOCK_M), device, g)
    out = torch.empty(rows, BLOCK_M, dtype=torch.float32, device=device)
    sets = [random_fp8_bytes((rows, row_bytes), device, g) for _ in range(args.sets)]
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8,
                                                                                     device=device)
    copy_us = time_eager([lambda: dst.copy_(src)], reps=20)
    chunk, sums = 16384, torch.empty(4 * 132, dtype=torch.int32, device=device)
    read_us = time_eager([lambda w=w: _read_kernel[(sums.numel(),)](w, sums, nbytes // chunk, CHUNK=chunk)
                          for w in sets], reps=20)
    print(f"{torch.cuda.get_device_name()}: {rows} rows x {row_bytes} bytes = {nbytes / 1e6:.1f} MB a call, "
          f"{args.sets} rotating copies; BLOCK_M {BLOCK_M}")
    print(f"{'variant':<28}{'us':>8}{'GB/s':>8}")
    print(f"{'copy (read + write)':<28}{copy_us:>8.1f}{2 * nbytes / copy_us / 1e3:>8.0f}")
    print(f"{'read only':<28}{read_us:>8.1f}{nbytes / read_us / 1e3:>8.0f}")
    for v in VARIANTS:
        data = [prepare(w, v) for w in sets]
        us = time_eager([lambda d=d: stream(d, b, out, rows, row_bytes, v) for d in data], reps=20)
        print(f"{v.name:<28}{us:>8.1f}{nbytes / us / 1e3:>8.0f}")


if __name__ == "__main__":
    main()
