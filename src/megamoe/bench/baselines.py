"""What a PyTorch user writes today for the same MoE layer: the baselines of `megamoe bench`.

(a) torch_bf16_moe:  sort rows by expert, torch._grouped_mm for L1, SwiGLU, torch._grouped_mm
                     for L2, weighted scatter-add. Device-only: CUDA-graph capturable.
(b) torch_fp8_moe:   the same with torch._scaled_grouped_mm, FP8 rows with one scale per row
                     and FP8 weights with one scale per output channel (the rowwise recipe
                     torch supports on Hopper).
(c) per_expert_loop: a Python loop over the experts that received rows (host sync per call).

With expert parallelism (`megamoe bench --ep N`):

(d) torch_ep_moe:    exchange counts, all_to_all_single of BF16 rows to the experts' owners,
                     (a)'s grouped pipeline on the received rows, all_to_all_single back,
                     weighted sum at home. Host sync for the split sizes: eager only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


def _grouped_ffn(rows, offs, w1, w2):
    """rows [N, H] bf16 sorted by expert, offs [E] int32 end offsets -> [N, H] bf16 (L1, SwiGLU, L2)."""
    inter = w1.shape[1] // 2
    h = torch._grouped_mm(rows, w1.transpose(-2, -1), offs=offs)
    act = F.silu(h[:, :inter]) * h[:, inter:]
    return torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)


def _looped_ffn(rows, offs, w1, w2):
    """_grouped_ffn as one pair of matmuls per expert with rows (where torch._grouped_mm does not run)."""
    inter = w1.shape[1] // 2
    out = torch.zeros_like(rows)
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            h = rows[start:end] @ w1[expert].T
            out[start:end] = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[expert].T
        start = end
    return out


def torch_bf16_moe(x, topk_idx, topk_weights, w1, w2):
    """x [T, H] bf16, topk [T, K], w1 [E, 2I, H] bf16, w2 [E, H, I] bf16 -> y [T, H] bf16."""
    order, offs, token, valid = _routing_order(topk_idx, w1.shape[0])
    out = _grouped_ffn(x[token], offs, w1, w2)
    return _weighted_sum(out, order, token, valid, topk_weights, x.shape[0])


def torch_ep_moe(x, topk_idx, topk_weights, w1, w2, group, grouped: bool = True):
    """The MoE layer over the ranks of `group` as a PyTorch user writes it with torch.distributed.

    x [T, H] bf16 this rank's tokens; topk_idx [T, K] global expert ids (-1 = none), rank r
    owning experts [r * E_l, (r + 1) * E_l); topk_weights [T, K]; w1 [E_l, 2I, H] and
    w2 [E_l, H, I] bf16: this rank's experts. grouped=False runs `_looped_ffn` instead of
    torch._grouped_mm. Every rank of the group calls it. Returns y [T, H] bf16.
    """
    ranks = dist.get_world_size(group)
    num_local, tokens, hidden = w1.shape[0], x.shape[0], x.shape[1]
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1).long()
    dest = torch.where(flat >= 0, flat // num_local, ranks)        # masked slots sort last, never sent
    order = torch.argsort(dest, stable=True)
    send_counts = torch.zeros(ranks + 1, dtype=torch.int64, device=x.device)
    send_counts.scatter_add_(0, dest, torch.ones_like(dest))
    send_counts = send_counts[:ranks].contiguous()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()   # the host sync
    sent = order[:sum(send_splits)]                                       # entries token * K + slot
    recv_rows = x.new_empty(sum(recv_splits), hidden)
    dist.all_to_all_single(recv_rows, x[sent // k], recv_splits, send_splits, group=group)
    recv_expert = torch.empty(sum(recv_splits), dtype=torch.int64, device=x.device)
    dist.all_to_all_single(recv_expert, flat[sent] - dest[sent] * num_local, recv_splits, send_splits, group=group)

    out = torch.empty_like(recv_rows)
    if recv_rows.shape[0]:
        by_expert, offs, _, _ = _routing_order(recv_expert.unsqueeze(1), num_local)
        ffn = _grouped_ffn if grouped else _looped_ffn
        out[by_expert] = ffn(recv_rows[by_expert], offs, w1, w2)
    back = x.new_empty(sent.shape[0], hidden)
    dist.all_to_all_single(back, out, send_splits, recv_splits, group=group)

    weight = topk_weights.reshape(-1)[sent].float().unsqueeze(1)
    y = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    y.index_add_(0, sent // k, back.float() * weight)
    return y.to(torch.bfloat16)


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
