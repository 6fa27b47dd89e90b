"""EP over torch.distributed: rows move with `all_to_all_single` and exchanged counts.

For any process group that implements all_to_all_single: NCCL within and across nodes, gloo on
the CPU (the tests). Every rank of the group runs each call, also ranks with no tokens. With
R ranks, E_l = E / R local experts and T tokens of K slots on this rank:

1. send order: the T * K entries (token, slot) sorted stably by destination rank
   (expert // E_l), so each destination's rows keep (token, slot) order; entries with no valid
   expert sort last and are never sent. One `buffer.DispatchRecord` per entry (FP8 row, its
   scale bytes, global expert id, routing weight) is packed into buf.send_rows.
2. counts: all_gather of send_counts [R] into count_matrix [R, R], then the host reads it: the
   one host synchronisation of a call (all_to_all_single takes its split sizes as host ints).
3. dispatch: all_to_all_single of the records into buf.recv_rows, grouped by source rank.
4. experts: the received scale bytes are expanded to float32 in buf.recv_scales (the layout
   the expert kernels read), then `run_experts` over the received rows, one entry per row, into
   buf.recv_out.
5. return: all_to_all_single of the recv_out rows with the splits reversed, into
   buf.send_rows (the records are no longer needed), in send order.
6. the returned rows go to buf.combine at row token * K + slot; `combine` writes y.

Each returned row is bitwise the row EP = 1 computes for that (token, slot): L1 and L2 results
do not depend on which other rows share a tile, and combine sums the slots in slot order.

Every collective is waited for on the host (`comm.wait.wait_for`), all of a call's waits within
one MEGAMOE_TIMEOUT_S from its start, so a rank that never arrives makes the others raise
TimeoutError within the timeout. The host synchronisation of step 2
means a call cannot be captured in a CUDA graph; inside one node the symm backend is the
capturable path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..buffer import META_BAD_EXPERT_IDS, dispatch_record
from ..experts import ExpertOptions, expand_scales, run_experts, run_experts_torch
from ..formats import SCALE_GROUP
from ..kernels.combine import combine
from ..kernels.launch import use_triton
from .wait import Deadline, wait_for


class NcclBackend:
    name = "nccl"

    def __init__(self, buf):
        self.group = buf.group
        self.record = dispatch_record(buf.hidden, buf.mode)

    def forward(self, y: torch.Tensor, l1, l2, buf, opts: ExpertOptions, recv_stats) -> None:
        if y.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("mega_moe: the nccl backend reads the exchanged row counts on the host, so it "
                               "cannot run inside CUDA-graph capture; call it eagerly")
        deadline = Deadline()
        rank, ranks, rec = buf.rank, buf.num_ranks, self.record
        tokens, k = y.shape[0], buf.num_topk
        entries = tokens * k
        quantized = buf.mode == "fp8xfp4"

        # 1. Send order and counts, on the device.
        ids = buf.topk_idx[:tokens].view(-1)                                    # int32 [T * K]
        valid = (ids >= 0) & (ids < buf.num_experts)
        # Ids outside [-1, E) are dropped like -1 and reported by check_errors, as at EP = 1.
        buf.meta[META_BAD_EXPERT_IDS:META_BAD_EXPERT_IDS + 1].add_((~valid & (ids != -1)).sum(dtype=torch.int32))
        dest = torch.where(valid, ids.long() // buf.num_local_experts, ranks)   # int64 [T * K], R = none
        sorted_dest, order = torch.sort(dest, stable=True)
        bounds = torch.searchsorted(sorted_dest, torch.arange(ranks + 1, device=dest.device))
        buf.send_counts.copy_(bounds.diff())
        buf.send_entries[:entries] = order
        work = dist.all_gather(list(buf.count_matrix.unbind(0)), buf.send_counts, group=self.group, async_op=True)

        # Packing overlaps the count exchange. Entries with no expert are packed too (their
        # records are never sent): sizing by the valid count would need the host sync first.
        records = buf.send_rows.view(-1)[: entries * rec.nbytes].view(entries, rec.nbytes)
        token = order // k
        records[:, : rec.sf_offset] = buf.x.view(torch.uint8)[token]
        if quantized:
            records[:, rec.sf_offset: rec.expert_offset] = buf.x_sf.view(torch.uint8)[token]
        records[:, rec.expert_offset: rec.weight_offset].view(torch.int32)[:, 0] = ids[order]
        records[:, rec.weight_offset: rec.weight_offset + 4].view(torch.float32)[:, 0] = \
            buf.topk_weights.view(-1)[order]

        # 2. Counts to the host.
        wait_for(work, f"mega_moe (rank {rank}): all_gather of the send counts", deadline)
        matrix = buf.count_matrix.tolist()
        send_splits = matrix[rank]
        recv_splits = [row[rank] for row in matrix]
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        # Every rank sees the whole matrix, so all raise together instead of leaving peers
        # waiting in the dispatch. Only slots that repeat an expert of the same token can overflow.
        for r in range(ranks):
            received = sum(row[r] for row in matrix)
            if received > buf.max_recv_rows:
                raise ValueError(f"topk_idx: rank {r} would receive {received} rows, more than its buffer holds "
                                 f"({buf.max_recv_rows} = ranks * max_tokens_per_rank * min(num_topk, local "
                                 "experts)); the K slots of a token must name distinct experts")

        # 3. Dispatch.
        recv = buf.recv_rows[:n_recv]
        work = dist.all_to_all_single(recv, records[:n_send], recv_splits, send_splits, group=self.group,
                                      async_op=True)
        wait_for(work, f"mega_moe (rank {rank}): dispatch all_to_all_single", deadline)

        # 4. Experts.
        if n_recv:
            buf.recv_expert[:n_recv] = recv[:, rec.expert_offset: rec.weight_offset].view(torch.int32)[:, 0]
            buf.recv_weights[:n_recv] = recv[:, rec.weight_offset: rec.weight_offset + 4].view(torch.float32)[:, 0]
            a = recv[:, : rec.sf_offset].view(buf.x.dtype)
            a_scales = None
            if quantized:
                a_scales = expand_scales(recv[:, rec.sf_offset: rec.expert_offset], n_recv,
                                         buf.hidden // SCALE_GROUP, buf.recv_scales)
            run = run_experts if use_triton(buf.device) else run_experts_torch
            run(buf, buf.recv_expert, n_recv, 1, a, a_scales, buf.recv_weights, buf.recv_out, l1, l2, opts,
                recv_stats)

        # 5. Return, into the send rows: the dispatch that read them has completed.
        returned = buf.send_rows.view(-1)[: n_send * 2 * buf.hidden].view(n_send, 2 * buf.hidden)
        work = dist.all_to_all_single(returned, buf.recv_out[:n_recv].view(torch.uint8), send_splits, recv_splits,
                                      group=self.group, async_op=True)
        wait_for(work, f"mega_moe (rank {rank}): return all_to_all_single", deadline)

        # 6. Combine.
        if tokens:
            buf.combine.index_copy_(0, buf.send_entries[:n_send], returned.view(torch.bfloat16))
            combine(buf.combine, buf.topk_idx, y, buf.num_experts)
