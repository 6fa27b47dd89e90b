"""What a PyTorch user writes today for the same MoE layer: the baselines of `megamoe bench`.

(a) torch_bf16_moe:  sort rows by expert, torch._grouped_mm for L1, SwiGLU, torch._grouped_mm
                     for L2, weighted scatter-add. Device-only: CUDA-graph capturable.
(b) torch_fp8_moe:   the same with torch._scaled_grouped_mm, FP8 rows with one scale per row
                     and FP8 weights with one scale per output channel (the rowwise recipe
                     torch supports on Hopper).
(c) per_expert_loop: a Python loop over the experts that received rows (host sync per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0


def _routing_order(topk_idx: torch.Tensor, num_experts: int):
    """Rows sorted by expert (masked slots last), per-expert end offsets, token of each row."""
    tokens, k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    key = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:num_experts], 0).to(torch.int32)
    token = order // k
    valid = key[order] < num_experts
    return order, offs, token, valid


def _weighted_sum(out_rows, order, token, valid, topk_weights, tokens):
    weight = topk_weights.reshape(-1)[order].float() * valid
    rows = out_rows.float() * weight.unsqueeze(1)
    # Masked rows land in a spare row that is dropped, so garbage past the last offset of
    # the grouped GEMM cannot leak into a token.
    dest = torch.where(valid, token, tokens)
    y = torch.zeros(tokens + 1, out_rows.shape[1], dtype=torch.float32, device=out_rows.device)
    y.index_add_(0, dest, torch.nan_to_num(rows) * valid.unsqueeze(1))
    return y[:tokens].to(torch.bfloat16)


def torch_bf16_moe(x, topk_idx, topk_weights, w1, w2):
    """x [T, H] bf16, topk [T, K], w1 [E, 2I, H] bf16, w2 [E, H, I] bf16 -> y [T, H] bf16."""
    num_experts, two_inter, _ = w1.shape
    order, offs, token, valid = _routing_order(topk_idx, num_experts)
    rows = x[token]
    h = torch._grouped_mm(rows, w1.transpose(-2, -1), offs=offs)
    act = F.silu(h[:, : two_inter // 2]) * h[:, two_inter // 2:]
    out = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)
    return _weighted_sum(out, order, token, valid, topk_weights, x.shape[0])


def _rowwise_fp8(t: torch.Tensor):
    scale = t.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1)


def prepare_fp8_weights(w1, w2):
    """Per-output-channel FP8 copies of the expert weights for torch_fp8_moe (done once)."""
    (q1, s1), (q2, s2) = _rowwise_fp8(w1), _rowwise_fp8(w2)
    return q1, s1, q2, s2


def torch_fp8_moe(x, topk_idx, topk_weights, fp8_weights):
    q1, s1, q2, s2 = fp8_weights
    num_experts, two_inter, _ = q1.shape
    order, offs, token, valid = _routing_order(topk_idx, num_experts)
    xq, xs = _rowwise_fp8(x[token])
    h = torch._scaled_grouped_mm(xq, q1.transpose(-2, -1), xs, s1, offs=offs, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
    act = F.silu(h[:, : two_inter // 2].float()) * h[:, two_inter // 2:].float()
    aq, as_ = _rowwise_fp8(act)
    out = torch._scaled_grouped_mm(aq, q2.transpose(-2, -1), as_, s2, offs=offs, out_dtype=torch.bfloat16,
                                   use_fast_accum=True)
    return _weighted_sum(out, order, token, valid, topk_weights, x.shape[0])


def per_expert_loop(x, topk_idx, topk_weights, w1, w2):
    """The textbook loop: one pair of matmuls per expert that received rows (bf16)."""
    tokens = x.shape[0]
    inter = w1.shape[1] // 2
    y = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_idx[topk_idx >= 0]).tolist():
        token, slot = (topk_idx == expert).nonzero(as_tuple=True)
        h = x[token] @ w1[expert].T
        out = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[expert].T
        y.index_add_(0, token, out.float() * topk_weights[token, slot].float().unsqueeze(1))
    return y.to(torch.bfloat16)
