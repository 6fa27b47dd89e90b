"""plan: which rows each local expert receives, computed on the device with no host sync.

Two launches (and a memset of the counts) over the (rank, token, slot) entries of the routing
table:
  count:   expert_count[e] += 1 per entry routed to local expert e; the atomic's old value is
           the entry's position within its expert (slot_rank). With PEERS (the symm backend)
           the routing table is every rank's topk_idx, read through the ranks' buffer base
           addresses, and copied into a local table for the scatter; entries past a rank's
           num_tokens (its meta word) are not read.
  scatter: expert_offsets = exclusive prefix sum of expert_count (every program recomputes it,
           it is at most a few hundred numbers); sorted_rows[offsets[e] + slot_rank] = entry.
           Program 0 writes expert_offsets and adds the counts to recv_stats. Rows past the
           receive capacity (only when a token's slots repeat a local expert) are dropped and
           counted in meta, so nothing is written out of bounds.

Small tables (decode at EP = 1: T * K entries within one [BLOCK] program, e.g. 64 for v4-flash's
256 experts) take one launch instead: one program counts, ranks (each entry's position is the
number of earlier entries of its expert, a prefix sum over the [BLOCK, BLOCK_E] one-hot table)
and scatters, with no atomics and no memset. At one token the three launches of the general
path are about 6.6 us of a 67 us call (H100, docs/PERF.md).

The order of rows within an expert depends on atomic timing (entry order in the one-program
plan), but no output does: each row's GEMM result is independent of its position in a tile, and
the combine sums slots in slot order. Entries with ids outside [-1, num_experts) are skipped
and counted in meta.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..buffer import META_BAD_EXPERT_IDS, META_DROPPED_ROWS, META_FAILED, META_NUM_TOKENS
from .common import after_predecessor
from .launch import pdl_options

BLOCK = 1024
SINGLE_PROGRAM = True
"""Plan tables that fit one program in one launch (tests turn it off to cover the general path)."""


@triton.jit
def _local_entries(expert, valid, num_experts, first_expert, num_local_experts, meta_ptr, META_BAD: tl.constexpr):
    """(local expert index, routed here) of each entry; ids outside [-1, num_experts) count in meta."""
    bad = valid & ((expert < -1) | (expert >= num_experts))
    num_bad = tl.sum(bad.to(tl.int32), axis=0)
    if num_bad > 0:
        tl.atomic_add(meta_ptr + META_BAD, num_bad)
    local = expert - first_expert
    return local, valid & ~bad & (local >= 0) & (local < num_local_experts)


@triton.jit(do_not_specialize=["num_entries"])
def _plan_count_kernel(topk_idx_ptr, expert_count_ptr, slot_rank_ptr, meta_ptr, num_entries,
                       num_experts, first_expert, num_local_experts,
                       peer_ptrs_ptr, topk_offset, meta_offset, entries_per_rank, num_topk,
                       BLOCK: tl.constexpr, META_BAD: tl.constexpr, META_TOKENS: tl.constexpr,
                       META_FAIL: tl.constexpr, PEERS: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < num_entries
    if PEERS:
        source = offs // entries_per_rank
        entry = offs - source * entries_per_rank
        base = tl.load(peer_ptrs_ptr + source, mask=valid, other=0)
        tokens = tl.load((base + meta_offset).to(tl.pointer_type(tl.int32)) + META_TOKENS, mask=valid, other=0)
        readable = valid & (entry < tokens * num_topk)
        expert = tl.load((base + topk_offset).to(tl.pointer_type(tl.int32)) + entry, mask=readable, other=-1)
        # After a failed barrier the peers' tables may be stale or torn: plan nothing.
        expert = tl.where(tl.load(meta_ptr + META_FAIL) != 0, -1, expert)
        tl.store(topk_idx_ptr + offs, expert, mask=valid)
    else:
        expert = tl.load(topk_idx_ptr + offs, mask=valid, other=-1)
    local, mine = _local_entries(expert, valid, num_experts, first_expert, num_local_experts, meta_ptr, META_BAD)
    rank = tl.atomic_add(expert_count_ptr + local, 1, mask=mine)
    tl.store(slot_rank_ptr + offs, rank, mask=mine)


@triton.jit(do_not_specialize=["num_entries"])
def _plan_scatter_kernel(topk_idx_ptr, expert_count_ptr, slot_rank_ptr, expert_offsets_ptr,
                         sorted_rows_ptr, recv_stats_ptr, meta_ptr, num_entries, num_experts, first_expert,
                         num_local_experts, max_rows, HAS_STATS: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_E: tl.constexpr, META_DROPPED: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    pid = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    if pid == 0:
        counts = tl.load(expert_count_ptr + e, mask=e < num_local_experts, other=0)
        offsets = tl.cumsum(counts, axis=0) - counts
        tl.store(expert_offsets_ptr + e, tl.minimum(offsets, max_rows), mask=e < num_local_experts)
        tl.store(expert_offsets_ptr + num_local_experts, tl.minimum(tl.sum(counts, axis=0), max_rows))
        if HAS_STATS:
            stats = tl.load(recv_stats_ptr + e, mask=e < num_local_experts)
            tl.store(recv_stats_ptr + e, stats + counts, mask=e < num_local_experts)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < num_entries
    expert = tl.load(topk_idx_ptr + offs, mask=valid, other=-1)
    local = expert - first_expert
    mine = valid & (expert >= 0) & (expert < num_experts) & (local >= 0) & (local < num_local_experts)
    # The symm backend's table covers every rank's capacity, mostly empty at decode: a program
    # with no local entry skips the prefix sum and its [BLOCK, BLOCK_E] compare.
    if tl.sum(mine.to(tl.int32), axis=0) > 0:
        counts = tl.load(expert_count_ptr + e, mask=e < num_local_experts, other=0)
        offsets = tl.cumsum(counts, axis=0) - counts
        rank = tl.load(slot_rank_ptr + offs, mask=mine, other=0)
        # Gather this entry's expert offset from the per-program copy of the prefix sum.
        position = tl.sum(tl.where(local[:, None] == e[None, :], offsets[None, :], 0), axis=1) + rank
        tl.store(sorted_rows_ptr + position, offs.to(tl.int32), mask=mine & (position < max_rows))
        dropped = tl.sum((mine & (position >= max_rows)).to(tl.int32), axis=0)
        if dropped > 0:
            tl.atomic_add(meta_ptr + META_DROPPED, dropped)


@triton.jit(do_not_specialize=["num_entries"])
def _plan_single_kernel(topk_idx_ptr, expert_count_ptr, expert_offsets_ptr, sorted_rows_ptr, recv_stats_ptr,
                        meta_ptr, num_entries, num_experts, first_expert, num_local_experts, max_rows,
                        HAS_STATS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                        META_BAD: tl.constexpr, META_DROPPED: tl.constexpr, PDL: tl.constexpr):
    """The whole plan of at most BLOCK entries in one program (see the module docstring)."""
    after_predecessor(PDL)
    offs = tl.arange(0, BLOCK)
    valid = offs < num_entries
    expert = tl.load(topk_idx_ptr + offs, mask=valid, other=-1)
    local, mine = _local_entries(expert, valid, num_experts, first_expert, num_local_experts, meta_ptr, META_BAD)
    e = tl.arange(0, BLOCK_E)
    hits = (mine[:, None] & (local[:, None] == e[None, :])).to(tl.int32)          # [BLOCK, BLOCK_E]
    counts = tl.sum(hits, axis=0)
    offsets = tl.cumsum(counts, axis=0) - counts
    # Position = the expert's offset + the entries of the same expert before this one.
    earlier = tl.cumsum(hits, axis=0) - hits
    position = tl.sum(hits * (offsets[None, :] + earlier), axis=1)
    experts = e < num_local_experts
    tl.store(expert_count_ptr + e, counts, mask=experts)
    tl.store(expert_offsets_ptr + e, tl.minimum(offsets, max_rows), mask=experts)
    tl.store(expert_offsets_ptr + num_local_experts, tl.minimum(tl.sum(counts, axis=0), max_rows))
    if HAS_STATS:
        stats = tl.load(recv_stats_ptr + e, mask=experts)
        tl.store(recv_stats_ptr + e, stats + counts, mask=experts)
    tl.store(sorted_rows_ptr + position, offs, mask=mine & (position < max_rows))
    dropped = tl.sum((mine & (position >= max_rows)).to(tl.int32), axis=0)
    if dropped > 0:
        tl.atomic_add(meta_ptr + META_DROPPED, dropped)


def plan(topk_idx: torch.Tensor, num_entries: int, buf, recv_stats: torch.Tensor | None,
         peers: tuple | None = None) -> None:
    """Fill buf.expert_count, expert_offsets, slot_rank and sorted_rows for `num_entries` entries.

    topk_idx: int32, the flat routing table (num_entries = tokens * K at EP = 1).
    recv_stats: int32 [num_local_experts] or None; counts are added to it.
    peers: None, or (peer_ptrs, topk_offset, meta_offset) for the symm backend: num_entries =
    R * C * K entries of every rank's topk_idx (byte offset topk_offset in each rank's buffer,
    whose base addresses are the int64 tensor peer_ptrs), copied into `topk_idx`.
    """
    first_expert = buf.rank * buf.num_local_experts
    block_e = triton.next_power_of_2(buf.num_local_experts)
    # The scatter gathers offsets with a [BLOCK, BLOCK_E] compare; keep that tile bounded.
    block = max(16, min(BLOCK, 16384 // block_e))
    pdl = pdl_options(topk_idx.device)
    # Without recv_stats the kernels never read their stats pointer (HAS_STATS): any int32 tensor.
    stats = recv_stats if recv_stats is not None else buf.expert_count
    if SINGLE_PROGRAM and peers is None and num_entries <= block:
        # Sized to the entries: its [BLOCK, BLOCK_E] one-hot table and the scan down it are the
        # program's work (sized by BLOCK_E instead, one token of gpt-oss-120b, 4 entries, filled a
        # 128 x 128 table: 6.4 us against 1.6, H200, docs/PERF.md).
        _plan_single_kernel[(1,)](topk_idx, buf.expert_count, buf.expert_offsets, buf.sorted_rows,
                                  stats, buf.meta, num_entries,
                                  buf.num_experts, first_expert, buf.num_local_experts, buf.max_recv_rows,
                                  HAS_STATS=recv_stats is not None, BLOCK=max(16, triton.next_power_of_2(num_entries)),
                                  BLOCK_E=block_e,
                                  META_BAD=META_BAD_EXPERT_IDS, META_DROPPED=META_DROPPED_ROWS, num_warps=8,
                                  **pdl)
        return
    grid = (max(1, triton.cdiv(num_entries, block)),)
    buf.expert_count.zero_()
    peer_ptrs, topk_offset, meta_offset = peers if peers is not None else (topk_idx, 0, 0)
    _plan_count_kernel[grid](topk_idx, buf.expert_count, buf.slot_rank, buf.meta, num_entries,
                             buf.num_experts, first_expert, buf.num_local_experts,
                             peer_ptrs, topk_offset, meta_offset, buf.num_max_tokens_per_rank * buf.num_topk,
                             buf.num_topk, BLOCK=block, META_BAD=META_BAD_EXPERT_IDS, META_TOKENS=META_NUM_TOKENS,
                             META_FAIL=META_FAILED, PEERS=peers is not None, **pdl)
    _plan_scatter_kernel[grid](topk_idx, buf.expert_count, buf.slot_rank, buf.expert_offsets,
                               buf.sorted_rows, stats, buf.meta, num_entries, buf.num_experts, first_expert,
                               buf.num_local_experts, buf.max_recv_rows, HAS_STATS=recv_stats is not None,
                               BLOCK=block, BLOCK_E=block_e, META_DROPPED=META_DROPPED_ROWS, **pdl)
