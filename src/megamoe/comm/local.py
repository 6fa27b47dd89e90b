"""EP = 1: the experts read the buffer's token rows directly and write the combine rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..experts import ExpertOptions, expert_steps, run_experts_torch
from ..kernels.combine import combine
from ..kernels.launch import use_triton


class LocalBackend:
    name = "local"

    def forward(self, y: torch.Tensor, l1, l2, buf, opts: ExpertOptions, recv_stats) -> None:
        if y.shape[0] == 0:
            return
        for _, step in self.steps(y, l1, l2, buf, opts, recv_stats):
            step()

    def steps(self, y: torch.Tensor, l1, l2, buf, opts: ExpertOptions, recv_stats,
              fp32_experts: bool = False) -> list[tuple[str, Callable[[], None]]]:
        """The call's work in order, as (stage name, launch) pairs: plan, L1, L2 (one plain-torch
        stage without Triton), then the combine. bench/breakdown.py and tools/ep_breakdown.py
        time growing prefixes of them. fp32_experts: the experts in plain torch even where
        Triton runs (FP32 products and sums with the kernels' rounding steps; the pressure test
        compares a GPU call that breaks the contract with it)."""
        k = buf.num_topk
        scales = buf.x_scales if buf.mode == "fp8xfp4" else None
        args = (buf, buf.topk_idx.view(-1), y.shape[0] * k, k, buf.x, scales, buf.topk_weights.view(-1), buf.combine,
                l1, l2, opts, recv_stats)
        if use_triton(buf.device) and not fp32_experts:
            rebased = (buf.x_rebased, buf.x_rebased_scales) if buf.mode == "fp8xfp4" else None
            experts = expert_steps(*args, rebased=rebased)
        else:
            experts = [("experts", lambda: run_experts_torch(*args))]
        return experts + [("combine", lambda: combine(buf.combine, buf.topk_idx, y, buf.num_experts))]
