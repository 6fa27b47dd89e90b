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
    if routing == "uniform":
        scores = torch.rand(num_tokens, num_experts, generator=generator)
    elif routing == "skewed":
        ranks = torch.arange(1, num_experts + 1, dtype=torch.float32)
        scores = torch.rand(num_tokens, num_experts, generator=generator) / ranks ** 1.2
    else:
        scores = torch.rand(num_tokens, num_experts, generator=generator)
        scores[:, 0] = 2.0
    topk_idx = scores.topk(num_topk, dim=1).indices
    if routing == "one_expert" and num_topk > 1:
        topk_idx[:, 1:] = -1
    topk_weights = torch.rand(num_tokens, num_topk, generator=generator) + 0.05
    topk_weights = topk_weights / topk_weights.sum(dim=1, keepdim=True)
    if masked_ratio > 0:
        mask = torch.rand(num_tokens, num_topk, generator=generator) < masked_ratio
        topk_idx = topk_idx.masked_fill(mask, -1)
    return topk_idx, topk_weights


def make_problem(shape: MoEShape, num_tokens: int, mode: str = "fp8xfp4", routing: str = "uniform",
                 masked_ratio: float = 0.0, seed: int = 0, device: str | torch.device = "cpu",
                 num_experts: int | None = None) -> MoEProblem:
    """A random problem. Weights are scaled like trained ones (std ~ 1/sqrt(fan_in)).

    `num_experts` overrides the shape's expert count (benchmarks at a fraction of a model).
    """
    g = torch.Generator().manual_seed(seed)
    e = num_experts or shape.num_experts
    h, i = shape.hidden, shape.intermediate
    x = torch.randn(num_tokens, h, generator=g).bfloat16()
    w1 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).bfloat16()
    topk_idx, topk_weights = make_routing(num_tokens, e, shape.num_topk, routing, masked_ratio, g)
    problem = MoEProblem(x, topk_idx, topk_weights, w1, w2, mode)
    if mode == "fp8xfp4":
        problem.l1, problem.l2 = quantize_mxfp4(w1), quantize_mxfp4(w2)
    else:
        problem.l1, problem.l2 = w1, w2
    return problem.to(device)


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
