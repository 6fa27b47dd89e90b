"""MegaMoEBuffer: one allocation that holds everything a MegaMoE call reads and writes.

Send side (this rank's own tokens; what peers read or write in expert parallelism):
    x             [C, H]          float8_e4m3fn (bfloat16 in bf16xbf16 mode)   C = max tokens per rank
    x_sf          [C, ceil(H/128)] int32, packed UE8M0 exponents (fp8 modes; [C, 0] otherwise)
    topk_idx      [C, K]          int32, -1 = no expert (rows past num_tokens are all -1)
    topk_weights  [C, K]          float32, already multiplied by routed_scaling_factor
    combine       [C * K, H]      bfloat16: row t*K + k is slot k of token t after L2
    meta          [16]            int32: [0] num_tokens of the last pre_dispatch, [1] count of
                                  out-of-range expert ids seen by the plan (see `check_errors`)

Receive side (rows this rank's experts process), R = number of ranks, E_l = local experts:
    expert_count  [E_l]           int32 rows per local expert
    expert_offsets [E_l + 1]      int32 exclusive prefix sum of expert_count
    slot_rank     [R * C * K]     int32 position of each (rank, token, slot) within its expert
    sorted_rows   [N_recv]        int32 source (rank * C + token) * K + slot, in expert order
    inter         [N_recv, I]     float8_e4m3fn (bfloat16 in bf16xbf16 mode): SwiGLU output
    inter_sf      [N_recv, ceil(I/32)] uint8 exponents, or float32 scales (intermediate_sf="fp32")

N_recv = R * C * min(K, E_l): the most rows this rank can receive when a token's K slots name
distinct experts.

NCCL backend staging (only in buffers whose backend is "nccl", i.e. R > 1 for now; the EP = 1
layout has none of it). D = `DispatchRecord.nbytes`, the bytes of one dispatched row:
    send_counts   [R]             int64 rows this rank sends to each rank in this call
    count_matrix  [R, R]          int64 all-gathered send_counts: [i, j] = rows rank i sends to rank j
    send_entries  [C * K]         int64 source entry (token * K + slot) of each row in send order
                                  (rows grouped by destination rank, (token, slot) order within a
                                  rank; entries with no valid expert sort last and are never sent)
    send_rows     [C * K, max(D, 2H)] uint8: first the dispatch records [n_send, D] in send order;
                                  after the dispatch has completed, the returned BF16 rows
                                  [n_send, H] in the same order (the same bytes, reused)
    recv_rows     [N_recv, D]     uint8 dispatch records received, grouped by source rank
    recv_expert   [N_recv]        int32 global expert id of each received row
    recv_weights  [N_recv]        float32 routing weight of each received row
    recv_out      [N_recv, H]     bfloat16 expert output of each received row (L2), sent back

All regions start on a 256-byte boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import SCALE_GROUP, num_sf_words
from .reference import check_intermediate_sf, check_mode

ALIGN = 256
META_WORDS = 16
META_NUM_TOKENS = 0
META_BAD_EXPERT_IDS = 1


@dataclass(frozen=True)
class Region:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def buffer_layout(num_experts: int, max_tokens_per_rank: int, num_topk: int, hidden: int,
                  intermediate: int, num_ranks: int = 1, mode: str = "fp8xfp4",
                  intermediate_sf: str = "ue8m0") -> list[Region]:
    """The regions of a buffer for these arguments, without allocating anything."""
    check_mode(mode)
    check_intermediate_sf(intermediate_sf)
    for name, value in (("num_experts", num_experts), ("max_tokens_per_rank", max_tokens_per_rank),
                        ("num_topk", num_topk), ("hidden", hidden), ("intermediate", intermediate),
                        ("num_ranks", num_ranks)):
        _positive_int(name, value)
    if hidden % SCALE_GROUP or intermediate % SCALE_GROUP:
        raise ValueError(f"hidden and intermediate: expected multiples of {SCALE_GROUP}, "
                         f"got hidden={hidden}, intermediate={intermediate}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a multiple of the number of ranks ({num_ranks}), got {num_experts}")
    if num_topk > num_experts:
        raise ValueError(f"num_topk: expected <= num_experts ({num_experts}), got {num_topk}")
    cap, k = max_tokens_per_rank, num_topk
    local_experts = num_experts // num_ranks
    recv_rows = num_ranks * cap * min(k, local_experts)
    quantized = mode == "fp8xfp4"
    act = torch.float8_e4m3fn if quantized else torch.bfloat16
    inter_sf = (recv_rows, intermediate // SCALE_GROUP if quantized else 0)
    shapes = [
        ("meta", (META_WORDS,), torch.int32),
        ("x", (cap, hidden), act),
        ("x_sf", (cap, num_sf_words(hidden) if quantized else 0), torch.int32),
        ("topk_idx", (cap, k), torch.int32),
        ("topk_weights", (cap, k), torch.float32),
        ("combine", (cap * k, hidden), torch.bfloat16),
        ("expert_count", (local_experts,), torch.int32),
        ("expert_offsets", (local_experts + 1,), torch.int32),
        ("slot_rank", (num_ranks * cap * k,), torch.int32),
        ("sorted_rows", (recv_rows,), torch.int32),
        ("inter", (recv_rows, intermediate), act),
        ("inter_sf", inter_sf, torch.float32 if intermediate_sf == "fp32" else torch.uint8),
    ]
    regions, offset = [], 0
    for name, shape, dtype in shapes:
        region = Region(name, shape, dtype, offset)
        regions.append(region)
        offset += -(-region.nbytes // ALIGN) * ALIGN
    return regions


class MegaMoEBuffer:
    """Owns the memory, the process group and the capacities of MegaMoE calls.

    num_experts:          E, experts of the whole layer; rank r owns experts
                          [r * E / R, (r + 1) * E / R).
    max_tokens_per_rank:  C, the most tokens one call of one rank may bring.
    num_topk:             K, experts per token.
    hidden, intermediate: H and I, multiples of 32.
    group:                None for one GPU (EP = 1); a torch.distributed process group for EP.
    mode:                 "fp8xfp4" (FP8 activations x MXFP4 weights) or "bf16xbf16".
    intermediate_sf:      "ue8m0" (power-of-two scales per 32 of I) or "fp32" scales.
    device:               where to allocate; default: the current CUDA device, else the CPU.
    """

    def __init__(self, num_experts: int, max_tokens_per_rank: int, num_topk: int, hidden: int,
                 intermediate: int, group=None, mode: str = "fp8xfp4", *,
                 intermediate_sf: str = "ue8m0", device: str | torch.device | None = None):
        if group is not None:
            raise NotImplementedError("group: expert parallelism is not available yet; pass group=None")
        self.group = group
        self.rank, self.num_ranks = 0, 1
        self.regions = buffer_layout(num_experts, max_tokens_per_rank, num_topk, hidden, intermediate,
                                     self.num_ranks, mode, intermediate_sf)
        self.num_experts = num_experts
        self.num_max_tokens_per_rank = max_tokens_per_rank
        self.num_topk = num_topk
        self.hidden = hidden
        self.intermediate = intermediate
        self.mode = mode
        self.intermediate_sf = intermediate_sf
        self.num_local_experts = num_experts // self.num_ranks
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MegaMoEBuffer: cannot allocate during CUDA-graph capture; create it before capturing")
        self.nbytes = self.regions[-1].offset + self.regions[-1].nbytes
        self._storage = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._views = {}
        for region in self.regions:
            raw = self._storage[region.offset:region.offset + region.nbytes]
            self._views[region.name] = raw.view(region.dtype).view(region.shape)
        self._views["meta"].zero_()
        self._views["topk_idx"].fill_(-1)
        self.backend = self._make_backend()

    def _make_backend(self):
        # Imported here: the backends import the kernels, which import this module's constants.
        from .comm.local import LocalBackend

        return LocalBackend()

    def __getattr__(self, name):
        views = self.__dict__.get("_views")
        if views is not None and name in views:
            return views[name]
        if name in {r.name for r in self.__dict__.get("regions", ())}:
            raise RuntimeError("MegaMoEBuffer: this buffer was destroyed")
        raise AttributeError(name)

    @property
    def max_recv_rows(self) -> int:
        return self.sorted_rows.shape[0]

    @property
    def destroyed(self) -> bool:
        return self._views is None

    def check_alive(self) -> None:
        if self._views is None:
            raise RuntimeError("MegaMoEBuffer: this buffer was destroyed")

    def check_errors(self) -> None:
        """Raise if a plan since the last check met expert ids outside [-1, num_experts).

        Such ids are treated as -1 by the kernels (nothing is read or written for them). This
        reads device memory, so it synchronises; call it outside CUDA-graph capture.
        """
        self.check_alive()
        bad = int(self.meta[META_BAD_EXPERT_IDS].item())
        if bad:
            self.meta[META_BAD_EXPERT_IDS] = 0
            raise ValueError(f"topk_idx: {bad} expert id(s) outside [-1, {self.num_experts}) were ignored")

    def describe(self) -> str:
        return describe_layout(self.regions)

    def destroy(self) -> None:
        """Release the memory. Any later use of the buffer raises RuntimeError."""
        self._views = None
        self._storage = None

    def __repr__(self) -> str:
        state = "destroyed" if self._views is None else f"{self.nbytes / 2**20:.1f} MiB on {self.device}"
        return (f"MegaMoEBuffer(E={self.num_experts}, C={self.num_max_tokens_per_rank}, K={self.num_topk}, "
                f"H={self.hidden}, I={self.intermediate}, mode={self.mode}, ranks={self.num_ranks}, {state})")


def describe_layout(regions: list[Region]) -> str:
    lines = [f"{'region':<16}{'shape':<24}{'dtype':<16}{'MiB':>10}"]
    for r in regions:
        lines.append(f"{r.name:<16}{str(list(r.shape)):<24}{str(r.dtype).replace('torch.', ''):<16}"
                     f"{r.nbytes / 2**20:>10.2f}")
    total = regions[-1].offset + regions[-1].nbytes
    lines.append(f"{'total':<56}{total / 2**20:>10.2f}")
    return "\n".join(lines)
