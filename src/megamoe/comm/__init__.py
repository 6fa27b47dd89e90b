"""Communication backends of MegaMoE calls, behind one small interface.

A backend's `forward(y, l1, l2, buf, opts, recv_stats)` runs one call after `pre_dispatch`:
dispatch the buffer's rows to the experts' owners, run the experts (`experts.run_experts`),
bring each result row back to its (token, slot) place in `buf.combine` of the source rank,
and combine into `y`.

    local  EP = 1: no communication.
"""
