"""mega_moe: one MoE call on the tokens of the last pre_dispatch: plan -> dispatch -> L1 +
activation -> L2 -> combine, on the device with no host synchronisation (intra-node paths).

The buffer's backend (`buf.backend`) moves rows between ranks; `experts.run_experts` does the
expert work; at EP = 1 the dispatch is a no-op (L1 reads the buffer's token rows through the
expert-sorted row list, L2 writes each result into the (token, slot) row the combine reads).
"""

from __future__ import annotations

import math

import torch

from .buffer import MegaMoEBuffer
from .experts import ExpertOptions
from .kernels.launch import check_tensor, device_guard
from .reference import check_activation
from .weights import ExpertWeights


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


def _check_call(y, l1, l2, buf, activation_clamp, recv_stats, activation) -> None:
    buf.check_alive()
    check_tensor("y", y, dtypes=(torch.bfloat16,), dim=2, device=buf.device)
    if y.shape[1] != buf.hidden or y.stride(1) != 1:
        raise ValueError(f"y: expected [T, {buf.hidden}] with unit stride along hidden, got shape "
                         f"{tuple(y.shape)} strides {y.stride()}")
    if y.shape[0] > buf.num_max_tokens_per_rank:
        raise ValueError(f"y: {y.shape[0]} tokens exceed the buffer's capacity of {buf.num_max_tokens_per_rank}")
    if buf.last_num_tokens is None:
        raise RuntimeError("mega_moe: call pre_dispatch on this buffer first")
    if y.shape[0] != buf.last_num_tokens:
        raise ValueError(f"y: expected {buf.last_num_tokens} rows, the num_tokens of the last pre_dispatch, "
                         f"got shape {tuple(y.shape)}")
    _check_weights("l1", l1, buf, 2 * buf.intermediate, buf.hidden)
    _check_weights("l2", l2, buf, buf.hidden, buf.intermediate)
    check_activation(activation)
    if activation_clamp is not None:
        if isinstance(activation_clamp, bool) or not isinstance(activation_clamp, (int, float)) \
                or not math.isfinite(activation_clamp) or activation_clamp <= 0:
            raise ValueError(f"activation_clamp: expected None or a finite number > 0, got {activation_clamp!r}")
    if recv_stats is not None:
        check_tensor("recv_stats", recv_stats, dtypes=(torch.int32,), shape=(buf.num_local_experts,),
                     device=buf.device, contiguous=True)


def mega_moe(y: torch.Tensor, l1: ExpertWeights, l2: ExpertWeights, buf: MegaMoEBuffer,
             activation_clamp: float | None = None, recv_stats: torch.Tensor | None = None, *,
             activation: str = "swiglu") -> None:
    """Run the MoE layer on the tokens of the last `pre_dispatch` into `buf`; write `y`.

    y:          [T, H] bfloat16, unit stride along H; T must equal the num_tokens given to the
                last pre_dispatch on this buffer (0 is allowed). Every row is written.
    l1, l2:     from `transform_weights`, for this rank's local experts and the buffer's mode.
    activation_clamp: None, or c > 0: gate <= c and -c <= up <= c before the activation.
    recv_stats: None, or int32 [num_local_experts]; rows received per local expert are
                added to it (never overwritten).
    activation: "swiglu" (SiLU(gate) * up) or "gpt_oss" (gate * sigmoid(1.702 gate) * (up + 1)).

    With a process group every rank must call it, also with T = 0. At EP = 1 there is no host
    synchronisation on the GPU: the call can be captured in a CUDA graph (after one call with
    the same arguments, which compiles the kernels). The NCCL backend synchronises with the
    host once per call (its split sizes) and cannot be captured.
    """
    _check_call(y, l1, l2, buf, activation_clamp, recv_stats, activation)
    opts = ExpertOptions(activation, activation_clamp)
    with device_guard(y):
        buf.backend.forward(y, l1, l2, buf, opts, recv_stats)
