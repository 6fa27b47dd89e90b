"""Random MoE problems shared by the tests, the benchmarks and the demo.

Inputs are random and never zero; routing can be uniform, skewed (a Zipf-like preference for
low expert ids) or concentrated on one expert, with a fraction of slots masked to -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .formats import quantize_mxfp4

ROUTINGS = ("uniform", "skewed", "one_expert")


@dataclass(frozen=True)
class MoEShape:
    """One model's MoE layer. T tokens, E experts, K top-k, H hidden, I intermediate."""

    name: str
    num_experts: int
    num_topk: int
    hidden: int
    intermediate: int


MODEL_SHAPES = {
    s.name: s
    for s in (
        MoEShape("v4-flash", 256, 6, 4096, 2048),
        MoEShape("gpt-oss-120b", 128, 4, 2880, 2880),
        MoEShape("qwen3-30b-a3b", 128, 8, 2048, 768),
        MoEShape("tiny", 8, 2, 256, 128),
    )
}


@dataclass
class MoEProblem:
    """Inputs of one MoE call plus the weights in every form a test may want."""

    x: torch.Tensor               # [T, H] bfloat16
    topk_idx: torch.Tensor        # [T, K] int64, -1 = masked
    topk_weights: torch.Tensor    # [T, K] float32
    w1: torch.Tensor              # [E, 2I, H] bfloat16, gate rows then up rows
    w2: torch.Tensor              # [E, H, I] bfloat16
    mode: str = "fp8xfp4"
    l1: object = field(default=None)   # user-layout weights for `mode`
    l2: object = field(default=None)

    def to(self, device) -> "MoEProblem":
        return MoEProblem(*(_to(getattr(self, f), device) for f in ("x", "topk_idx", "topk_weights", "w1", "w2")),
                          self.mode, _to(self.l1, device), _to(self.l2, device))


def make_routing(num_tokens: int, num_experts: int, num_topk: int, routing: str = "uniform",
                 masked_ratio: float = 0.0, generator: torch.Generator | None = None):
    """topk_idx [T, K] int64 (distinct experts per token, -1 where masked), topk_weights [T, K] fp32."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    if num_topk > num_experts:
        raise ValueError(f"num_topk: expected <= num_experts ({num_experts}), got {num_topk}")
    device = generator.device if generator is not None else torch.device("cpu")

    def rand(*size):
        return torch.rand(*size, generator=generator, device=device)

    scores = rand(num_tokens, num_experts)
    if routing == "skewed":
        scores = scores / torch.arange(1, num_experts + 1, dtype=torch.float32, device=device) ** 1.2
    elif routing == "one_expert":
        scores[:, 0] = 2.0
    topk_idx = scores.topk(num_topk, dim=1).indices
    if routing == "one_expert" and num_topk > 1:
        topk_idx[:, 1:] = -1
    topk_weights = rand(num_tokens, num_topk) + 0.05
    topk_weights = topk_weights / topk_weights.sum(dim=1, keepdim=True)
    if masked_ratio > 0:
        mask = rand(num_tokens, num_topk) < masked_ratio
        topk_idx = topk_idx.masked_fill(mask, -1)
    return topk_idx, topk_weights


def _quantize_per_expert(w: torch.Tensor):
    """MXFP4 one expert at a time, so a whole model's weights never need FP32 temporaries."""
    e, n, k = w.shape
    w_q = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
    w_sf = torch.empty(e, n, k // 32, dtype=torch.uint8, device=w.device)
    for expert in range(e):
        w_q[expert], w_sf[expert] = quantize_mxfp4(w[expert])
    return w_q, w_sf


def make_problem(shape: MoEShape, num_tokens: int, mode: str = "fp8xfp4", routing: str = "uniform",
                 masked_ratio: float = 0.0, seed: int = 0, device: str | torch.device = "cpu",
                 num_experts: int | None = None) -> MoEProblem:
    """A random problem, generated on `device`. Weights are scaled like trained ones
    (std ~ 1/sqrt(fan_in)). `num_experts` overrides the shape's expert count.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    e = num_experts or shape.num_experts
    h, i = shape.hidden, shape.intermediate

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).bfloat16()

    x = randn(num_tokens, h)
    w1 = torch.empty(e, 2 * i, h, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(e, h, i, dtype=torch.bfloat16, device=device)
    for expert in range(e):  # one expert at a time: no FP32 copy of a whole model
        w1[expert] = randn(2 * i, h, scale=h ** -0.5)
        w2[expert] = randn(h, i, scale=i ** -0.5)
    topk_idx, topk_weights = make_routing(num_tokens, e, shape.num_topk, routing, masked_ratio, g)
    problem = MoEProblem(x, topk_idx, topk_weights, w1, w2, mode)
    if mode == "fp8xfp4":
        problem.l1, problem.l2 = _quantize_per_expert(w1), _quantize_per_expert(w2)
    else:
        problem.l1, problem.l2 = w1, w2
    return problem


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64; NaN anywhere gives inf."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom > 0 else (out - ref).norm().item()
