"""MegaMoEBuffer: one allocation that holds everything a MegaMoE call reads and writes.

Send side (this rank's own tokens; what peers read or write in expert parallelism):
    x             [C, H]          float8_e4m3fn (bfloat16 in bf16xbf16 mode)   C = max tokens per rank
    x_sf          [C, ceil(H/128)] int32, packed UE8M0 exponents (fp8 modes; [C, 0] otherwise)
    x_scales      [C, G4(H)]      float32 2^(e-127) of each x_sf exponent. G4(n) = ceil(n/128) * 4
                                  columns: the GEMMs step 128 columns of K (4 groups) at a time and
                                  load a row's 4 scales of a step as one 16-byte vector; columns
                                  past n/32 hold 1.0 (fp8 modes; [C, 0] otherwise)
    topk_idx      [C, K]          int32, -1 = no expert (rows past num_tokens are all -1)
    topk_weights  [C, K]          float32, already multiplied by routed_scaling_factor
    combine       [C * K, H]      bfloat16: row t*K + k is slot k of token t after L2
    meta          [16]            int32: [0] num_tokens of the last pre_dispatch, [1] count of
                                  out-of-range expert ids seen by the plan, [2] rows dropped past
                                  the receive capacity (see `check_errors`), [3] 1 after a
                                  timed-out barrier (symm backend)

Receive side (rows this rank's experts process), R = number of ranks, E_l = local experts:
    expert_count  [E_l]           int32 rows per local expert
    expert_offsets [E_l + 1]      int32 exclusive prefix sum of expert_count
    slot_rank     [R * C * K]     int32 position of each (rank, token, slot) within its expert
    sorted_rows   [N_recv]        int32 source (rank * C + token) * K + slot, in expert order
    inter         [N_recv, I]     float8_e4m3fn (bfloat16 in bf16xbf16 mode): SwiGLU output
    inter_scales  [N_recv, G4(I)] float32 scale of each group of 32 of an `inter` row, padded
                                  like x_scales: 2^(e-127) for UE8M0 requant, or the
                                  FP32 scale (intermediate_sf="fp32")

N_recv = R * C * min(K, E_l): the most rows this rank can receive when a token's K slots name
distinct experts.

EP = 1 (backend "local"), fp8xfp4 mode only:
    x_rebased     [C, H]          float8_e4m3fn: x with one scale per 128 columns, which L1's
                                  prefill tiles read (kernels/rebase.py); x stays as written
    x_rebased_scales [C, G4(H)]   float32 its scales, laid out like x_scales (a step's 4 equal)

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
    recv_scales   [N_recv, G4(H)] float32 scales of the received rows, laid out like x_scales
                                  (from the records' UE8M0 bytes; fp8 modes; [N_recv, 0] otherwise)
    recv_out      [N_recv, H]     bfloat16 expert output of each received row (L2), sent back

Symm backend (buffers whose backend is "symm"; the whole buffer is one symmetric allocation,
so every region sits at the same offset on every rank, see comm/symm.py):
    signals       [2R + 1]        int64 barrier slots [phase * R + source rank] (the epoch each
                                  rank last signalled), then this rank's call counter (epoch)
    recv_topk     [R * C * K]     int32 copy of every rank's topk_idx, read by the plan
    recv_x        [N_recv, H]     float8_e4m3fn (bfloat16 in bf16xbf16 mode) received rows,
                                  pulled from their source ranks, in expert-sorted order
    recv_scales   [N_recv, G4(H)] float32 their scales, laid out like x_scales
    recv_weights  [N_recv]        float32 their routing weights

All regions start on a 256-byte boundary.
"""

from __future__ import annotations

import socket
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .formats import SCALE_GROUP, num_sf_words
from .reference import INTERMEDIATE_SF, MMAS, MODES, check_intermediate_sf, check_mma, check_mode, default_mma

ALIGN = 256
RECORD_ALIGN = 16
META_WORDS = 16
META_NUM_TOKENS = 0
META_BAD_EXPERT_IDS = 1
META_DROPPED_ROWS = 2
META_FAILED = 3

BACKENDS = ("auto", "symm", "nccl")


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


GEMM_STEP = 128
"""Columns of K the grouped GEMMs consume per step (kernels/expert_mma.py)."""


def step_groups(k: int) -> int:
    """Groups of a scale table's row for K = k: the groups of 32 of whole 128-wide steps."""
    return -(-k // GEMM_STEP) * (GEMM_STEP // SCALE_GROUP)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def resolve_backend(backend: str, num_ranks: int, one_cuda_node: bool = False) -> str:
    """The backend that runs a buffer of `num_ranks` ranks: "local", "nccl" or "symm".

    "auto" is "local" at one rank. Across ranks it picks "symm" when every rank is a CUDA
    device of one node (one_cuda_node) and "nccl" otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if num_ranks == 1:
            return "local"
        return "symm" if one_cuda_node else "nccl"
    return backend


@dataclass(frozen=True)
class DispatchRecord:
    """Byte layout of one row that the NCCL backend sends to the owner of its expert.

    [0, sf_offset)               the token's activation row: H float8_e4m3fn bytes (2H bytes of
                                 bfloat16 in bf16xbf16 mode), as in buffer.x
    [sf_offset, expert_offset)   its packed UE8M0 scale bytes as in buffer.x_sf, byte g = group g,
                                 pad bytes 127 (4 * ceil(H/128) bytes; none in bf16xbf16 mode)
    [expert_offset, +4)          int32 global expert id
    [weight_offset, +4)          float32 routing weight (routed_scaling_factor applied)
    up to nbytes                 padding, so that every record starts on a 16-byte boundary
    """

    sf_offset: int
    expert_offset: int
    weight_offset: int
    nbytes: int


def dispatch_record(hidden: int, mode: str) -> DispatchRecord:
    quantized = mode == "fp8xfp4"
    sf_offset = hidden if quantized else 2 * hidden
    expert_offset = sf_offset + (4 * num_sf_words(hidden) if quantized else 0)
    weight_offset = expert_offset + 4
    nbytes = -(-(weight_offset + 4) // RECORD_ALIGN) * RECORD_ALIGN
    return DispatchRecord(sf_offset, expert_offset, weight_offset, nbytes)


def buffer_layout(num_experts: int, max_tokens_per_rank: int, num_topk: int, hidden: int,
                  intermediate: int, num_ranks: int = 1, mode: str = "fp8xfp4",
                  intermediate_sf: str = "ue8m0", backend: str = "auto",
                  one_cuda_node: bool = False) -> list[Region]:
    """The regions of a buffer for these arguments, without allocating anything.

    backend: as for MegaMoEBuffer (one_cuda_node: every rank is a CUDA device of one node, which
    makes "auto" pick "symm"); the NCCL and symm regions exist only in buffers of those
    backends, so the EP = 1 layout has none of them.
    """
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
    resolved = resolve_backend(backend, num_ranks, one_cuda_node)
    cap, k = max_tokens_per_rank, num_topk
    local_experts = num_experts // num_ranks
    recv_rows = num_ranks * cap * min(k, local_experts)
    quantized = mode == "fp8xfp4"
    act = torch.float8_e4m3fn if quantized else torch.bfloat16
    groups_h = step_groups(hidden) if quantized else 0
    groups_i = step_groups(intermediate) if quantized else 0
    shapes = [
        ("meta", (META_WORDS,), torch.int32),
        ("x", (cap, hidden), act),
        ("x_sf", (cap, num_sf_words(hidden) if quantized else 0), torch.int32),
        ("x_scales", (cap, groups_h), torch.float32),
        ("topk_idx", (cap, k), torch.int32),
        ("topk_weights", (cap, k), torch.float32),
        ("combine", (cap * k, hidden), torch.bfloat16),
        ("expert_count", (local_experts,), torch.int32),
        ("expert_offsets", (local_experts + 1,), torch.int32),
        ("slot_rank", (num_ranks * cap * k,), torch.int32),
        ("sorted_rows", (recv_rows,), torch.int32),
        ("inter", (recv_rows, intermediate), act),
        ("inter_scales", (recv_rows, groups_i), torch.float32),
    ]
    if resolved == "local" and quantized:
        shapes += [
            ("x_rebased", (cap, hidden), act),
            ("x_rebased_scales", (cap, groups_h), torch.float32),
        ]
    if resolved == "nccl":
        record = dispatch_record(hidden, mode).nbytes
        shapes += [
            ("send_counts", (num_ranks,), torch.int64),
            ("count_matrix", (num_ranks, num_ranks), torch.int64),
            ("send_entries", (cap * k,), torch.int64),
            # Dispatch records first, then (reused once the dispatch is done) the returned rows.
            ("send_rows", (cap * k, max(record, 2 * hidden)), torch.uint8),
            ("recv_rows", (recv_rows, record), torch.uint8),
            ("recv_expert", (recv_rows,), torch.int32),
            ("recv_weights", (recv_rows,), torch.float32),
            ("recv_scales", (recv_rows, groups_h), torch.float32),
            ("recv_out", (recv_rows, hidden), torch.bfloat16),
        ]
    elif resolved == "symm":
        from .comm.symm import signal_words

        shapes += [
            ("signals", (signal_words(num_ranks),), torch.int64),
            ("recv_topk", (num_ranks * cap * k,), torch.int32),
            ("recv_x", (recv_rows, hidden), act),
            ("recv_scales", (recv_rows, groups_h), torch.float32),
            ("recv_weights", (recv_rows,), torch.float32),
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
    group:                None for one GPU (EP = 1); a torch.distributed process group of R
                          ranks for EP = R (the rank within the group picks the local experts).
    mode:                 "fp8xfp4" (FP8 activations x MXFP4 weights) or "bf16xbf16".
    backend:              "auto", "nccl" or "symm" (see `resolve_backend`); with group=None
                          only "auto" (no communication).
    intermediate_sf:      "ue8m0" (power-of-two scales per 32 of I) or "fp32" scales.
    mma:                  the tensor cores of the fp8xfp4 GEMMs; None: "fp16-l1" (DEFAULT_MMA
                          of megamoe.reference). "fp16-l1": L1 on the FP8 operands converted
                          exactly to FP16 (exact products, FP32 sums), L2 on FP8 MMAs: layer
                          errors of 2.4e-4 to 9e-4 on the benchmark shapes and every token
                          within 6.5e-3. "fp8": FP8 MMAs in both, whose sums inside one MMA are
                          truncated on Hopper: layer errors of 2-4e-3, but a few tokens in a
                          thousand stray past 1e-2, so a batch whose norm sits in such a token
                          breaks the contract (docs/RELIABILITY.md, finding 6). At EP = 1 on an
                          H200 (2026-12-03, docs/PERF.md v22) "fp8" takes 5-16% off the call at
                          64-256 tokens and 1-3% at 512 and 4096-8192; it is slower at 1024-2048
                          and runs the same FMA tiles up to half a row an expert (1-16 tokens
                          of the benchmark shapes). "fp16": both GEMMs exact.
    device:               where to allocate; default: the current CUDA device, else the CPU.
                          With a group, the collectives run on tensors of this device.

    With a group, construction is collective: every rank of the group must construct its buffer
    with the same arguments. They are all-gathered and compared, so a rank that disagrees (or
    passes an invalid value) makes every rank raise ValueError naming the argument and the ranks;
    a rank that never arrives makes the others raise TimeoutError after MEGAMOE_TIMEOUT_S.
    Allocation and this rendezvous happen here, never inside CUDA-graph capture.
    """

    def __init__(self, num_experts: int, max_tokens_per_rank: int, num_topk: int, hidden: int,
                 intermediate: int, group=None, mode: str = "fp8xfp4", *, backend: str = "auto",
                 intermediate_sf: str = "ue8m0", mma: str | None = None,
                 device: str | torch.device | None = None):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MegaMoEBuffer: cannot allocate or rendezvous during CUDA-graph capture; "
                               "create it before capturing")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        mma = default_mma(mode) if mma is None else mma
        if group is None:
            if backend != "auto":
                resolve_backend(backend, 1)  # an unknown name gets its own error
                raise ValueError(f"backend: {backend!r} needs a process group; group=None runs one rank "
                                 "without communication (backend='auto')")
            self.rank, self.num_ranks = 0, 1
            one_cuda_node = shared_device = False
        else:
            if not isinstance(group, dist.ProcessGroup):
                raise TypeError(f"group: expected None or a torch.distributed.ProcessGroup, got {type(group).__name__}")
            self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
            if self.rank < 0:
                raise ValueError("group: this process is not a member of the group")
            one_cuda_node, shared_device = _check_ranks_agree(group, self.rank, self.num_ranks, self.device, {
                "num_experts": num_experts, "max_tokens_per_rank": max_tokens_per_rank, "num_topk": num_topk,
                "hidden": hidden, "intermediate": intermediate, "mode": mode,
                "intermediate_sf": intermediate_sf, "mma": mma, "backend": backend})
        self.group = group
        check_mma(mma, mode)
        self.regions = buffer_layout(num_experts, max_tokens_per_rank, num_topk, hidden, intermediate,
                                     self.num_ranks, mode, intermediate_sf, backend, one_cuda_node)
        resolved = resolve_backend(backend, self.num_ranks, one_cuda_node)
        self.num_experts = num_experts
        self.num_max_tokens_per_rank = max_tokens_per_rank
        self.num_topk = num_topk
        self.hidden = hidden
        self.intermediate = intermediate
        self.mode = mode
        self.intermediate_sf = intermediate_sf
        self.mma = mma
        self.num_local_experts = num_experts // self.num_ranks
        self.nbytes = self.regions[-1].offset + self.regions[-1].nbytes
        symmetric = None
        if resolved == "symm":
            from .comm.symm import SymmetricStorage

            symmetric = SymmetricStorage(self.nbytes, group, self.rank, self.num_ranks, self.device, shared_device)
            self._storage = symmetric.storage
        else:
            self._storage = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._views = {}
        for region in self.regions:
            raw = self._storage[region.offset:region.offset + region.nbytes]
            self._views[region.name] = raw.view(region.dtype).view(region.shape)
        self._views["meta"].zero_()
        if "signals" in self._views:
            self._views["signals"].zero_()
        self._views["topk_idx"].fill_(-1)
        for name in ("x_scales", "inter_scales", "recv_scales"):
            if name in self._views:  # padding groups must read as a finite 1.0
                self._views[name].fill_(1.0)
        self.backend = self._make_backend(resolved, symmetric)

    def _make_backend(self, name: str, symmetric):
        # Imported here: the backends import the kernels, which import this module's constants.
        if name == "symm":
            from .comm.symm import SymmBackend

            return SymmBackend(self, symmetric)
        if name == "nccl":
            from .comm.nccl import NcclBackend

            return NcclBackend(self)
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
        """Raise RuntimeError if destroyed, TimeoutError if a symm barrier timed out (no sync)."""
        if self._views is None:
            raise RuntimeError("MegaMoEBuffer: this buffer was destroyed")
        raise_pending = getattr(self.backend, "raise_pending", None)
        if raise_pending is not None:
            raise_pending()

    def check_errors(self) -> None:
        """Raise for what the device recorded since the last check.

        TimeoutError: a barrier of the symm backend timed out (see comm/symm.py).
        ValueError: expert ids outside [-1, num_experts) were met (the kernels treat them as -1:
        nothing is read or written for them), or rows were dropped because a rank received more
        than its capacity (only when a token's K slots repeat a local expert).
        This reads device memory, so it synchronises; call it outside CUDA-graph capture.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.check_alive()
        bad, dropped = (int(v) for v in self.meta[META_BAD_EXPERT_IDS:META_DROPPED_ROWS + 1].tolist())
        if bad or dropped:
            self.meta[META_BAD_EXPERT_IDS:META_DROPPED_ROWS + 1] = 0
        if bad:
            raise ValueError(f"topk_idx: {bad} expert id(s) outside [-1, {self.num_experts}) were ignored")
        if dropped:
            raise ValueError(f"topk_idx: {dropped} row(s) past a rank's receive capacity ({self.max_recv_rows}) were "
                             "dropped; the K slots of a token must name distinct experts")

    def describe(self) -> str:
        return describe_layout(self.regions)

    def destroy(self) -> None:
        """Release the memory. Any later use of the buffer raises RuntimeError.

        With the symm backend, peers map this memory: destroy it on every rank after the same
        calls (the last call's combine barrier guarantees no peer touches it any more)."""
        close = getattr(self.__dict__.get("backend"), "close", None)
        if close is not None:
            close()
        self._views = None
        self._storage = None

    def __repr__(self) -> str:
        state = "destroyed" if self._views is None else f"{self.nbytes / 2**20:.1f} MiB on {self.device}"
        return (f"MegaMoEBuffer(E={self.num_experts}, C={self.num_max_tokens_per_rank}, K={self.num_topk}, "
                f"H={self.hidden}, I={self.intermediate}, mode={self.mode}, ranks={self.num_ranks}, "
                f"backend={self.backend.name}, {state})")


# Arguments every rank must pass alike; choice arguments travel as their index in the tuple.
_AGREED_CHOICES = {"mode": MODES, "intermediate_sf": INTERMEDIATE_SF, "mma": MMAS, "backend": BACKENDS}
_INVALID = -1
_INT64_MAX = 2**63 - 1


def _encode_argument(name: str, value) -> int:
    """One int64 per argument; every invalid value becomes _INVALID (checked after the gather)."""
    choices = _AGREED_CHOICES.get(name)
    if choices is not None:
        return choices.index(value) if isinstance(value, str) and value in choices else _INVALID
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT64_MAX:
        return _INVALID
    return value


def _decode_argument(name: str, code: int) -> str:
    if code == _INVALID:
        return "an invalid value"
    choices = _AGREED_CHOICES.get(name)
    return repr(choices[code]) if choices is not None else str(code)


def _check_ranks_agree(group, rank: int, num_ranks: int, device: torch.device,
                       arguments: dict) -> tuple[bool, bool]:
    """All-gather the buffer's arguments over `group`; raise ValueError on every rank if any differ.

    Invalid values are gathered as a sentinel too, so every rank takes part in the collective and
    then raises the same error, instead of one rank raising and the others waiting for it.
    Returns whether every rank is a CUDA device of one node (same host name), which is what
    backend="auto" needs to pick "symm", and whether two of those ranks share one GPU (same device
    UUID: the symm backend then maps peers through CUDA IPC); both travel in the same gather.
    """
    from .comm.wait import wait_for

    names = list(arguments)
    codes = [_encode_argument(n, arguments[n]) for n in names]
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""
    codes += [zlib.crc32(gpu.encode()), zlib.crc32(socket.gethostname().encode()), int(device.type == "cuda")]
    mine = torch.tensor(codes, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(num_ranks)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    wait_for(work, f"MegaMoEBuffer (rank {rank}): the all_gather that compares the arguments of all ranks")
    table = torch.stack(gathered).tolist()
    one_cuda_node = len({row[-2] for row in table}) == 1 and all(row[-1] for row in table)
    shared_device = one_cuda_node and len({row[-3] for row in table}) < num_ranks
    problems = []
    for column, name in enumerate(names):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {_decode_argument(name, v)}" for r, v in enumerate(values))
            problems.append(f"{name} ({per_rank})")
    if problems:
        raise ValueError("MegaMoEBuffer: the ranks of the group disagree on " + "; ".join(problems)
                         + f" (this is rank {rank}); every rank must pass the same arguments")
    return one_cuda_node, shared_device


def describe_layout(regions: list[Region]) -> str:
    name_width = max(len(r.name) for r in regions) + 2
    lines = [f"{'region':<{name_width}}{'shape':<24}{'dtype':<16}{'MiB':>10}"]
    for r in regions:
        lines.append(f"{r.name:<{name_width}}{str(list(r.shape)):<24}{str(r.dtype).replace('torch.', ''):<16}"
                     f"{r.nbytes / 2**20:>10.2f}")
    total = regions[-1].offset + regions[-1].nbytes
    lines.append(f"{'total':<{name_width + 40}}{total / 2**20:>10.2f}")
    return "\n".join(lines)
