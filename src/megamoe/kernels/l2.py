"""L2: grouped GEMM of the SwiGLU rows with the down-projection weights -> BF16 rows.

One program computes BLOCK_N hidden columns of BLOCK_M rows of one expert (plus the expert's
bias times the row's routing weight, when there is a bias) and writes each row, rounded to BF16, to the combine slot of the (token, slot) it came from, so no separate
un-permute pass is needed: the combine reads a dense [tokens * K, H] table.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import find_expert_tile, round_to_bf16
from .expert_mma import bf16_rows_dot, mxfp4_rows_dot


@triton.jit
def _l2_kernel(
    inter_ptr, inter_scale_ptr, stride_is_g, sorted_rows_ptr, expert_offsets_ptr, topk_weights_ptr,
    w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_g, bias_ptr,
    out_ptr, hidden, inter, num_local_experts, num_cols_tiles,
    QUANTIZED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, WIDE_SCALES: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_m = pid // num_cols_tiles
    tile_n = pid % num_cols_tiles
    expert, row_start, row_end = find_expert_tile(expert_offsets_ptr, num_local_experts, tile_m, BLOCK_M, BLOCK_E)
    if expert < num_local_experts:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        a_rows = rows.to(tl.int64)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < hidden
        expert64 = expert.to(tl.int64)
        if QUANTIZED:
            acc = mxfp4_rows_dot(w_ptr + expert64 * stride_w_e, w_scale_ptr + expert64 * stride_ws_e,
                                 tl.where(col_mask, cols, 0), stride_w_n, stride_ws_g, inter_ptr,
                                 tl.where(row_mask, a_rows, 0), inter, inter_scale_ptr, stride_is_g, inter,
                                 PTX_DECODE=not UPCAST, ISSUE_AHEAD=BLOCK_M <= 32,
                                 WIDE_SCALES=WIDE_SCALES)
        else:
            acc = bf16_rows_dot(w_ptr + expert64 * stride_w_e, cols, col_mask, stride_w_n, inter_ptr, a_rows,
                                row_mask, inter, inter, BLOCK_K=BLOCK_K, UPCAST=UPCAST)
        dst = tl.load(sorted_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        if HAS_BIAS:
            # The routing weight was folded into L2's input, so the bias gets it here.
            route_w = tl.load(topk_weights_ptr + dst, mask=row_mask, other=0.0)
            bias = tl.load(bias_ptr + expert64 * hidden + cols, mask=col_mask, other=0.0)
            acc += bias[:, None] * route_w[None, :]
        out_ptrs = out_ptr + dst[None, :] * hidden + cols[:, None]
        tl.store(out_ptrs, round_to_bf16(acc).to(tl.bfloat16), mask=col_mask[:, None] & row_mask[None, :])
