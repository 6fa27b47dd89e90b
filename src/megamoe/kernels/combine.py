"""combine: each token's K slot rows, summed in FP32 and written once as BF16.

Slots whose expert id is -1 (or out of range) were never written by L2 and are skipped, so a
token with no valid slot gets exact zeros and a NaN in one token's rows stays in that token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import round_to_bf16


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_kernel(rows_ptr, topk_idx_ptr, y_ptr, num_tokens, hidden, num_experts, stride_y_t,
                    NUM_TOPK: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(NUM_TOPK):
        expert = tl.load(topk_idx_ptr + token * NUM_TOPK + k)
        if (expert >= 0) & (expert < num_experts):
            row = tl.load(rows_ptr + (token * NUM_TOPK + k) * hidden + cols, mask=col_mask, other=0.0)
            acc += row.to(tl.float32)
    tl.store(y_ptr + token * stride_y_t + cols, round_to_bf16(acc).to(tl.bfloat16), mask=col_mask)
