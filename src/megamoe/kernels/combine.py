"""combine: each token's K slot rows, summed in FP32 and written once as BF16.

Slots whose expert id is -1 (or out of range) were never written by L2 and are skipped, so a
token with no valid slot gets exact zeros and a NaN in one token's rows stays in that token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import after_predecessor, round_to_bf16
from .launch import pdl_options, use_triton


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_kernel(rows_ptr, topk_idx_ptr, y_ptr, num_tokens, hidden, num_experts, stride_y_t,
                    NUM_TOPK: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
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


COMBINE_BLOCK_H = 1024


def combine(rows: torch.Tensor, topk_idx: torch.Tensor, y: torch.Tensor, num_experts: int) -> None:
    """y[t] = sum over valid slots k of rows[t * K + k], FP32 sum, BF16 out.

    rows: bfloat16 [>= T * K, H]; topk_idx: int32 [>= T, K]; y: bfloat16 [T, H] (unit stride along H).
    """
    tokens, hidden = y.shape
    num_topk = topk_idx.shape[1]
    if not use_triton(y.device):
        idx = topk_idx[:tokens].long()
        valid = ((idx >= 0) & (idx < num_experts)).unsqueeze(-1)
        slots = rows[: tokens * num_topk].view(tokens, num_topk, hidden).float()
        total = torch.zeros(tokens, hidden, dtype=torch.float32, device=y.device)
        for k in range(num_topk):  # slot order, like the kernel
            total += torch.where(valid[:, k], slots[:, k], 0.0)
        y.copy_(total.to(torch.bfloat16))
        return
    block_h = min(COMBINE_BLOCK_H, triton.next_power_of_2(hidden))
    _combine_kernel[(tokens, triton.cdiv(hidden, block_h))](
        rows, topk_idx, y, tokens, hidden, num_experts, y.stride(0),
        NUM_TOPK=num_topk, BLOCK_H=block_h, num_warps=4, **pdl_options(y.device),
    )
