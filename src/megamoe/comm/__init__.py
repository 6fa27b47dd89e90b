"""Communication backends of MegaMoE calls, behind one small interface.

A backend's `forward(y, l1, l2, buf, opts, recv_stats)` runs one call after `pre_dispatch`:
dispatch the buffer's rows to the experts' owners, run the experts (`experts.run_experts`),
bring each result row back to its (token, slot) place in `buf.combine` of the source rank,
and combine into `y`. Every rank of the buffer's group calls it, also ranks with no tokens.
`MegaMoEBuffer` picks the backend (`buffer.resolve_backend`) and builds it with
`_make_backend`; a backend's extra buffer regions are added by `buffer.buffer_layout`.

    local  EP = 1: no communication.
    nccl   EP = R over torch.distributed all_to_all_single (NCCL, or gloo on the CPU).
    symm   one node: symmetric memory, NVLink pulls and stores, device-side barriers; no host
           sync, CUDA-graph capturable (on the CPU: /dev/shm and the Triton interpreter, tests).

`wait.wait_for` bounds every host-side wait on a collective by MEGAMOE_TIMEOUT_S; the symm
backend bounds its device-side waits by the same timeout (comm/symm.py).
"""
