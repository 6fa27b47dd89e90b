"""EP = 1: the experts read the buffer's token rows directly and write the combine rows."""

from __future__ import annotations

import torch

from ..experts import ExpertOptions, run_experts, run_experts_torch
from ..kernels.combine import combine
from ..kernels.launch import use_triton


class LocalBackend:
    name = "local"

    def forward(self, y: torch.Tensor, l1, l2, buf, opts: ExpertOptions, recv_stats) -> None:
        tokens = y.shape[0]
        if tokens == 0:
            return
        k = buf.num_topk
        run = run_experts if use_triton(buf.device) else run_experts_torch
        scales = buf.x_scales if buf.mode == "fp8xfp4" else None
        run(buf, buf.topk_idx.view(-1), tokens * k, k, buf.x, scales, buf.topk_weights.view(-1), buf.combine,
            l1, l2, opts, recv_stats)
        combine(buf.combine, buf.topk_idx, y, buf.num_experts)
