"""L2: grouped GEMM of the SwiGLU rows with the down-projection weights -> BF16 rows.

A tile is BLOCK_N hidden columns of BLOCK_M rows of one expert (plus the expert's bias times
the row's routing weight, when there is a bias); each row, rounded to BF16, goes to the combine
slot of the (token, slot) it came from, so no separate un-permute pass is needed: the combine
reads a dense [tokens * K, H] table. In the symm backend that table is in the source rank's
buffer, written over NVLink (REMOTE_OUT).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import after_predecessor, count_expert_tiles, find_expert_tile, round_to_bf16
from .expert_mma import expert_rows_dot


@triton.jit
def _l2_tile(
    tile,
    inter_ptr, inter_scale_ptr, stride_is_m, sorted_rows_ptr, expert_offsets_ptr, topk_weights_ptr,
    w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, bias_ptr,
    out_ptr, hidden, inter, num_local_experts, num_cols_tiles,
    peer_ptrs_ptr, out_offset, entries_per_rank,
    QUANTIZED: tl.constexpr, HAS_BIAS: tl.constexpr, GATHERED: tl.constexpr, REMOTE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, WIDE_SCALES: tl.constexpr, F16_MMA: tl.constexpr, A_PER_STEP: tl.constexpr,
    FMA_AHEAD: tl.constexpr, FMA_SPLIT: tl.constexpr, ROWS_ABOVE: tl.constexpr, ROWS_UP_TO: tl.constexpr,
):
    tile_m = tile // num_cols_tiles
    tile_n = tile % num_cols_tiles
    expert, row_start, row_end = find_expert_tile(expert_offsets_ptr, num_local_experts, tile_m, BLOCK_M,
                                                  BLOCK_E, ROWS_ABOVE, ROWS_UP_TO)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    a_rows = rows.to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    expert64 = expert.to(tl.int64)
    acc = expert_rows_dot(w_ptr + expert64 * stride_w_e, w_scale_ptr + expert64 * stride_ws_e, cols, col_mask,
                          stride_w_n, stride_ws_n, inter_ptr, a_rows, row_mask, inter, inter_scale_ptr, stride_is_m,
                          inter, QUANTIZED, BLOCK_K, UPCAST, WIDE_SCALES, F16_MMA, A_PER_STEP, FMA_AHEAD, FMA_SPLIT)
    dst = tl.load(sorted_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    if HAS_BIAS:
        # The routing weight was folded into L2's input, so the bias gets it here.
        route_w = tl.load(topk_weights_ptr + (a_rows if GATHERED else dst), mask=row_mask, other=0.0)
        bias = tl.load(bias_ptr + expert64 * hidden + cols, mask=col_mask, other=0.0)
        acc += bias[:, None] * route_w[None, :]
    if REMOTE_OUT:
        # dst = source_rank * entries_per_rank + token * K + slot: the row goes straight into
        # the combine region of the source rank's buffer (peer_ptrs: each rank's buffer base).
        source = dst // entries_per_rank
        base = tl.load(peer_ptrs_ptr + source, mask=row_mask, other=0)
        row_ptrs = (base + out_offset).to(tl.pointer_type(tl.bfloat16)) + (dst - source * entries_per_rank) * hidden
        out_ptrs = row_ptrs[None, :] + cols[:, None]
    else:
        out_ptrs = out_ptr + dst[None, :] * hidden + cols[:, None]
    tl.store(out_ptrs, round_to_bf16(acc).to(tl.bfloat16), mask=col_mask[:, None] & row_mask[None, :])


@triton.jit
def _l2_kernel(
    inter_ptr, inter_scale_ptr, stride_is_m, sorted_rows_ptr, expert_offsets_ptr, topk_weights_ptr,
    w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, bias_ptr,
    out_ptr, hidden, inter, num_local_experts, num_cols_tiles,
    peer_ptrs_ptr, out_offset, entries_per_rank,
    QUANTIZED: tl.constexpr, HAS_BIAS: tl.constexpr, GATHERED: tl.constexpr, REMOTE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, WIDE_SCALES: tl.constexpr, F16_MMA: tl.constexpr, A_PER_STEP: tl.constexpr,
    FMA_AHEAD: tl.constexpr, FMA_SPLIT: tl.constexpr, ROWS_ABOVE: tl.constexpr, ROWS_UP_TO: tl.constexpr,
    PERSISTENT: tl.constexpr, PDL: tl.constexpr,
):
    after_predecessor(PDL)
    # Tiles are counted on the device; one per program, or looped over when PERSISTENT (as in L1).
    num_tiles = count_expert_tiles(expert_offsets_ptr, num_local_experts, BLOCK_M, BLOCK_E, ROWS_ABOVE,
                                   ROWS_UP_TO) * num_cols_tiles
    if PERSISTENT:
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _l2_tile(tile, inter_ptr, inter_scale_ptr, stride_is_m, sorted_rows_ptr, expert_offsets_ptr,
                     topk_weights_ptr, w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n,
                     bias_ptr, out_ptr, hidden, inter, num_local_experts, num_cols_tiles, peer_ptrs_ptr, out_offset,
                     entries_per_rank, QUANTIZED, HAS_BIAS, GATHERED, REMOTE_OUT, BLOCK_M, BLOCK_N, BLOCK_E,
                     BLOCK_K, UPCAST, WIDE_SCALES, F16_MMA, A_PER_STEP, FMA_AHEAD, FMA_SPLIT,
                     ROWS_ABOVE, ROWS_UP_TO)
    elif tl.program_id(0) < num_tiles:
        _l2_tile(tl.program_id(0), inter_ptr, inter_scale_ptr, stride_is_m, sorted_rows_ptr, expert_offsets_ptr,
                 topk_weights_ptr, w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, bias_ptr,
                 out_ptr, hidden, inter, num_local_experts, num_cols_tiles, peer_ptrs_ptr, out_offset,
                 entries_per_rank, QUANTIZED, HAS_BIAS, GATHERED, REMOTE_OUT, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K,
                 UPCAST, WIDE_SCALES, F16_MMA, A_PER_STEP, FMA_AHEAD, FMA_SPLIT,
                 ROWS_ABOVE, ROWS_UP_TO)
