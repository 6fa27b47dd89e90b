"""MegaMoELayer: a drop-in MoE block (router + fused experts + optional shared experts).

    layer = MegaMoELayer(router, l1_weights, l2_weights, mode="fp8xfp4")
    out = layer(hidden_states)                       # [..., H] -> [..., H], same dtype

Dimension letters: T tokens, E experts, K top-k, H hidden, I intermediate (per expert).

The router picks K experts per token and their weights; the experts run as one fused MegaMoE
call (`pre_dispatch` + `mega_moe`) against weights kept in the kernels' layout; shared experts,
when given, run as an ordinary module on the same input and are added to the output.

Routers (each mirrors the arithmetic of the Hugging Face module it replaces, so that the same
experts are chosen for the same input; see tests/test_patch_model.py):

    SoftmaxTopKRouter      softmax over E logits, top-k, optional renormalisation (Mixtral, Qwen3-MoE)
    GroupLimitedTopKRouter sigmoid (or sqrt-softplus) scores, + correction bias for the choice only,
                           top-k groups by the sum of their best two scores, top-k experts in them,
                           optional renormalisation, routed_scaling_factor (DeepSeek-V3)
    TopKSoftmaxRouter      logits with a bias, top-k logits, softmax over those k (gpt-oss)

A router is any module with `num_experts`, `num_topk` and `routed_scaling_factor` attributes whose
forward maps x [T, H] to (topk_idx [T, K] int64, topk_weights [T, K] float32); the scaling factor
is applied by `pre_dispatch` in FP32, like the reference models do.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .buffer import MegaMoEBuffer
from .formats import SCALE_GROUP, quantize_mxfp4
from .kernels.pre_dispatch import pre_dispatch
from .moe import mega_moe
from .reference import check_activation, check_mma, check_mode, default_mma
from .weights import ExpertWeights, transform_weights

DEFAULT_MAX_TOKENS_PER_CALL = 1024
"""Tokens one fused call takes; longer inputs run in chunks of this size. The shared buffer
holds about max_tokens * K * H * 2 bytes of combine rows, so this bounds its memory."""

SCORE_FUNCS = ("sigmoid", "sqrtsoftplus")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_router_dims(hidden: int, num_experts: int, num_topk: int) -> None:
    _check_positive_int("hidden", hidden)
    _check_positive_int("num_experts", num_experts)
    _check_positive_int("num_topk", num_topk)
    if num_topk > num_experts:
        raise ValueError(f"num_topk: expected <= num_experts ({num_experts}), got {num_topk}")


def _check_router_input(x: torch.Tensor, hidden: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor [T, {hidden}], got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x: expected shape [T, {hidden}], got {tuple(x.shape)}")


class SoftmaxTopKRouter(nn.Module):
    """Mixtral / Qwen3-MoE routing: softmax over all E logits, keep the top k.

    weight: [E, H] parameter. forward(x [T, H]) -> (topk_idx [T, K] int64, topk_weights [T, K]
    float32). Logits are computed in the weight's dtype (as the models do, so near-ties break the
    same way), the softmax in FP32. renormalize: divide the k kept probabilities by their sum.
    """

    def __init__(self, hidden: int, num_experts: int, num_topk: int, renormalize: bool = True, *,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        _check_router_dims(hidden, num_experts, num_topk)
        self.hidden, self.num_experts, self.num_topk = hidden, num_experts, num_topk
        self.renormalize = bool(renormalize)
        self.routed_scaling_factor = 1.0
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_router_input(x, self.hidden)
        logits = F.linear(x.to(self.weight.dtype), self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        topk_weights, topk_idx = torch.topk(probs, self.num_topk, dim=-1)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weights

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, num_experts={self.num_experts}, num_topk={self.num_topk}, " \
               f"renormalize={self.renormalize}"


class GroupLimitedTopKRouter(nn.Module):
    """DeepSeek-V3 routing (noaux_tc): biased choice, unbiased weights, group-limited.

    weight:                  [E, H] parameter; logits in FP32.
    e_score_correction_bias: [E] float32 buffer, added to the scores only to choose experts.
    scores = sigmoid(logits) (or sqrt(softplus(logits)) with score_func="sqrtsoftplus").
    Experts form `num_groups` contiguous groups of E / num_groups; a group's rank is the sum of
    its two best biased scores; experts outside the best `topk_groups` groups are excluded; the
    top k biased scores of the rest are chosen. Their weights are the unbiased scores,
    renormalised to sum 1 when `renormalize`. `routed_scaling_factor` multiplies the weights in
    the fused call (pre_dispatch), not here.

    forward(x [T, H]) -> (topk_idx [T, K] int64, topk_weights [T, K] float32).
    """

    def __init__(self, hidden: int, num_experts: int, num_topk: int, *, num_groups: int = 1, topk_groups: int = 1,
                 renormalize: bool = True, routed_scaling_factor: float = 1.0, score_func: str = "sigmoid",
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        _check_router_dims(hidden, num_experts, num_topk)
        _check_positive_int("num_groups", num_groups)
        _check_positive_int("topk_groups", topk_groups)
        if num_experts % num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_experts ({num_experts}), got {num_groups}")
        if topk_groups > num_groups:
            raise ValueError(f"topk_groups: expected <= num_groups ({num_groups}), got {topk_groups}")
        if num_topk > topk_groups * (num_experts // num_groups):
            raise ValueError(f"num_topk: {num_topk} exceeds the {topk_groups * (num_experts // num_groups)} experts "
                             f"of the {topk_groups} groups a token may use")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func: expected one of {SCORE_FUNCS}, got {score_func!r}")
        if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)) \
                or not math.isfinite(routed_scaling_factor) or routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor: expected a finite number > 0, got {routed_scaling_factor!r}")
        self.hidden, self.num_experts, self.num_topk = hidden, num_experts, num_topk
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.renormalize = bool(renormalize)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.score_func = score_func
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):
        # The correction bias is compared across experts at FP32 resolution; model.to(bfloat16)
        # must not round it (the reference models keep it in FP32 too).
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != bias.dtype:
            self.e_score_correction_bias = bias.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_router_input(x, self.hidden)
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else F.softplus(logits).sqrt()
        biased = scores + self.e_score_correction_bias.float()
        if self.topk_groups < self.num_groups:
            tokens = biased.shape[0]
            grouped = biased.view(tokens, self.num_groups, -1)
            best = min(2, grouped.shape[-1])
            group_rank = grouped.topk(best, dim=-1).values.sum(dim=-1)                    # [T, groups]
            keep = torch.zeros_like(group_rank, dtype=torch.bool)
            keep.scatter_(1, group_rank.topk(self.topk_groups, dim=-1, sorted=False).indices, True)
            excluded = ~keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, -1)
            biased = biased.masked_fill(excluded, float("-inf"))
        topk_idx = biased.topk(self.num_topk, dim=-1, sorted=False).indices
        topk_weights = scores.gather(1, topk_idx)
        if self.renormalize:
            # The 1e-20 keeps a token whose chosen scores all underflow to zero finite.
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weights

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, num_experts={self.num_experts}, num_topk={self.num_topk}, "
                f"num_groups={self.num_groups}, topk_groups={self.topk_groups}, renormalize={self.renormalize}, "
                f"routed_scaling_factor={self.routed_scaling_factor}, score_func={self.score_func}")


class TopKSoftmaxRouter(nn.Module):
    """gpt-oss routing: logits = x W^T + b, keep the top k logits, softmax over those k.

    weight: [E, H] parameter, bias: [E] parameter; logits in the weight's dtype, softmax in FP32.
    forward(x [T, H]) -> (topk_idx [T, K] int64, topk_weights [T, K] float32).
    """

    def __init__(self, hidden: int, num_experts: int, num_topk: int, *, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        _check_router_dims(hidden, num_experts, num_topk)
        self.hidden, self.num_experts, self.num_topk = hidden, num_experts, num_topk
        self.routed_scaling_factor = 1.0
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_router_input(x, self.hidden)
        logits = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        top_logits, topk_idx = torch.topk(logits, self.num_topk, dim=-1)
        return topk_idx, torch.softmax(top_logits.float(), dim=-1)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, num_experts={self.num_experts}, num_topk={self.num_topk}"


BUILTIN_ROUTERS = (SoftmaxTopKRouter, GroupLimitedTopKRouter, TopKSoftmaxRouter)


class SwiGLUMLP(nn.Module):
    """A dense SwiGLU MLP (a shared expert): down(SiLU(gate(x)) * up(x)), in the weights' dtype.

    gate_proj, up_proj: [S, H] weights; down_proj: [H, S]. Built by the checkpoint loader for
    shared experts; `patch_model` keeps the model's own shared-expert module instead.
    """

    def __init__(self, hidden: int, intermediate: int, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.gate_proj.weight.dtype)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BufferPool:
    """MegaMoEBuffers shared by layers that run one after another (the MoE layers of one model).

    A buffer holds one call's tokens, routing and intermediate rows, nothing that outlives the
    call, so layers of the same shape can share it: one buffer per (device, shape, mode, mma) instead
    of one per layer. Layers that may run concurrently (on different CUDA streams) need separate
    pools.
    """

    def __init__(self):
        self._buffers: dict[tuple, MegaMoEBuffer] = {}

    def get(self, device: torch.device, num_experts: int, max_tokens: int, num_topk: int, hidden: int,
            intermediate: int, mode: str, mma: str | None = None) -> MegaMoEBuffer:
        key = (torch.device(device), num_experts, max_tokens, num_topk, hidden, intermediate, mode, mma)
        buf = self._buffers.get(key)
        if buf is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("MegaMoELayer: its buffer is allocated by the first forward on a device; run one "
                                   "forward outside CUDA-graph capture (a warm-up) before capturing")
            buf = MegaMoEBuffer(num_experts, max_tokens, num_topk, hidden, intermediate, mode=mode, mma=mma,
                                device=device)
            self._buffers[key] = buf
        return buf

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for buf in self._buffers.values())

    def __deepcopy__(self, memo) -> "BufferPool":
        # Buffers hold nothing between calls: a copied model gets a fresh pool (allocated at its
        # first forward), shared by its layers as the original's is (deepcopy's memo sees to that).
        return BufferPool()

    def destroy(self) -> None:
        """Free every buffer; the next forward of a layer that uses this pool allocates anew."""
        for buf in self._buffers.values():
            buf.destroy()
        self._buffers.clear()


class ExpertStack:
    """Builds one projection of E experts in user layout, one dense expert at a time.

    fp8xfp4: `put` quantizes each float [N, K] to MXFP4 and `result` is (uint8 [E, N, K/2],
    uint8 [E, N, K/32]); bf16xbf16: `result` is bfloat16 [E, N, K]. Allocated on `device`.
    """

    def __init__(self, mode: str, num_experts: int, n: int, k: int, device):
        self.mode = mode
        if mode == "fp8xfp4":
            self.w_q = torch.empty(num_experts, n, k // 2, dtype=torch.uint8, device=device)
            self.w_sf = torch.empty(num_experts, n, k // SCALE_GROUP, dtype=torch.uint8, device=device)
        else:
            self.w = torch.empty(num_experts, n, k, dtype=torch.bfloat16, device=device)

    def put(self, expert: int, dense: torch.Tensor) -> None:
        """dense: float [N, K] (any float dtype, any device)."""
        if self.mode == "fp8xfp4":
            dense = dense.to(self.w_q.device)
            self.w_q[expert], self.w_sf[expert] = quantize_mxfp4(dense)
        else:
            self.w[expert] = dense.to(device=self.w.device, dtype=torch.bfloat16)

    def result(self):
        return (self.w_q, self.w_sf) if self.mode == "fp8xfp4" else self.w


def dense_experts(w: torch.Tensor, mode: str, device=None, rows: torch.Tensor | None = None):
    """float [E, N, K] (any strides) -> user-layout weights for `mode` on `device` (default: w's),
    rows reordered by `rows` when given. One expert at a time: no copy of the whole tensor, in
    FP32 or otherwise, is ever made."""
    e, n, k = w.shape
    device = device if device is not None else w.device
    stack = ExpertStack(mode, e, n, k, device)
    for expert in range(e):
        one = w[expert].detach().to(device)
        stack.put(expert, one if rows is None else one[rows.to(device)])
    return stack.result()


def prepare_expert_weights(weights, mode: str, name: str):
    """User-layout weights for `mode`, quantizing or casting dense ones.

    weights: a float tensor [E, N, K] (any float dtype), or for fp8xfp4 an MXFP4 pair
    (uint8 [E, N, K/2], uint8 [E, N, K/32]). fp8xfp4 quantizes a float tensor to MXFP4;
    bf16xbf16 casts it to bfloat16. An MXFP4 pair is used as it is (fp8xfp4) or refused
    (bf16xbf16: dequantize it first, which is exact).
    """
    check_mode(mode)
    if isinstance(weights, torch.Tensor) and weights.dtype.is_floating_point:
        if weights.dim() != 3:
            raise ValueError(f"{name}: expected a tensor [E, N, K], got shape {tuple(weights.shape)}")
        if weights.shape[2] % SCALE_GROUP:
            raise ValueError(f"{name}: K must be a multiple of {SCALE_GROUP}, got shape {tuple(weights.shape)}")
        return dense_experts(weights, mode)
    if mode == "bf16xbf16" and isinstance(weights, (tuple, list)):
        raise TypeError(f"{name}: bf16xbf16 mode takes a float tensor [E, N, K]; dequantize the MXFP4 pair first "
                        "(megamoe.dequantize_mxfp4, exact)")
    return weights


class MegaMoELayer(nn.Module):
    """A Mixture-of-Experts block for inference, fused end to end.

    router:          a module x [T, H] -> (topk_idx [T, K] int64 in [0, E), topk_weights [T, K]
                     float32) with attributes `num_experts`, `num_topk` and (optionally)
                     `routed_scaling_factor` (see the module docstring; the built-in routers
                     qualify).
    l1_weights:      expert L1 in user layout, gate rows 0..I-1 then up rows I..2I-1: a float
                     tensor [E, 2I, H] (quantized to MXFP4 in fp8xfp4 mode, cast to bfloat16 in
                     bf16xbf16 mode) or, for fp8xfp4, an MXFP4 pair (uint8 [E, 2I, H/2],
                     uint8 [E, 2I, H/32]) used as it is.
    l2_weights:      expert L2: float [E, H, I], or the MXFP4 pair (uint8 [E, H, I/2], uint8 [E, H, I/32]).
    mode:            "fp8xfp4" (FP8 activations x MXFP4 weights) or "bf16xbf16".
    mma:             fp8xfp4's tensor cores: "fp16-l1" (exact products in L1, which keeps every
                     token within the contract; the default), "fp8" (faster at 64-256 tokens,
                     but a few tokens in a thousand stray past the contract) or "fp16" (exact
                     products in both GEMMs); see MegaMoEBuffer.
    l1_bias:         None or float [E, 2I] (gate then up); l2_bias: None or float [E, H]. Kept in FP32.
    activation:      "swiglu" or "gpt_oss"; activation_clamp: None or c > 0 (gpt-oss: 7.0).
    shared_experts:  None or a module [..., H] -> [..., H], run on the layer's input and added
                     to the routed output (DeepSeek-V3's shared experts).
    max_tokens_per_call: tokens one fused call takes; more run in chunks of this size.
    buffers:         a BufferPool to share with other layers; default: the layer's own.
    return_router_weights: forward returns (out, topk_weights [T, K] float32) instead of out,
                     as gpt-oss's MLP block does.

    forward(hidden_states [..., H], any float dtype) -> [..., H] in the same dtype. The routed
    experts run in `mode`; the output is BF16-rounded before the cast back. Inference only:
    the expert path has no autograd. The experts' weights live in the kernels' layout (not as
    parameters, not in the state dict); `.to(device)` moves them and never changes their dtype.
    The MegaMoEBuffer is allocated on the input's device at the first forward: run one forward
    before capturing a CUDA graph.
    """

    def __init__(self, router: nn.Module, l1_weights, l2_weights, *, mode: str = "fp8xfp4", mma: str | None = None,
                 l1_bias: torch.Tensor | None = None, l2_bias: torch.Tensor | None = None,
                 activation: str = "swiglu", activation_clamp: float | None = None,
                 shared_experts: nn.Module | None = None,
                 max_tokens_per_call: int = DEFAULT_MAX_TOKENS_PER_CALL, buffers: BufferPool | None = None,
                 return_router_weights: bool = False):
        super().__init__()
        check_mode(mode)
        mma = default_mma(mode) if mma is None else mma
        check_mma(mma, mode)
        check_activation(activation)
        if not isinstance(router, nn.Module):
            raise TypeError(f"router: expected an nn.Module, got {type(router).__name__}")
        for attr in ("num_experts", "num_topk"):
            if not isinstance(getattr(router, attr, None), int):
                raise TypeError(f"router: expected an int attribute `{attr}`")
        if shared_experts is not None and not isinstance(shared_experts, nn.Module):
            raise TypeError(f"shared_experts: expected None or an nn.Module, got {type(shared_experts).__name__}")
        if activation_clamp is not None and (isinstance(activation_clamp, bool)
                                             or not isinstance(activation_clamp, (int, float))
                                             or not math.isfinite(activation_clamp) or activation_clamp <= 0):
            raise ValueError(f"activation_clamp: expected None or a finite number > 0, got {activation_clamp!r}")
        _check_positive_int("max_tokens_per_call", max_tokens_per_call)
        if buffers is not None and not isinstance(buffers, BufferPool):
            raise TypeError(f"buffers: expected a megamoe.layer.BufferPool, got {type(buffers).__name__}")
        l1, l2 = transform_weights(prepare_expert_weights(l1_weights, mode, "l1_weights"),
                                   prepare_expert_weights(l2_weights, mode, "l2_weights"),
                                   mode=mode, l1_bias=l1_bias, l2_bias=l2_bias)
        if l1.num_experts != router.num_experts:
            raise ValueError(f"l1_weights: {l1.num_experts} experts, but the router routes to {router.num_experts}")
        if router.num_topk > router.num_experts:
            raise ValueError(f"router: num_topk {router.num_topk} exceeds num_experts {router.num_experts}")
        self.router = router
        self.shared_experts = shared_experts
        self.mode = mode
        self.mma = mma
        self.activation = activation
        self.activation_clamp = None if activation_clamp is None else float(activation_clamp)
        self.num_experts, self.num_topk = router.num_experts, router.num_topk
        self.hidden, self.intermediate = l1.k, l1.n // 2
        self.max_tokens_per_call = max_tokens_per_call
        self.return_router_weights = bool(return_router_weights)
        self.buffers = buffers if buffers is not None else BufferPool()
        # Ids from the built-in routers are in range by construction; a custom router's are
        # checked by pre_dispatch (one host sync per call, skipped in CUDA-graph capture).
        self._check_expert_ids = not isinstance(router, BUILTIN_ROUTERS)
        self.l1, self.l2 = l1, l2

    @property
    def expert_nbytes(self) -> int:
        """Bytes of the experts' weights (kernel layout, with biases)."""
        biases = sum(w.bias.numel() * 4 for w in (self.l1, self.l2) if w.bias is not None)
        return self.l1.nbytes + self.l2.nbytes + biases

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # ExpertWeights are not parameters: move their tensors with the module, but keep their
        # dtypes (model.to(float16) must not touch MXFP4 bytes, BF16 weights or FP32 biases).
        self.l1, self.l2 = _apply_keep_dtype(self.l1, fn), _apply_keep_dtype(self.l2, fn)
        return self

    @property
    def device(self) -> torch.device:
        return self.l1.device

    def forward_experts(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts on given routing: bfloat16 [T, H].

        x: [T, H] float; topk_idx: [T, K] int32 / int64, -1 = no expert; topk_weights: [T, K]
        float32 / bfloat16 (multiplied by the router's routed_scaling_factor in the call).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x: expected a tensor [T, {self.hidden}], got {getattr(x, 'shape', type(x))}")
        if x.device != self.device:
            raise ValueError(f"x: expected device {self.device} (where the experts are), got {x.device}; "
                             "move the layer with .to(device)")
        if self.mode == "bf16xbf16" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            x = x.to(torch.bfloat16)
        if x.stride(-1) != 1:
            x = x.contiguous()
        tokens, chunk = x.shape[0], self.max_tokens_per_call
        for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (tokens, self.num_topk):
                raise ValueError(f"{name}: expected a tensor [{tokens}, {self.num_topk}], got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()
        y = torch.empty(tokens, self.hidden, dtype=torch.bfloat16, device=x.device)
        if tokens == 0:
            return y
        buf = self.buffers.get(x.device, self.num_experts, chunk, self.num_topk, self.hidden, self.intermediate,
                               self.mode, self.mma)
        scaling = float(getattr(self.router, "routed_scaling_factor", 1.0))
        with torch.no_grad():
            for start in range(0, tokens, chunk):
                end = min(start + chunk, tokens)
                pre_dispatch(x[start:end], topk_idx[start:end], topk_weights[start:end], buf,
                             routed_scaling_factor=scaling, check_expert_ids=self._check_expert_ids)
                mega_moe(y[start:end], self.l1, self.l2, buf, activation_clamp=self.activation_clamp,
                         activation=self.activation)
        return y

    def forward(self, hidden_states: torch.Tensor):
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.dtype.is_floating_point:
            raise TypeError(f"hidden_states: expected a floating-point tensor [..., {self.hidden}], got "
                            f"{getattr(hidden_states, 'dtype', type(hidden_states))}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden:
            raise ValueError(f"hidden_states: expected shape [..., {self.hidden}], got {tuple(hidden_states.shape)}")
        x = hidden_states.reshape(-1, self.hidden)
        topk_idx, topk_weights = self.router(x)
        out = self.forward_experts(x, topk_idx, topk_weights).to(hidden_states.dtype).view(hidden_states.shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return (out, topk_weights) if self.return_router_weights else out

    def extra_repr(self) -> str:
        clamp = f", activation_clamp={self.activation_clamp}" if self.activation_clamp is not None else ""
        bias = ", biases" if self.l1.bias is not None or self.l2.bias is not None else ""
        mma = f", mma={self.mma}" if self.mma != default_mma(self.mode) else ""
        return (f"num_experts={self.num_experts}, num_topk={self.num_topk}, hidden={self.hidden}, "
                f"intermediate={self.intermediate}, mode={self.mode}{mma}, activation={self.activation}{clamp}{bias}, "
                f"experts={self.expert_nbytes / 2**20:.1f} MiB on {self.device}")


def _apply_keep_dtype(weights: ExpertWeights, fn) -> ExpertWeights:
    moved = {}
    for field in dataclasses.fields(weights):
        t = getattr(weights, field.name)
        if isinstance(t, torch.Tensor):
            new = fn(t)
            moved[field.name] = new if new.dtype == t.dtype else t.to(new.device)
    return dataclasses.replace(weights, **moved)
