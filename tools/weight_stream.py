"""How fast can a Triton program stream MXFP4 weight tiles into FP8 MMAs, by weight layout? (GPU)

The decode GEMMs move weights at 1.3-1.5 TB/s on an H100 (45-50% of its copy bandwidth) however
many programs an SM holds and however few instructions the K loop has (docs/PERF.md, v7/v8).
One candidate is the access pattern: each 128-wide K step of a 64-row weight tile reads 64
bytes from each of 64 rows that lie K/2 bytes apart. This tool streams the same bytes through
the same load -> tl.dot loop with nothing else in it, in three layouts:

    rows     the layout before v9: step s of a tile reads bytes [64 s, 64 s + 64) of 64 rows
    rows128  the same rows, 128 bytes a row per step (half the steps)
    tiled    the kernels' layout since v9 (weights.py): each step's 32 rows x 64 bytes are one
             contiguous 2 KB block, so a 64-row tile reads two blocks a step

and prints GB/s next to a device copy of the same size. If `tiled` or `rows128` streams much
faster than `rows`, the weight layout is a decode lever (v9 adopted `tiled` before this was
measured: same SASS, more contiguous loads); if all three sit at the kernels' 1.3-1.5 TB/s, it
is not.

    python tools/weight_stream.py [--experts 6] [--hidden 4096] [--intermediate 2048]

The defaults are v4-flash's L1 at one token: 6 experts x 2I rows x H/2 bytes = 50 MB. Under
TRITON_INTERPRET=1 it only checks that the three layouts compute the same products.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton
import triton.language as tl

from megamoe.bench.timing import time_eager
from megamoe.weights import TILE_ROWS

BLOCK_W, BLOCK_M = 64, 16
LAYOUTS = {"rows": (False, 64), "rows128": (False, 128), "tiled": (True, 64)}


@triton.jit
def _stream_kernel(w_ptr, b_ptr, out_ptr, row_bytes, steps, TILED: tl.constexpr, STEP_BYTES: tl.constexpr,
                   BLOCK_W: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr):
    tile = tl.program_id(0)
    r = tl.arange(0, BLOCK_W)
    c = tl.arange(0, STEP_BYTES)
    m = tl.arange(0, BLOCK_M)
    b = tl.load(b_ptr + c[:, None] * BLOCK_M + m[None, :]).to(tl.float8e4nv, bitcast=True)
    acc = tl.zeros((BLOCK_W, BLOCK_M), dtype=tl.float32)
    for s in range(steps):
        if TILED:
            n = tile * BLOCK_W + r
            offs = ((n // TILE) * steps + s)[:, None] * (TILE * STEP_BYTES) + (n % TILE)[:, None] * STEP_BYTES \
                + c[None, :]
        else:
            offs = (tile * BLOCK_W + r[:, None]) * row_bytes + s * STEP_BYTES + c[None, :]
        w = tl.load(w_ptr + offs)
        acc += tl.dot(w.to(tl.float8e4nv, bitcast=True), b)
    tl.store(out_ptr + (tile * BLOCK_W + r[:, None]) * BLOCK_M + m[None, :], acc)


def tiled_copy(w_rows: torch.Tensor, step_bytes: int) -> torch.Tensor:
    """[rows, row_bytes] -> the same bytes with each step of TILE_ROWS rows contiguous."""
    rows, row_bytes = w_rows.shape
    t = w_rows.view(rows // TILE_ROWS, TILE_ROWS, row_bytes // step_bytes, step_bytes)
    return t.permute(0, 2, 1, 3).contiguous().view(-1)


def stream(w: torch.Tensor, b: torch.Tensor, out: torch.Tensor, rows: int, row_bytes: int, layout: str) -> None:
    tiled, step_bytes = LAYOUTS[layout]
    _stream_kernel[(rows // BLOCK_W,)](w, b[:step_bytes], out, row_bytes, row_bytes // step_bytes, TILED=tiled,
                                       STEP_BYTES=step_bytes, BLOCK_W=BLOCK_W, BLOCK_M=BLOCK_M, TILE=TILE_ROWS, num_warps=4,
                                       num_stages=4)


def random_fp8_bytes(shape, device, generator) -> torch.Tensor:
    """Random e4m3 bit patterns below the NaN codes, as uint8."""
    return torch.randint(0, 0x78, shape, dtype=torch.uint8, device=device, generator=generator) | (
        torch.randint(0, 2, shape, dtype=torch.uint8, device=device, generator=generator) << 7)


def check(device) -> None:
    """The three layouts give the reference products on a small problem."""
    g = torch.Generator(device=device).manual_seed(0)
    rows, row_bytes = 2 * BLOCK_W, 512
    w = random_fp8_bytes((rows, row_bytes), device, g)
    b = random_fp8_bytes((128, BLOCK_M), device, g)
    for layout, (tiled, step_bytes) in LAYOUTS.items():
        ref = torch.zeros(rows, BLOCK_M, dtype=torch.float64, device=device)
        b_step = b[:step_bytes].view(torch.float8_e4m3fn).double()
        for s in range(row_bytes // step_bytes):
            ref += w[:, s * step_bytes:(s + 1) * step_bytes].view(torch.float8_e4m3fn).double() @ b_step
        out = torch.empty(rows, BLOCK_M, dtype=torch.float32, device=device)
        stream(tiled_copy(w, step_bytes) if tiled else w, b, out, rows, row_bytes, layout)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        if err > 1e-3:
            raise AssertionError(f"{layout}: relative error {err:.2e} against the float64 products")
        print(f"check {layout}: relative error {err:.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--sets", type=int, default=4, help="weight copies rotated so that L2 holds none")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        check(torch.device("cpu"))
        return
    device = torch.device("cuda")
    check(device)
    rows, row_bytes = args.experts * 2 * args.intermediate, args.hidden // 2
    nbytes = rows * row_bytes
    g = torch.Generator(device=device).manual_seed(1)
    b = random_fp8_bytes((128, BLOCK_M), device, g)
    out = torch.empty(rows, BLOCK_M, dtype=torch.float32, device=device)
    sets = [random_fp8_bytes((rows, row_bytes), device, g) for _ in range(args.sets)]
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8,
                                                                                     device=device)
    copy_us = time_eager([lambda: dst.copy_(src)], reps=20)
    print(f"{torch.cuda.get_device_name()}: {rows} rows x {row_bytes} bytes = {nbytes / 1e6:.1f} MB a call, "
          f"{args.sets} rotating copies; BLOCK_W {BLOCK_W}, BLOCK_M {BLOCK_M}, 4 warps, 4 stages")
    print(f"{'layout':<10}{'us':>10}{'GB/s':>10}")
    print(f"{'copy':<10}{copy_us:>10.1f}{2 * nbytes / copy_us / 1e3:>10.0f}   (read + write)")
    for layout, (tiled, step_bytes) in LAYOUTS.items():
        data = [tiled_copy(w, step_bytes) if tiled else w for w in sets]
        us = time_eager([lambda d=d: stream(d, b, out, rows, row_bytes, layout) for d in data], reps=20)
        print(f"{layout:<10}{us:>10.1f}{nbytes / us / 1e3:>10.0f}")


if __name__ == "__main__":
    main()
