"""The float64 oracle of the whole MegaMoE layer. Plain torch, no Triton.

    y[t] = sum_k w[t,k] * W2[e(t,k)] @ SwiGLU(W1[e(t,k)] @ x[t])

computed in float64 on dequantized operands, with every rounding step the kernels take, in their
order (DESIGN.md section 1, step 4):

    fp8xfp4:   x -> FP8 + UE8M0/32 (quantize_fp8)
               h = x @ W1[e].T              float64, then rounded to BF16
               gate, up = h[:, :I], h[:, I:]; clamp: gate <= c, -c <= up <= c
               a = SiLU(gate) * up * w      rounded to FP32 (the kernels' epilogue runs in FP32)
               a -> FP8, one scale per 32 of I (UE8M0, or FP32 with intermediate_sf="fp32")
               o = a @ W2[e].T              float64, then rounded to BF16 (one row per slot)
               y[t] = sum over slots of o   float64, then rounded to BF16
    bf16xbf16: the same with x, W1, W2 in BF16 and `a` rounded to BF16 instead of FP8.

Slots whose expert id is -1 contribute nothing; a token with no valid slot gets exact zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formats

MODES = ("fp8xfp4", "bf16xbf16")
INTERMEDIATE_SF = ("ue8m0", "fp32")
MMAS = ("fp8", "fp16-l1", "fp16")
"""MegaMoEBuffer(mma=...): FP8 MMAs in both GEMMs, exact products (FP16 MMAs) in L1 only, or in both."""
DEFAULT_MMA = "fp16-l1"
"""fp8xfp4's default: on Hopper, FP8 MMAs in L1 put a few tokens in a thousand past the
contract's 1e-2 (docs/RELIABILITY.md, finding 6); exact products in L1 keep every token within
it. "fp8" stays a choice for speed at 64-256 tokens (docs/PERF.md, v22)."""


def default_mma(mode: str) -> str:
    """The `mma` of a buffer of `mode` given none: DEFAULT_MMA in fp8xfp4 mode, "fp8" in
    bf16xbf16 mode (which multiplies in bfloat16: there is nothing to choose)."""
    return DEFAULT_MMA if mode == "fp8xfp4" else "fp8"


def exact_products(mma: str, gemm: str) -> bool:
    """Whether GEMM "l1" or "l2" of a buffer with `mma` multiplies on FP16 MMAs (exact products)."""
    return mma == "fp16" or (mma == "fp16-l1" and gemm == "l1")
ACTIVATIONS = ("swiglu", "gpt_oss")
GPT_OSS_ALPHA = 1.702
"""gpt-oss's gate slope: act = gate * sigmoid(1.702 * gate) * (up + 1)."""


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def apply_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "swiglu",
                     clamp: float | None = None) -> torch.Tensor:
    """The gated activation of the layer, in the dtype of its inputs.

    clamp c: gate <= c and -c <= up <= c first (DeepSeek's and gpt-oss's "limit").
    "swiglu":  SiLU(gate) * up
    "gpt_oss": gate * sigmoid(1.702 * gate) * (up + 1)
    """
    if clamp is not None:
        gate = gate.clamp(max=clamp)
        up = up.clamp(-clamp, clamp)
    if activation == "swiglu":
        return F.silu(gate) * up
    return gate * torch.sigmoid(GPT_OSS_ALPHA * gate) * (up + 1)


def check_bias(name: str, bias, num_experts: int, n: int, device) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor [E, {n}], got {getattr(bias, 'dtype', type(bias))}")
    if tuple(bias.shape) != (num_experts, n):
        raise ValueError(f"{name}: expected shape {(num_experts, n)}, got {tuple(bias.shape)}")
    if bias.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {bias.device}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def check_intermediate_sf(intermediate_sf: str) -> None:
    if intermediate_sf not in INTERMEDIATE_SF:
        raise ValueError(f"intermediate_sf: expected one of {INTERMEDIATE_SF}, got {intermediate_sf!r}")


def check_mma(mma: str, mode: str) -> None:
    if mma not in MMAS:
        raise ValueError(f"mma: expected one of {MMAS}, got {mma!r}")
    if mma != "fp8" and mode != "fp8xfp4":
        raise ValueError(f"mma: {mma!r} chooses the tensor cores of mode 'fp8xfp4'; mode {mode!r} multiplies "
                         "in bfloat16 (leave mma unset)")


def check_expert_weights(weights, mode: str, name: str) -> tuple[int, int, int]:
    """Validate user-layout expert weights; return their [E, N, K].

    fp8xfp4: `weights` is the MXFP4 pair (w_q uint8 [E, N, K/2], w_sf uint8 [E, N, K/32]).
    bf16xbf16: `weights` is a bfloat16 tensor [E, N, K].
    """
    check_mode(mode)
    if mode == "fp8xfp4":
        if not (isinstance(weights, (tuple, list)) and len(weights) == 2):
            raise TypeError(f"{name}: in fp8xfp4 mode expected a pair (w_q, w_sf) of uint8 tensors")
        formats.check_mxfp4(name, *weights)
        if weights[0].dim() != 3:
            raise ValueError(f"{name}: expected w_q of shape [E, N, K/2], got {tuple(weights[0].shape)}")
        e, n, half_k = weights[0].shape
        return e, n, 2 * half_k
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.bfloat16 or weights.dim() != 3:
        raise TypeError(f"{name}: in bf16xbf16 mode expected a bfloat16 tensor [E, N, K], got "
                        f"{getattr(weights, 'dtype', type(weights))} {tuple(getattr(weights, 'shape', ()))}")
    if weights.shape[2] % formats.SCALE_GROUP:
        raise ValueError(f"{name}: K must be a multiple of {formats.SCALE_GROUP}, got shape {tuple(weights.shape)}")
    return tuple(weights.shape)


def expert_matrix(weights, mode: str, expert: int) -> torch.Tensor:
    """float64 [N, K]: one expert's matrix from user-layout weights (validated by the caller)."""
    if mode == "fp8xfp4":
        return formats.dequantize_mxfp4(weights[0][expert], weights[1][expert]).double()
    return weights[expert].double()


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def requantize_intermediate(a: torch.Tensor, intermediate_sf: str = "ue8m0") -> torch.Tensor:
    """FP8 round trip of the SwiGLU output with one scale per 32 columns. a: float32 [n, I].

    "ue8m0": exactly `quantize_fp8` then `dequantize_fp8`.
    "fp32":  scale = max(amax, 1e-4) / 448 in FP32 (not a power of two); q = e4m3(a / scale).
    """
    check_intermediate_sf(intermediate_sf)
    if intermediate_sf == "ue8m0":
        return formats.dequantize_fp8(*formats.quantize_fp8(a))
    rows, cols = a.shape
    groups = a.reshape(rows, cols // formats.SCALE_GROUP, formats.SCALE_GROUP)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(formats.AMAX_FLOOR) / formats.FP8_MAX
    q = (groups / scale).to(torch.float8_e4m3fn)
    return (q.float() * scale).reshape(rows, cols)


def _check_routing(x, topk_idx, topk_weights, num_experts):
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx: expected shape [{x.shape[0]}, K], got {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx: expected int32 or int64, got {topk_idx.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise ValueError(f"topk_weights: expected shape {tuple(topk_idx.shape)}, got {tuple(topk_weights.shape)}")
    if topk_weights.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"topk_weights: expected float32 or bfloat16, got {topk_weights.dtype}")
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"topk_idx: expert ids must lie in [-1, {num_experts}), got "
                         f"[{int(topk_idx.min())}, {int(topk_idx.max())}]")


def mega_moe_reference(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    l1_weights,
    l2_weights,
    mode: str = "fp8xfp4",
    activation_clamp: float | None = None,
    routed_scaling_factor: float = 1.0,
    intermediate_sf: str = "ue8m0",
    return_recv_counts: bool = False,
    activation: str = "swiglu",
    l1_bias: torch.Tensor | None = None,
    l2_bias: torch.Tensor | None = None,
):
    """The MoE layer in float64 with the kernels' rounding steps.

    x:            [T, H] bfloat16 (float32 / float16 accepted), T may be 0.
    topk_idx:     [T, K] int32 / int64 expert ids, -1 = no expert.
    topk_weights: [T, K] float32 / bfloat16; multiplied by `routed_scaling_factor` in FP32.
    l1_weights:   fp8xfp4: (uint8 [E, 2I, H/2], uint8 [E, 2I, H/32]), gate rows first, then up.
                  bf16xbf16: bfloat16 [E, 2I, H].
    l2_weights:   fp8xfp4: (uint8 [E, H, I/2], uint8 [E, H, I/32]); bf16xbf16: bfloat16 [E, H, I].
    activation_clamp: None, or c > 0: gate is clamped to <= c and up to [-c, c] before SwiGLU.
    intermediate_sf: "ue8m0" or "fp32" scales for the FP8 requant of the SwiGLU output.
    activation:   "swiglu" or "gpt_oss" (see `apply_activation`).
    l1_bias:      None or float [E, 2I] (gate then up), added to L1's FP32 output before the
                  BF16 rounding.
    l2_bias:      None or float [E, H], added to each slot's L2 output times that slot's routing
                  weight (the weight is folded into the SwiGLU output, so the bias needs it too).

    Returns y: float64 [T, H] holding BF16-representable values; with `return_recv_counts`,
    also int32 [E]: how many (token, slot) rows each expert receives.
    """
    check_mode(mode)
    check_intermediate_sf(intermediate_sf)
    check_activation(activation)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a tensor of shape [T, H], got {getattr(x, 'shape', type(x))}")
    num_experts, two_inter, hidden = check_expert_weights(l1_weights, mode, "l1_weights")
    l2_shape = check_expert_weights(l2_weights, mode, "l2_weights")
    inter = two_inter // 2
    if hidden != x.shape[1] or two_inter % 2:
        raise ValueError(f"l1_weights: expected [E, 2I, {x.shape[1]}], got {[num_experts, two_inter, hidden]}")
    if tuple(l2_shape) != (num_experts, hidden, inter):
        raise ValueError(f"l2_weights: expected {[num_experts, hidden, inter]}, got {list(l2_shape)}")
    if activation_clamp is not None and not activation_clamp > 0:
        raise ValueError(f"activation_clamp: expected None or a positive number, got {activation_clamp}")
    check_bias("l1_bias", l1_bias, num_experts, two_inter, x.device)
    check_bias("l2_bias", l2_bias, num_experts, hidden, x.device)
    _check_routing(x, topk_idx, topk_weights, num_experts)

    tokens, num_topk = topk_idx.shape
    if mode == "fp8xfp4":
        x64 = formats.dequantize_fp8(*formats.quantize_fp8(x)).double()
    else:
        x64 = x.to(torch.bfloat16).double()
    weights = topk_weights.float() * torch.tensor(routed_scaling_factor, dtype=torch.float32)

    y = torch.zeros(tokens, hidden, dtype=torch.float64, device=x.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    idx = topk_idx.long()
    for expert in torch.unique(idx[idx >= 0]).tolist():
        token, slot = (idx == expert).nonzero(as_tuple=True)
        counts[expert] = token.numel()
        h = x64[token] @ expert_matrix(l1_weights, mode, expert).T
        if l1_bias is not None:
            h = h + l1_bias[expert].float().double()
        h = _round_bf16(h)
        route = weights[token, slot].unsqueeze(1)
        act = apply_activation(h[:, :inter], h[:, inter:], activation, activation_clamp)
        a = (act * route.double()).float()
        if mode == "fp8xfp4":
            a = requantize_intermediate(a, intermediate_sf)
        else:
            a = _round_bf16(a)
        out = a.double() @ expert_matrix(l2_weights, mode, expert).T
        if l2_bias is not None:
            out = out + (route * l2_bias[expert].float()).double()
        out = _round_bf16(out)
        y.index_add_(0, token, out)
    y = _round_bf16(y)
    return (y, counts) if return_recv_counts else y
