"""EP inside one node over symmetric memory: each rank reads and writes its peers' buffers.

Every rank's whole MegaMoEBuffer is one symmetric allocation (the same layout at the same
offsets on every rank), so a peer's region is its base address + the region's offset.
`peer_ptrs` holds the R base addresses (int64, on the device); kernels cast base + offset to
a pointer. On CUDA the allocation comes from torch.distributed._symmetric_memory (peers' memory
mapped over NVLink); on the CPU (tests, under TRITON_INTERPRET=1) from files in /dev/shm that
every rank maps, which runs the same kernels and the same protocol across processes (a host
clock, `InterpreterClock`, stands in for %globaltimer there). Ranks that share one GPU (a
test set-up for one-GPU machines: `megamoe stress --share-gpu`) map each other's plain CUDA
allocations through CUDA IPC instead, since torch's symmetric memory takes one rank a device;
their kernels take turns on the GPU (time slices), so a barrier may wait a slice for a peer.

One call, rank r of R, every step a kernel on r's stream, no host synchronisation:

1. barrier "dispatch" (epoch e = this buffer's call counter + 1, kept on the device): r writes
   e into slot [0, r] of every rank's `signals`, then waits until its own slots [0, p] reach e
   for every p. A rank reaches it after its pre_dispatch, so past it every send side (x,
   scales, topk_idx, topk_weights, meta) of this call is written.
2. plan over peers: the R * C * K entries (rank, token, slot) of all ranks' topk_idx, read
   through peer_ptrs into recv_topk; counts, offsets and expert-sorted rows as at EP = 1, with
   entry = (rank * C + token) * K + slot.
3. gather: each received row's FP8 bytes, its UE8M0 scales (decoded to recv_scales, laid out
   as the GEMMs read them) and its routing weight are pulled from the source rank into
   recv_x / recv_weights at the row's expert-sorted position.
4. L1 on the gathered rows; L2 writes each row into the source rank's `combine` region at
   row token * K + slot (NVLink stores).
5. barrier "combine" (same epoch, slots [1, *]): past it every rank's L2 rows for r have landed.
6. combine of r's own tokens, as at EP = 1.

Why two barriers are enough: a rank starts its next pre_dispatch (overwriting its send side)
only after its "combine" barrier, which every peer passes only after its gather and L2 of
this call; and a peer writes r's combine region of the next call only after the next
"dispatch" barrier, which r enters after its combine of this call. Signals hold the epoch, a
monotone int64, so a stale signal of an earlier call never satisfies a later wait.

Every wait is bounded by MEGAMOE_TIMEOUT_S (read when the call is launched or captured). Past
it the barrier kernel records (phase, missing rank) in a word of pinned host memory and in the
buffer's meta (later kernels of the call then skip their work), writes ABORTED (-1) into its
slots on every peer (a peer waiting on it, or arriving late, stops at its next barrier with
"aborted" instead of finishing on stale data), and exits. The host reads that
word without a device sync: `MegaMoEBuffer.check_errors()` and the next pre_dispatch or
mega_moe on the buffer raise TimeoutError naming the operation and the rank. The y of a call
that timed out is not valid, and the buffer is unusable afterwards (peers may be in any state).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .. import env
from ..buffer import META_FAILED
from ..experts import ExpertOptions, launch_l1, launch_l2
from ..kernels.combine import combine
from ..kernels.common import after_predecessor
from ..kernels.launch import pdl_options
from ..kernels.plan import plan
from .wait import wait_for

PHASES = ("dispatch", "combine")

# Error word in pinned host memory: [0] what happened, [1] phase, [2] the rank waited for.
ERR_FLAG_WORD: tl.constexpr = tl.constexpr(0)
ERR_PHASE_WORD: tl.constexpr = tl.constexpr(1)
ERR_PEER_WORD: tl.constexpr = tl.constexpr(2)
ERR_TIMEOUT: tl.constexpr = tl.constexpr(1)   # the rank did not arrive within the timeout
ERR_ABORTED: tl.constexpr = tl.constexpr(2)   # the rank gave up on this call (its own wait failed)

CLOCK_PERIOD_S = 0.001
IPC_HANDLE_BYTES = 4096   # room for one pickled CUDA IPC handle (ranks sharing a GPU), one per peer

GATHER_PROGRAMS_PER_SM = 8
CPU_GATHER_PROGRAMS = 8


def signal_words(num_ranks: int) -> int:
    """int64 words of the `signals` region: one slot per (phase, source rank), then the epoch."""
    return len(PHASES) * num_ranks + 1


class InterpreterClock:
    """CPU (Triton interpreter) only: an int64 tensor holding time.monotonic_ns(), refreshed by a
    daemon thread every CLOCK_PERIOD_S (the interpreter has no %globaltimer), so the interpreted
    barrier measures its timeout in seconds as the GPU does. The interpreter runs Python, so
    the thread gets the GIL while a kernel spins."""

    _tensor = None

    @classmethod
    def tensor(cls) -> torch.Tensor:
        if cls._tensor is None:
            cls._tensor = torch.full((1,), time.monotonic_ns(), dtype=torch.int64)
            threading.Thread(target=cls._tick, name="megamoe-interpreter-clock", daemon=True).start()
        return cls._tensor

    @classmethod
    def _tick(cls) -> None:
        while True:
            cls._tensor[0] = time.monotonic_ns()
            time.sleep(CLOCK_PERIOD_S)


@triton.jit
def _now_ns(clock_ptr, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.load(clock_ptr, volatile=True)
    else:
        return tl.extra.cuda.globaltimer()


@triton.jit
def _barrier_kernel(peer_ptrs_ptr, signals_offset, signals_ptr, meta_ptr, error_address, rank, num_ranks,
                    timeout_ns, clock_ptr, PHASE: tl.constexpr, NUM_PHASES: tl.constexpr, BLOCK_R: tl.constexpr,
                    META_FAIL: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    epoch_ptr = signals_ptr + NUM_PHASES * num_ranks
    if PHASE == 0:
        epoch = tl.load(epoch_ptr) + 1
        tl.store(epoch_ptr, epoch)
    else:
        epoch = tl.load(epoch_ptr)
    peers = tl.arange(0, BLOCK_R)
    is_rank = peers < num_ranks
    base = tl.load(peer_ptrs_ptr + peers, mask=is_rank, other=0)
    peer_signals = (base + signals_offset).to(tl.pointer_type(tl.int64))
    failed = tl.load(meta_ptr + META_FAIL) != 0
    # Signal every rank (this one included): its slot [PHASE, rank] <- epoch, or ABORTED (-1)
    # after a failure here. Release at system scope: the writes of the kernels before this one
    # are visible to a peer that sees the signal.
    value = tl.where(failed, -1, epoch)
    tl.atomic_xchg(peer_signals + PHASE * num_ranks + rank, tl.zeros((BLOCK_R,), tl.int64) + value, mask=is_rank,
                   sem="release", scope="sys")

    mine = signals_ptr + PHASE * num_ranks + peers
    start = _now_ns(clock_ptr, INTERPRET)
    missing = 1
    aborted = 0
    expired = failed  # after a failure nothing waits again
    while (missing > 0) & (aborted == 0) & (expired == 0):
        seen = tl.atomic_add(mine, tl.zeros((BLOCK_R,), tl.int64), mask=is_rank, sem="acquire", scope="sys")
        missing = tl.sum((is_rank & (seen < epoch)).to(tl.int32), axis=0)
        aborted = tl.sum((is_rank & (seen < 0)).to(tl.int32), axis=0)
        expired = (_now_ns(clock_ptr, INTERPRET) - start) > timeout_ns
    if (missing > 0) & (failed == 0):
        # Timed out, or a peer aborted: record which rank, tell the host, and mark every slot of
        # this rank ABORTED on every peer, so that a rank arriving late stops at its next barrier
        # instead of finishing on stale data.
        seen = tl.atomic_add(mine, tl.zeros((BLOCK_R,), tl.int64), mask=is_rank, sem="acquire", scope="sys")
        late = tl.where(aborted > 0, tl.min(tl.where(is_rank & (seen < 0), peers, BLOCK_R), axis=0),
                        tl.min(tl.where(is_rank & (seen < epoch), peers, BLOCK_R), axis=0))
        tl.store(meta_ptr + META_FAIL, 1)
        for phase in tl.static_range(NUM_PHASES):
            tl.atomic_xchg(peer_signals + phase * num_ranks + rank, tl.full((BLOCK_R,), -1, tl.int64), mask=is_rank,
                           sem="release", scope="sys")
        error = error_address.to(tl.pointer_type(tl.int32))
        tl.store(error + ERR_PHASE_WORD, PHASE)
        tl.store(error + ERR_PEER_WORD, late)
        tl.atomic_xchg(error + ERR_FLAG_WORD, tl.where(aborted > 0, ERR_ABORTED, ERR_TIMEOUT), sem="release",
                       scope="sys")


@triton.jit
def _gather_kernel(peer_ptrs_ptr, x_offset, sf_offset, weights_offset, sorted_rows_ptr, expert_offsets_ptr,
                   num_local_experts, recv_x_ptr, recv_scales_ptr, stride_rs_m, recv_weights_ptr,
                   entries_per_rank, num_topk, row_words, sf_words, groups,
                   QUANTIZED: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    total = tl.load(expert_offsets_ptr + num_local_experts)
    w = tl.arange(0, BLOCK_W)
    g = tl.arange(0, BLOCK_G)
    for row in range(tl.program_id(0), total, tl.num_programs(0)):
        entry = tl.load(sorted_rows_ptr + row).to(tl.int64)
        source = entry // entries_per_rank
        local = entry - source * entries_per_rank
        token = local // num_topk
        base = tl.load(peer_ptrs_ptr + source)
        # The row's bytes as int64 words: H FP8 bytes (2H in bf16xbf16 mode), a multiple of 8.
        # Buffer bases are allocation starts and regions start on 256 bytes: saying so lets the
        # compiler use 16-byte loads, which it cannot prove through the int-to-pointer cast.
        src_row = tl.multiple_of((base + x_offset).to(tl.pointer_type(tl.int64)), 16) + token * row_words
        dst_row = recv_x_ptr + tl.cast(row, tl.int64) * row_words
        for start in range(0, row_words, BLOCK_W):
            words = start + w
            tl.store(dst_row + words, tl.load(src_row + words, mask=words < row_words), mask=words < row_words)
        if QUANTIZED:
            # Packed UE8M0 bytes (byte g of the row = group g) -> 2^(e - 127), the row of the
            # scale table.
            sf_row = (base + sf_offset).to(tl.pointer_type(tl.int32)) + token * sf_words
            packed = tl.load(sf_row + g // 4, mask=g < groups, other=0)
            exponent = (packed >> ((g % 4) * 8)) & 0xFF
            scale = (exponent << 23).to(tl.float32, bitcast=True)
            tl.store(recv_scales_ptr + tl.cast(row, tl.int64) * stride_rs_m + g, scale, mask=g < groups)
        weight = tl.load((base + weights_offset).to(tl.pointer_type(tl.float32)) + local)
        tl.store(recv_weights_ptr + row, weight)


class SymmetricStorage:
    """One rank's buffer memory, mapped by every rank of the group, and the ranks' base addresses.

    storage:   uint8 [nbytes] tensor of this rank (what MegaMoEBuffer views).
    peer_ptrs: int64 [R] tensor on the buffer's device: rank p's storage address as seen here.
    shared_device: two ranks of the group run on this one GPU (MegaMoEBuffer's gather of the
    ranks' arguments tells), so the peers are mapped through CUDA IPC.
    """

    def __init__(self, nbytes: int, group, rank: int, num_ranks: int, device: torch.device,
                 shared_device: bool):
        self._keep = []
        if shared_device:
            addresses = self._map_ipc(nbytes, group, rank, num_ranks, device)
        elif device.type == "cuda":
            from torch.distributed import _symmetric_memory as symm_mem

            self.storage = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
            handle = symm_mem.rendezvous(self.storage, group)
            self._keep.append(handle)
            # buffer_ptrs are the bases of the ranks' allocations; the tensor may start at an
            # offset inside its allocation (the handle's `offset`), which need not be the same on
            # every rank: gather every rank's.
            offset = torch.tensor([self.storage.data_ptr() - handle.buffer_ptrs[rank]], dtype=torch.int64,
                                  device=device)
            offsets = [torch.empty_like(offset) for _ in range(num_ranks)]
            wait_for(dist.all_gather(offsets, offset, group=group, async_op=True),
                     f"MegaMoEBuffer (rank {rank}): all_gather of the symmetric-memory offsets")
            addresses = [base + int(off) for base, off in zip(handle.buffer_ptrs, offsets)]
        else:
            addresses = self._map_shared_files(nbytes, group, rank, num_ranks)
        # The gather kernel loads rows 16 bytes at a time from these bases (it is told so).
        assert all(a % 16 == 0 for a in addresses), [hex(a) for a in addresses]
        self.peer_ptrs = torch.tensor(addresses, dtype=torch.int64, device=device)

    def _map_ipc(self, nbytes, group, rank, num_ranks, device) -> list[int]:
        # torch.multiprocessing's CUDA sharing: the allocation's IPC handle (and the reference
        # count that keeps it alive while peers map it) travels as pickled bytes in a fixed-size
        # tensor, so one bounded all_gather carries every rank's.
        # Each peer gets its own share: torch counts one consumer per share (a counter set to
        # 1, which the consumer's release takes back to 0). With one share for several peers
        # the first release let this rank free the memory and retire the counter file while
        # the others still mapped it; at 4 ranks a peer then died in torch's unlink ("could not
        # unlink the shared memory file", docs/RELIABILITY.md finding 8).
        from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

        self.storage = torch.empty(nbytes, dtype=torch.uint8, device=device)
        mine = torch.zeros(num_ranks, IPC_HANDLE_BYTES, dtype=torch.uint8)   # row p: the share for rank p
        for p in range(num_ranks):
            if p == rank:
                continue
            rebuild, args = reduce_tensor(self.storage)
            assert rebuild is rebuild_cuda_tensor, rebuild
            blob = pickle.dumps(args)
            assert len(blob) <= IPC_HANDLE_BYTES - 8, len(blob)
            mine[p, :8] = torch.tensor([len(blob)], dtype=torch.int64).view(torch.uint8)
            mine[p, 8:8 + len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        blobs = [torch.empty_like(mine) for _ in range(num_ranks)]
        wait_for(dist.all_gather(blobs, mine, group=group, async_op=True),
                 f"MegaMoEBuffer (rank {rank}): all_gather of the CUDA IPC handles")
        peers = []
        for p, b in enumerate(blobs):
            if p == rank:
                peers.append(self.storage)
            else:
                size = int(b[rank, :8].view(torch.int64))
                peers.append(rebuild_cuda_tensor(*pickle.loads(b[rank, 8:8 + size].numpy().tobytes())))
        self._keep.extend(peers)
        return [t.data_ptr() for t in peers]

    def _map_shared_files(self, nbytes, group, rank, num_ranks) -> list[int]:
        if not env.triton_interpret():
            raise ValueError("backend: 'symm' on the CPU runs its kernels in the Triton interpreter; set "
                             "TRITON_INTERPRET=1 before importing megamoe, or use backend='nccl'")
        # Rank 0 names the files; the name travels as two int64 words.
        token = torch.tensor(list(divmod(uuid.uuid4().int >> 66, 2**62)), dtype=torch.int64)
        wait_for(dist.broadcast(token, src=dist.get_global_rank(group, 0), group=group, async_op=True),
                 f"MegaMoEBuffer (rank {rank}): broadcast of the shared-memory name")
        stem = f"/dev/shm/megamoe-{token[0].item():x}{token[1].item():x}"
        path = f"{stem}-{rank}"
        with open(path, "wb") as f:
            f.truncate(nbytes)
        self.storage = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        _barrier(group, rank, "the creation of the shared-memory files")
        peers = [self.storage if p == rank else torch.from_file(f"{stem}-{p}", shared=True, size=nbytes,
                                                                  dtype=torch.uint8)
                 for p in range(num_ranks)]
        _barrier(group, rank, "the mapping of the shared-memory files")
        os.unlink(path)  # every rank has mapped it; the mappings outlive the name
        self._keep.extend(peers)
        return [t.data_ptr() for t in peers]


def _barrier(group, rank: int, what: str) -> None:
    """A host barrier over the group, bounded by MEGAMOE_TIMEOUT_S."""
    flag = torch.zeros(1, dtype=torch.int64, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    wait_for(dist.all_reduce(flag, group=group, async_op=True), f"MegaMoEBuffer (rank {rank}): barrier after {what}")


class SymmBackend:
    name = "symm"

    def __init__(self, buf, storage: SymmetricStorage):
        self.storage = storage
        self.peer_ptrs = storage.peer_ptrs
        self.offsets = {r.name: r.offset for r in buf.regions}
        # The timeout word: pinned host memory the device writes and the host reads without a sync.
        self.error = torch.zeros(4, dtype=torch.int32, pin_memory=buf.device.type == "cuda")
        self.rank, self.num_ranks = buf.rank, buf.num_ranks
        if buf.device.type == "cuda":
            sms = torch.cuda.get_device_properties(buf.device).multi_processor_count
            self.gather_programs = sms * GATHER_PROGRAMS_PER_SM
        else:
            self.gather_programs = CPU_GATHER_PROGRAMS
        # Every rank has zeroed its signals and meta (MegaMoEBuffer.__init__) before any rank
        # may signal: the constructor's last step is this barrier.
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
        _barrier(buf.group, buf.rank, "zeroing the signals")

    def close(self) -> None:
        """Drop this rank's mapping of the symmetric memory, once its kernels are done with it."""
        if self.storage is not None and self.peer_ptrs.is_cuda:
            torch.cuda.synchronize(self.peer_ptrs.device)
        self.storage = None

    def raise_pending(self) -> None:
        """Raise TimeoutError if a barrier of an earlier call timed out (a host read, no sync)."""
        flag = int(self.error[ERR_FLAG_WORD.value])
        if flag == 0:
            return
        phase, peer = PHASES[int(self.error[ERR_PHASE_WORD.value])], int(self.error[ERR_PEER_WORD.value])
        what = (f"rank {peer} did not reach the {phase} barrier within MEGAMOE_TIMEOUT_S ({env.timeout_s():g} s)"
                if flag == ERR_TIMEOUT.value else
                f"rank {peer} aborted the call at the {phase} barrier (its own wait on another rank failed)")
        raise TimeoutError(f"mega_moe (rank {self.rank}, symm backend): {what}; that call's output is not valid and "
                           "this buffer is unusable (destroy it; the process group may need rebuilding)")

    def _barrier(self, buf, phase: int) -> None:
        interpret = env.triton_interpret()
        timeout_ns = int(env.timeout_s() * 1e9)
        _barrier_kernel[(1,)](
            self.peer_ptrs, self.offsets["signals"], buf.signals, buf.meta, self.error.data_ptr(), self.rank,
            self.num_ranks, timeout_ns, InterpreterClock.tensor() if interpret else buf.signals,
            PHASE=phase, NUM_PHASES=len(PHASES), BLOCK_R=triton.next_power_of_2(self.num_ranks), META_FAIL=META_FAILED,
            INTERPRET=interpret, num_warps=1, **pdl_options(buf.device))

    def forward(self, y: torch.Tensor, l1, l2, buf, opts: ExpertOptions, recv_stats) -> None:
        # mega_moe's checks (buf.check_alive) have already raised any earlier timeout.
        for _, step in self.steps(y, l1, l2, buf, opts, recv_stats):
            step()

    def steps(self, y: torch.Tensor, l1, l2, buf, opts: ExpertOptions,
              recv_stats) -> list[tuple[str, Callable[[], None]]]:
        """The call's kernels in order, as (stage name, launch) pairs (tools/ep_breakdown.py times
        growing prefixes of them)."""
        quantized = buf.mode == "fp8xfp4"
        cap, k = buf.num_max_tokens_per_rank, buf.num_topk
        entries = self.num_ranks * cap * k
        max_rows = buf.max_recv_rows
        row_bytes = buf.hidden * buf.x.element_size()
        groups = buf.hidden // 32 if quantized else 0
        # The tile config follows this rank's own token count: with balanced ranks and routing
        # it receives about as many rows as it sends.
        hint = y.shape[0] * k

        def gather():
            _gather_kernel[(min(max_rows, self.gather_programs),)](
                self.peer_ptrs, self.offsets["x"], self.offsets["x_sf"], self.offsets["topk_weights"],
                buf.sorted_rows, buf.expert_offsets, buf.num_local_experts,
                buf.recv_x.view(torch.int64), buf.recv_scales, buf.recv_scales.stride(0), buf.recv_weights,
                cap * k, k, row_bytes // 8, buf.x_sf.shape[1], groups,
                QUANTIZED=quantized, BLOCK_W=min(1024, triton.next_power_of_2(row_bytes // 8)),
                BLOCK_G=triton.next_power_of_2(max(groups, 1)), num_warps=4, **pdl_options(buf.device))

        def combine_own():
            if y.shape[0]:
                combine(buf.combine, buf.topk_idx, y, buf.num_experts)

        return [
            ("dispatch barrier", lambda: self._barrier(buf, 0)),
            ("plan", lambda: plan(buf.recv_topk, entries, buf, recv_stats,
                                  peers=(self.peer_ptrs, self.offsets["topk_idx"], self.offsets["meta"]))),
            ("gather", gather),
            ("l1", lambda: launch_l1(buf, max_rows, 1, buf.recv_x, buf.recv_scales if quantized else None,
                                     buf.recv_weights, l1, opts, gathered=True, persistent=True, rows_hint=hint)),
            ("l2", lambda: launch_l2(buf, max_rows, buf.recv_weights, None, l2, gathered=True,
                                     remote=(self.peer_ptrs, self.offsets["combine"], cap * k),
                                     persistent=True, rows_hint=hint)),
            ("combine barrier", lambda: self._barrier(buf, 1)),
            ("combine", combine_own),
        ]
