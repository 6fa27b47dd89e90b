"""pre_dispatch: BF16 tokens -> the rank's MegaMoE buffer, in one Triton kernel.

Fused: per-32 FP8 quantization with UE8M0 scales (bit-exact to `formats.quantize_fp8`), the
packed scale words and the same scales as float32 for the expert kernels,
topk_idx as int32, topk_weights * routed_scaling_factor as fp32, and -1 in topk_idx for every
row from num_tokens up to the buffer's capacity, so that peers and later calls never see stale
routing. One read of x, one write of each output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffer import META_NUM_TOKENS, MegaMoEBuffer
from .common import after_predecessor, quantize_groups_ue8m0, ue8m0_to_fp32
from ..formats import SCALE_GROUP, quantize_fp8, ue8m0_to_float, unpack_ue8m0
from .launch import check_tensor, device_guard, pdl_options, use_triton

FILL_BLOCK = 1024


@triton.jit(do_not_specialize=["num_tokens"])
def _pre_dispatch_kernel(
    x_ptr, topk_idx_ptr, topk_weights_ptr,
    buf_x_ptr, buf_sf_ptr, buf_scales_ptr, buf_idx_ptr, buf_w_ptr, meta_ptr,
    num_tokens, capacity, hidden, stride_x_t,
    scaling,
    NUM_TOPK: tl.constexpr, BLOCK_K: tl.constexpr, QUANTIZE: tl.constexpr,
    SF_BYTES: tl.constexpr, SCALES_STRIDE: tl.constexpr, BLOCK_H: tl.constexpr, FILL: tl.constexpr,
    META_TOKENS: tl.constexpr, PDL: tl.constexpr,
):
    after_predecessor(PDL)
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    if pid < num_tokens:
        for h0 in range(0, hidden, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            mask = offs < hidden
            x = tl.load(x_ptr + row * stride_x_t + offs, mask=mask, other=0.0)
            if QUANTIZE:
                grouped = tl.reshape(x.to(tl.float32), (BLOCK_H // 32, 32, 1))
                q, exponent = quantize_groups_ue8m0(grouped)
                q = tl.reshape(q, (BLOCK_H,))
                tl.store(buf_x_ptr + row * hidden + offs, q.to(tl.float8e4nv), mask=mask)
                groups = h0 // 32 + tl.arange(0, BLOCK_H // 32)
                exponent = tl.reshape(exponent, (BLOCK_H // 32,))
                tl.store(buf_sf_ptr + row * SF_BYTES + groups, exponent.to(tl.uint8), mask=groups < hidden // 32)
                tl.store(buf_scales_ptr + row.to(tl.int64) * SCALES_STRIDE + groups, ue8m0_to_fp32(exponent),
                         mask=groups < hidden // 32)
            else:
                tl.store(buf_x_ptr + row * hidden + offs, x, mask=mask)
        if QUANTIZE:
            # Bytes past the last group of the row's last scale word hold 127 (a scale of 1.0).
            pad = hidden // 32 + tl.arange(0, 4)
            tl.store(buf_sf_ptr + row * SF_BYTES + pad, tl.full((4,), 127, tl.uint8), mask=pad < SF_BYTES)
        k = tl.arange(0, BLOCK_K)
        kmask = k < NUM_TOPK
        idx = tl.load(topk_idx_ptr + row * NUM_TOPK + k, mask=kmask)
        w = tl.load(topk_weights_ptr + row * NUM_TOPK + k, mask=kmask).to(tl.float32)
        tl.store(buf_idx_ptr + row * NUM_TOPK + k, idx.to(tl.int32), mask=kmask)
        tl.store(buf_w_ptr + row * NUM_TOPK + k, w * scaling, mask=kmask)
    # Every program also clears one slice of the rows past num_tokens.
    tail = num_tokens * NUM_TOPK + row * FILL + tl.arange(0, FILL)
    tl.store(buf_idx_ptr + tail, tl.full((FILL,), -1, tl.int32), mask=tail < capacity * NUM_TOPK)
    if pid == 0:
        tl.store(meta_ptr + META_TOKENS, num_tokens)


def pre_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, buf: MegaMoEBuffer,
                 routed_scaling_factor: float = 1.0, *, check_expert_ids: bool = True) -> None:
    """Write this rank's tokens and routing into `buf` for the next `mega_moe` call.

    x:            [T, H] bfloat16 (float16 / float32 accepted in fp8xfp4 mode), row-major
                  (rows may be strided). T <= buf.num_max_tokens_per_rank; T = 0 is allowed.
    topk_idx:     [T, K] int32 or int64 expert ids in [-1, num_experts); -1 = no expert.
    topk_weights: [T, K] float32 or bfloat16; stored as fp32 times routed_scaling_factor.
    check_expert_ids: verify the ids on the host first (one device sync). Skipped during
                  CUDA-graph capture; kernels then ignore out-of-range ids and count them
                  (see MegaMoEBuffer.check_errors).

    Every check runs before anything is written. Buffer rows from T to capacity get
    topk_idx = -1.
    """
    buf.check_alive()
    quantize = buf.mode == "fp8xfp4"
    x_dtypes = (torch.bfloat16, torch.float16, torch.float32) if quantize else (torch.bfloat16,)
    check_tensor("x", x, dtypes=x_dtypes, dim=2, device=buf.device)
    tokens, hidden = x.shape
    if hidden != buf.hidden:
        raise ValueError(f"x: expected hidden size {buf.hidden}, got shape {tuple(x.shape)}")
    if tokens > buf.num_max_tokens_per_rank:
        raise ValueError(f"x: {tokens} tokens exceed the buffer's capacity of {buf.num_max_tokens_per_rank} per rank")
    if x.stride(1) != 1:
        raise ValueError(f"x: expected unit stride along hidden, got strides {x.stride()}")
    k = buf.num_topk
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), shape=(tokens, k), device=buf.device,
                 contiguous=True)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32, torch.bfloat16), shape=(tokens, k),
                 device=buf.device, contiguous=True)
    if not isinstance(routed_scaling_factor, (int, float)) or isinstance(routed_scaling_factor, bool):
        raise TypeError(f"routed_scaling_factor: expected a float, got {type(routed_scaling_factor).__name__}")
    capturing = topk_idx.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_expert_ids and tokens and not capturing:
        low, high = torch.aminmax(topk_idx)
        low, high = int(low), int(high)
        if low < -1 or high >= buf.num_experts:
            raise ValueError(f"topk_idx: expert ids must lie in [-1, {buf.num_experts}), got [{low}, {high}]")

    buf.last_num_tokens = tokens
    if not use_triton(buf.device):
        _pre_dispatch_torch(x, topk_idx, topk_weights, buf, float(routed_scaling_factor))
        return
    capacity = buf.num_max_tokens_per_rank
    fill_programs = triton.cdiv((capacity - tokens) * k, FILL_BLOCK)
    grid = (max(tokens, fill_programs, 1),)
    sf_bytes = buf.x_sf.shape[1] * 4
    block_h = min(1024, triton.next_power_of_2(hidden))
    with device_guard(x):
        _pre_dispatch_kernel[grid](
            x, topk_idx, topk_weights,
            buf.x, buf.x_sf.view(torch.uint8) if quantize else buf.x_sf, buf.x_scales, buf.topk_idx,
            buf.topk_weights, buf.meta,
            tokens, capacity, hidden, x.stride(0),
            float(routed_scaling_factor),
            NUM_TOPK=k, BLOCK_K=triton.next_power_of_2(k), QUANTIZE=quantize,
            SF_BYTES=sf_bytes, SCALES_STRIDE=buf.x_scales.shape[1], BLOCK_H=block_h, FILL=FILL_BLOCK,
            META_TOKENS=META_NUM_TOKENS,
            num_warps=4, **pdl_options(x.device),
        )


def _pre_dispatch_torch(x, topk_idx, topk_weights, buf, scaling: float) -> None:
    """The same writes in plain torch, for CPU tensors when the Triton interpreter is off."""
    tokens = x.shape[0]
    if buf.mode == "fp8xfp4":
        buf.x[:tokens], buf.x_sf[:tokens] = quantize_fp8(x)
        exponents = unpack_ue8m0(buf.x_sf[:tokens], buf.hidden // SCALE_GROUP)
        buf.x_scales[:tokens, : buf.hidden // SCALE_GROUP] = ue8m0_to_float(exponents)
    else:
        buf.x[:tokens] = x
    buf.topk_idx[:tokens] = topk_idx.to(torch.int32)
    buf.topk_idx[tokens:] = -1
    buf.topk_weights[:tokens] = topk_weights.float() * torch.tensor(scaling, dtype=torch.float32)
    buf.meta[META_NUM_TOKENS] = tokens
