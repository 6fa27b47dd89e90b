"""L1: grouped GEMM of the received rows with the gate/up weights, with the SwiGLU fused in.

A tile is BLOCK_N intermediate columns of BLOCK_M rows of one expert. Its weight
tile stacks BLOCK_N gate rows over the BLOCK_N matching up rows, so gate and up of a column
come out of one accumulator [2 * BLOCK_N, BLOCK_M]. The epilogue, all in registers:

    gate, up = BF16-round(acc + bias)      (the precision contract rounds L1's output to BF16)
    gate <= c, -c <= up <= c                (optional activation clamp)
    a = SiLU(gate) * up * routing weight    FP32 (gpt-oss: gate * sigmoid(1.702 gate) * (up + 1))
    a -> FP8 with one scale per 32 columns  (UE8M0 or FP32 scales), or BF16 in bf16xbf16 mode

and writes `inter` rows in expert-sorted order for L2. Nothing of width 2I touches memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (after_predecessor, count_expert_tiles, find_expert_tile, quantize_groups_fp32, quantize_groups_ue8m0, round_to_bf16,
                     ue8m0_to_fp32)
from .expert_mma import expert_rows_dot


@triton.jit
def _l1_tile(
    tile,
    a_ptr, a_scale_ptr, stride_a_m, stride_as_m,      # activations [*, H], scales [*, G4(H)]
    topk_weights_ptr, sorted_rows_ptr, expert_offsets_ptr,
    w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, bias_ptr,
    inter_ptr, inter_scale_ptr, stride_is_m,
    hidden, inter, num_local_experts, num_topk, num_cols_tiles,
    clamp,
    QUANTIZED: tl.constexpr, HAS_CLAMP: tl.constexpr, INTER_SF_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr, GPT_OSS: tl.constexpr, GATHERED: tl.constexpr,
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
    if GATHERED:
        # The symm backend gathered the received rows (and their routing weights) into
        # expert-sorted order: sorted position i reads row i.
        src = rows.to(tl.int64)
        a_rows = src
    else:
        # Entry i reads activation row i // num_topk: at EP = 1 the buffer's token rows (K
        # entries per token), after the NCCL dispatch the received rows (one entry each).
        src = tl.load(sorted_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        a_rows = src // num_topk

    j = tl.arange(0, 2 * BLOCK_N)
    col = tile_n * BLOCK_N + (j % BLOCK_N)
    w_rows = col + (j // BLOCK_N) * inter           # gate rows, then the matching up rows
    w_mask = col < inter
    expert64 = expert.to(tl.int64)
    acc = expert_rows_dot(w_ptr + expert64 * stride_w_e, w_scale_ptr + expert64 * stride_ws_e, w_rows, w_mask,
                          stride_w_n, stride_ws_n, a_ptr, a_rows, row_mask, stride_a_m, a_scale_ptr, stride_as_m,
                          hidden, QUANTIZED, BLOCK_K, UPCAST, WIDE_SCALES, F16_MMA, A_PER_STEP, FMA_AHEAD, FMA_SPLIT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert64 * 2 * inter + w_rows, mask=w_mask, other=0.0)[:, None]
    gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N, BLOCK_M)), (1, 2, 0)))
    gate = round_to_bf16(gate)
    up = round_to_bf16(up)
    if HAS_CLAMP:
        gate = tl.minimum(gate, clamp)
        up = tl.minimum(tl.maximum(up, -clamp), clamp)
    route_w = tl.load(topk_weights_ptr + src, mask=row_mask, other=0.0)
    if GPT_OSS:
        act = gate / (1.0 + tl.exp(-1.702 * gate)) * (up + 1.0)
    else:
        act = gate / (1.0 + tl.exp(-gate)) * up
    act = act * route_w[None, :]

    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = (cols < inter)[:, None] & row_mask[None, :]
    out_ptrs = inter_ptr + rows.to(tl.int64)[None, :] * inter + cols[:, None]
    if QUANTIZED:
        groups = tile_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
        sf_mask = (groups < inter // 32)[:, None] & row_mask[None, :]
        sf_ptrs = inter_scale_ptr + rows.to(tl.int64)[None, :] * stride_is_m + groups[:, None]
        grouped = tl.reshape(act, (BLOCK_N // 32, 32, BLOCK_M))
        if INTER_SF_FP32:
            q, scale = quantize_groups_fp32(grouped)
        else:
            q, exponent = quantize_groups_ue8m0(grouped)
            scale = ue8m0_to_fp32(exponent)
        tl.store(sf_ptrs, scale, mask=sf_mask)
        tl.store(out_ptrs, tl.reshape(q, (BLOCK_N, BLOCK_M)).to(tl.float8e4nv), mask=out_mask)
    else:
        tl.store(out_ptrs, round_to_bf16(act).to(tl.bfloat16), mask=out_mask)


@triton.jit
def _l1_swiglu_kernel(
    a_ptr, a_scale_ptr, stride_a_m, stride_as_m,      # activations [*, H], scales [*, G4(H)]
    topk_weights_ptr, sorted_rows_ptr, expert_offsets_ptr,
    w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, bias_ptr,
    inter_ptr, inter_scale_ptr, stride_is_m,
    hidden, inter, num_local_experts, num_topk, num_cols_tiles,
    clamp,
    QUANTIZED: tl.constexpr, HAS_CLAMP: tl.constexpr, INTER_SF_FP32: tl.constexpr,
    HAS_BIAS: tl.constexpr, GPT_OSS: tl.constexpr, GATHERED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, WIDE_SCALES: tl.constexpr, F16_MMA: tl.constexpr, A_PER_STEP: tl.constexpr,
    FMA_AHEAD: tl.constexpr, FMA_SPLIT: tl.constexpr, ROWS_ABOVE: tl.constexpr, ROWS_UP_TO: tl.constexpr,
    PERSISTENT: tl.constexpr, PDL: tl.constexpr,
):
    after_predecessor(PDL)
    # Tiles are counted on the device. The host sizes the grid to the most tiles the entries can
    # need, so program i takes tile i; or, PERSISTENT, it caps the grid (the symm backend: no
    # tight host bound on the received rows exists) and each program takes every
    # num_programs-th tile. Two paths because the loop costs the one-tile path ~80 registers.
    num_tiles = count_expert_tiles(expert_offsets_ptr, num_local_experts, BLOCK_M, BLOCK_E, ROWS_ABOVE,
                                   ROWS_UP_TO) * num_cols_tiles
    if PERSISTENT:
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _l1_tile(tile, a_ptr, a_scale_ptr, stride_a_m, stride_as_m, topk_weights_ptr, sorted_rows_ptr,
                     expert_offsets_ptr, w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n,
                     bias_ptr, inter_ptr, inter_scale_ptr, stride_is_m, hidden, inter, num_local_experts, num_topk,
                     num_cols_tiles, clamp, QUANTIZED, HAS_CLAMP, INTER_SF_FP32, HAS_BIAS, GPT_OSS, GATHERED,
                     BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K, UPCAST, WIDE_SCALES, F16_MMA, A_PER_STEP, FMA_AHEAD, FMA_SPLIT,
                     ROWS_ABOVE, ROWS_UP_TO)
    elif tl.program_id(0) < num_tiles:
        _l1_tile(tl.program_id(0), a_ptr, a_scale_ptr, stride_a_m, stride_as_m, topk_weights_ptr, sorted_rows_ptr,
                 expert_offsets_ptr, w_ptr, w_scale_ptr, stride_w_e, stride_w_n, stride_ws_e, stride_ws_n, bias_ptr,
                 inter_ptr, inter_scale_ptr, stride_is_m, hidden, inter, num_local_experts, num_topk,
                 num_cols_tiles, clamp, QUANTIZED, HAS_CLAMP, INTER_SF_FP32, HAS_BIAS, GPT_OSS, GATHERED, BLOCK_M,
                 BLOCK_N, BLOCK_E, BLOCK_K, UPCAST, WIDE_SCALES, F16_MMA, A_PER_STEP, FMA_AHEAD, FMA_SPLIT,
                 ROWS_ABOVE, ROWS_UP_TO)
