"""mega_moe: plan -> (dispatch) -> L1 + SwiGLU -> L2 -> combine, on the device, no host sync.

At EP = 1 the dispatch is a no-op: L1 reads the buffer's token rows directly through the
expert-sorted row list, and L2 writes each result row into the (token, slot) place the
combine reads. The CPU path (CPU tensors without the Triton interpreter) runs the same steps
in plain torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from . import env
from .buffer import MegaMoEBuffer
from .formats import dequantize_fp8
from .kernels.combine import _combine_kernel
from .kernels.config import pick_config
from .kernels.l1_swiglu import _l1_swiglu_kernel
from .kernels.l2 import _l2_kernel
from .kernels.launch import check_tensor, device_guard, use_triton
from .kernels.plan import plan
from .reference import requantize_intermediate
from .weights import ExpertWeights

COMBINE_BLOCK_H = 1024


def _check_weights(name: str, w, buf: MegaMoEBuffer, n: int, k: int) -> None:
    if not isinstance(w, ExpertWeights):
        raise TypeError(f"{name}: expected ExpertWeights from megamoe.transform_weights, got {type(w).__name__}")
    if w.mode != buf.mode:
        raise ValueError(f"{name}: weights were transformed for mode {w.mode!r}, the buffer is {buf.mode!r}")
    if (w.num_experts, w.n, w.k) != (buf.num_local_experts, n, k):
        raise ValueError(f"{name}: expected [E_local, N, K] = {[buf.num_local_experts, n, k]}, "
                         f"got {[w.num_experts, w.n, w.k]}")
    if w.device != buf.device:
        raise ValueError(f"{name}: expected device {buf.device}, got {w.device}")


def _check_call(y, l1, l2, buf, activation_clamp, recv_stats) -> None:
    buf.check_alive()
    check_tensor("y", y, dtypes=(torch.bfloat16,), dim=2, device=buf.device)
    if y.shape[1] != buf.hidden or y.stride(1) != 1:
        raise ValueError(f"y: expected [T, {buf.hidden}] with unit stride along hidden, got shape "
                         f"{tuple(y.shape)} strides {y.stride()}")
    if y.shape[0] > buf.num_max_tokens_per_rank:
        raise ValueError(f"y: {y.shape[0]} tokens exceed the buffer's capacity of {buf.num_max_tokens_per_rank}")
    _check_weights("l1", l1, buf, 2 * buf.intermediate, buf.hidden)
    _check_weights("l2", l2, buf, buf.hidden, buf.intermediate)
    if activation_clamp is not None:
        if isinstance(activation_clamp, bool) or not isinstance(activation_clamp, (int, float)) \
                or not math.isfinite(activation_clamp) or activation_clamp <= 0:
            raise ValueError(f"activation_clamp: expected None or a finite number > 0, got {activation_clamp!r}")
    if recv_stats is not None:
        check_tensor("recv_stats", recv_stats, dtypes=(torch.int32,), shape=(buf.num_local_experts,),
                     device=buf.device, contiguous=True)


def mega_moe(y: torch.Tensor, l1: ExpertWeights, l2: ExpertWeights, buf: MegaMoEBuffer,
             activation_clamp: float | None = None, recv_stats: torch.Tensor | None = None) -> None:
    """Run the MoE layer on the tokens of the last `pre_dispatch` into `buf`; write `y`.

    y:          [T, H] bfloat16, unit stride along H; T must equal the num_tokens given to the
                last pre_dispatch on this buffer (0 is allowed). Every row is written.
    l1, l2:     from `transform_weights`, for this rank's local experts and the buffer's mode.
    activation_clamp: None, or c > 0: gate <= c and -c <= up <= c before SwiGLU.
    recv_stats: None, or int32 [num_local_experts]; rows received per local expert are
                added to it (never overwritten).

    No host synchronisation on the GPU: the call can be captured in a CUDA graph.
    """
    _check_call(y, l1, l2, buf, activation_clamp, recv_stats)
    tokens = y.shape[0]
    if tokens == 0:
        return
    if not use_triton(buf.device):
        _mega_moe_torch(y, l1, l2, buf, activation_clamp, recv_stats)
        return
    with device_guard(y):
        _mega_moe_triton(y, l1, l2, buf, activation_clamp, recv_stats)


def _num_tiles_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """Most row tiles `num_rows` rows can need when each expert's rows are tiled separately."""
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


def _mega_moe_triton(y, l1, l2, buf, activation_clamp, recv_stats) -> None:
    tokens, k = y.shape[0], buf.num_topk
    hidden, inter, experts = buf.hidden, buf.intermediate, buf.num_local_experts
    quantized = buf.mode == "fp8xfp4"
    num_rows = tokens * k
    plan(buf.topk_idx, num_rows, buf, recv_stats)

    block_e = triton.next_power_of_2(experts)
    x_sf = buf.x_sf.view(torch.uint8) if quantized else buf.x
    inter_sf = buf.inter_sf if quantized else buf.inter
    upcast = env.triton_interpret()
    dummy_sf = l1.w  # bf16xbf16 has no weight scales; the kernels never read this pointer then

    cfg = pick_config("l1", num_rows, experts)
    col_tiles = triton.cdiv(inter, cfg.block_n)
    grid = (_num_tiles_bound(num_rows, experts, cfg.block_m) * col_tiles,)
    w_sf = l1.w_sf if quantized else dummy_sf
    _l1_swiglu_kernel[grid](
        buf.x, x_sf, hidden, x_sf.stride(0),
        buf.topk_weights, buf.sorted_rows, buf.expert_offsets,
        l1.w, w_sf, l1.w.stride(0), l1.w.stride(1), w_sf.stride(0), w_sf.stride(1),
        buf.inter, inter_sf,
        hidden, inter, experts, k, col_tiles,
        float(activation_clamp) if activation_clamp is not None else 0.0,
        QUANTIZED=quantized, HAS_CLAMP=activation_clamp is not None,
        INTER_SF_FP32=buf.intermediate_sf == "fp32", A_BY_TOKEN=True,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_E=block_e, BLOCK_K=cfg.block_k, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    cfg = pick_config("l2", num_rows, experts)
    col_tiles = triton.cdiv(hidden, cfg.block_n)
    grid = (_num_tiles_bound(num_rows, experts, cfg.block_m) * col_tiles,)
    w_sf = l2.w_sf if quantized else dummy_sf
    _l2_kernel[grid](
        buf.inter, inter_sf, buf.sorted_rows, buf.expert_offsets,
        l2.w, w_sf, l2.w.stride(0), l2.w.stride(1), w_sf.stride(0), w_sf.stride(1),
        buf.combine, hidden, inter, experts, col_tiles,
        QUANTIZED=quantized, INTER_SF_FP32=buf.intermediate_sf == "fp32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_E=block_e, BLOCK_K=cfg.block_k, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    block_h = min(COMBINE_BLOCK_H, triton.next_power_of_2(hidden))
    _combine_kernel[(tokens, triton.cdiv(hidden, block_h))](
        buf.combine, buf.topk_idx, y, tokens, hidden, buf.num_experts, y.stride(0),
        NUM_TOPK=k, BLOCK_H=block_h, num_warps=4,
    )


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _mega_moe_torch(y, l1, l2, buf, activation_clamp, recv_stats) -> None:
    """The CPU path: the kernels' steps and roundings in plain torch (FP32 arithmetic)."""
    tokens, k = y.shape[0], buf.num_topk
    inter = buf.intermediate
    idx = buf.topk_idx[:tokens].long()
    weights = buf.topk_weights[:tokens]
    if buf.mode == "fp8xfp4":
        x = dequantize_fp8(buf.x[:tokens], buf.x_sf[:tokens])
    else:
        x = buf.x[:tokens].float()
    first = buf.rank * buf.num_local_experts
    rows = torch.zeros(tokens, k, buf.hidden, dtype=torch.float32, device=y.device)
    counts = torch.zeros(buf.num_local_experts, dtype=torch.int32, device=y.device)
    for expert in range(buf.num_local_experts):
        token, slot = (idx == first + expert).nonzero(as_tuple=True)
        counts[expert] = token.numel()
        if token.numel() == 0:
            continue
        h = _round_bf16(x[token] @ l1.dequantize(expert).T)
        gate, up = h[:, :inter], h[:, inter:]
        if activation_clamp is not None:
            gate = gate.clamp(max=activation_clamp)
            up = up.clamp(-activation_clamp, activation_clamp)
        act = F.silu(gate) * up * weights[token, slot].unsqueeze(1)
        if buf.mode == "fp8xfp4":
            act = requantize_intermediate(act, buf.intermediate_sf)
        else:
            act = _round_bf16(act)
        rows[token, slot] = _round_bf16(act @ l2.dequantize(expert).T)
    y.copy_(rows.sum(dim=1).to(torch.bfloat16))
    if recv_stats is not None:
        recv_stats += counts
