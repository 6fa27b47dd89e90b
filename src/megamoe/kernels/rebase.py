"""Rebase: FP8 rows with one power-of-two scale per 32 columns re-expressed with one scale per
128 columns (a GEMM step), for the wide (prefill) tiles of L1 and L2.

With a scale per 32 of K on both sides, every group's partial product needs its own promotion
into the accumulator: a multiply of the two scales and a multiply-add per accumulator element
and group. With the activation rows on one scale per step, a step's four partial products are
summed with only their weight scales and promoted once (`expert_mma.mxfp4_rows_dot`,
A_PER_STEP). Measured before building it (H200, 2026-11-28, docs/PERF.md): the kernels with
that promotion, timed on rows not yet rebased, took v4-flash at 4096 tokens from 10.09 to
7.81 ms.

Every group g of a step holds q * 2^s_g; with m the largest s_g of the step (groups past K
left out), the group becomes round_e4m3(q * 2^(s_g - m)) * 2^m. Powers of two only scale the
exponent, so a value stays exact while it is at least 2^-6 (the smallest normal e4m3) and
otherwise rounds to a multiple of 2^-9: an error of at most 2^-10 * 2^m, against the step's
largest magnitude, which the quantizer put in [2^7, 448] * 2^m. The rebase is idempotent (a
rebased step has one scale), so a call that runs twice on the same buffer gives the same rows.

Only for power-of-two scales: the FP32 scales of intermediate_sf="fp32" would round every value.
"""

import triton
import triton.language as tl

from .common import after_predecessor, round_to_e4m3
from .launch import pdl_options

BLOCK_ROWS = 32


@triton.jit
def _rebase_kernel(src_ptr, src_scale_ptr, dst_ptr, dst_scale_ptr, count_ptr, num_rows,
                   stride_src, stride_ss, stride_dst, stride_ds, k_size,
                   COUNTED: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    """Program (i, s): rows i * BLOCK_R ..., step s (columns 128 s .. 128 s + 127).

    Scale tables are [rows, G4] (4 groups a step, padded past K); the destination's 4 entries
    of the step all get the step's scale, so the tables keep their layout. src and dst may be
    the same rows (each program reads its block before writing it). COUNTED: only rows below
    count_ptr[0] (a device-side row count, at most num_rows).
    """
    after_predecessor(PDL)
    step = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if COUNTED:
        num_rows = tl.minimum(num_rows, tl.load(count_ptr))
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    g = 4 * step + tl.arange(0, 4)
    s = tl.load(src_scale_ptr + rows[:, None] * stride_ss + g[None, :], mask=row_ok[:, None], other=1.0)
    top = tl.max(tl.where((g * 32 < k_size)[None, :], s, 0.0), axis=1)
    cols = 128 * step + tl.arange(0, 128)
    mask = row_ok[:, None] & (cols < k_size)[None, :]
    q = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # The factor of each column: its group's scale over the step's, a power of two <= 1.
    factor = tl.reshape(tl.broadcast_to((s / top[:, None])[:, :, None], (BLOCK_R, 4, 32)), (BLOCK_R, 128))
    out = round_to_e4m3(q * factor).to(tl.float8e4nv)
    tl.store(dst_ptr + rows[:, None] * stride_dst + cols[None, :], out, mask=mask)
    tl.store(dst_scale_ptr + rows[:, None] * stride_ds + g[None, :],
             tl.broadcast_to(top[:, None], (BLOCK_R, 4)), mask=row_ok[:, None])


def rebase_rows(src, src_scales, dst, dst_scales, num_rows: int, k_size: int, count=None) -> None:
    """Rebase rows [0, num_rows) of (src, src_scales) into (dst, dst_scales) (may be the same
    tensors); with `count` (int32 device tensor) only rows below count[0]. No host sync."""
    if num_rows == 0:
        return
    grid = (triton.cdiv(num_rows, BLOCK_ROWS), triton.cdiv(k_size, 128))
    _rebase_kernel[grid](
        src, src_scales, dst, dst_scales, count if count is not None else src_scales, num_rows,
        src.stride(0), src_scales.stride(0), dst.stride(0), dst_scales.stride(0), k_size,
        COUNTED=count is not None, BLOCK_R=BLOCK_ROWS, num_warps=4, **pdl_options(src.device))
