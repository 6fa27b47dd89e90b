"""Expert parallelism over symmetric memory (the symm backend), on CPU ranks.

On the CPU the symm backend maps every rank's buffer from /dev/shm and runs its Triton kernels
(barriers, plan over peers, gather, L2 writing into the source rank's combine region) in the
interpreter, across real processes: the same protocol as over NVLink. Results are compared with
EP = 1 bitwise, like the nccl backend (tests/test_ep_nccl.py). The GPU runs of this backend are
in tests/test_gpu.py and tools/.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import megamoe
from megamoe.buffer import buffer_layout
from megamoe.testing import MoEShape, make_problem, relative_error

from gloo_ranks import run_ranks
from test_ep_nccl import CASES, EPCase, _check_against_ep1, _local_weights, _run_ep_cases
from tolerances import LAYER_KERNEL_VS_REFERENCE

INTERPRETER = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}

# The interpreter runs the whole protocol in each process; a subset of the nccl cases keeps the
# suite's time in check while covering each property once.
SYMM_CASES = [
    CASES[0],                                   # different token counts, masked slots, buffer reuse
    CASES[1],                                   # a rank with no tokens
    CASES[2],                                   # all tokens to one expert: rank 1 receives nothing
    CASES[3],                                   # bf16xbf16
    EPCase((3, 0, 8, 5), masked=0.2),           # 4 ranks
    CASES[6],                                   # K > local experts
]


@pytest.fixture(scope="module")
def symm_runs(tmp_path_factory):
    cache = {}

    def get(num_ranks: int):
        if num_ranks not in cache:
            cases = [c for c in SYMM_CASES if len(c.tokens) == num_ranks]
            workdir = tmp_path_factory.mktemp(f"symm{num_ranks}")
            try:
                cache[num_ranks] = run_ranks(_run_ep_cases, num_ranks, cases, "cpu", "symm", workdir=workdir,
                                             env=INTERPRETER)
            except AssertionError as err:
                cache[num_ranks] = err
        if isinstance(cache[num_ranks], AssertionError):
            raise cache[num_ranks]
        return cache[num_ranks]

    return get


@pytest.mark.parametrize("case", SYMM_CASES, ids=str)
def test_symm_matches_ep1(case, symm_runs, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU symm path runs in the interpreter; tests/test_gpu.py covers the GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check_against_ep1(case, symm_runs(len(case.tokens)))


# ------------------------------------------------------------------ protocol

def _repeated_calls(rank, num_ranks, group, calls):
    """Worker: several calls on one buffer with fresh inputs each time; y of each, and the epoch."""
    case = EPCase((4, 6))
    buf = megamoe.MegaMoEBuffer(8, 6, 3, 64, 32, group=group, device="cpu", backend="symm")
    local = 8 // num_ranks
    ys = []
    for call in range(calls):
        p = make_problem(case.shape, 10, seed=call)
        l1, l2 = megamoe.transform_weights(_local_weights(p.l1, rank, local), _local_weights(p.l2, rank, local))
        rows = slice(0, 4) if rank == 0 else slice(4, 10)
        megamoe.pre_dispatch(p.x[rows], p.topk_idx[rows], p.topk_weights[rows], buf)
        y = torch.full_like(p.x[rows], float("nan"))
        megamoe.mega_moe(y, l1, l2, buf)
        ys.append(y)
    buf.check_errors()
    return {"ys": ys, "epoch": int(buf.signals[-1]), "signals": buf.signals[:-1].tolist()}


def test_calls_in_a_row_use_fresh_epochs(tmp_path, monkeypatch):
    """Each call bumps the device-side epoch; every slot holds the last one; no stale result."""
    results = run_ranks(_repeated_calls, 2, 3, workdir=tmp_path, env=INTERPRETER)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for rank, result in enumerate(results):
        assert result["epoch"] == 3
        assert result["signals"] == [3] * 4
    for call in range(3):
        p = make_problem(EPCase((4, 6)).shape, 10, seed=call)
        buf = megamoe.MegaMoEBuffer(8, 10, 3, 64, 32, device="cpu")
        l1, l2 = megamoe.transform_weights(p.l1, p.l2)
        megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
        y = torch.empty_like(p.x)
        megamoe.mega_moe(y, l1, l2, buf)
        got = torch.cat([results[0]["ys"][call], results[1]["ys"][call]])
        assert torch.equal(got.view(torch.int16), y.view(torch.int16)), f"call {call}"


TIMEOUT_S = 2


def _absent_peer(rank, num_ranks, group, done_file):
    """Worker: rank 1 builds its buffer and calls only after rank 0's call timed out; both must
    raise TimeoutError, rank 0 naming the absent rank, rank 1 (late) the rank that gave up."""
    os.environ["MEGAMOE_TIMEOUT_S"] = str(TIMEOUT_S)
    buf = megamoe.MegaMoEBuffer(4, 4, 2, 64, 32, group=group, device="cpu", backend="symm")
    p = make_problem(MoEShape("m", 4, 2, 64, 32), 3, seed=0)
    l1, l2 = megamoe.transform_weights(_local_weights(p.l1, rank, 2), _local_weights(p.l2, rank, 2))
    if rank == 1:
        give_up = time.monotonic() + 120
        while not os.path.exists(done_file) and time.monotonic() < give_up:
            time.sleep(0.1)
    try:
        megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
        start = time.monotonic()
        megamoe.mega_moe(torch.empty_like(p.x), l1, l2, buf)
        seconds = time.monotonic() - start
        errors = []
        for check in (buf.check_errors, lambda: megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)):
            try:
                check()
                errors.append("no error")
            except TimeoutError as err:
                errors.append(str(err))
        return {"errors": errors, "seconds": seconds}
    finally:
        if rank == 0:
            open(done_file, "w").close()


def test_absent_peer_times_out(tmp_path):
    first, late = run_ranks(_absent_peer, 2, str(tmp_path / "done"), workdir=tmp_path, env=INTERPRETER)
    for error in first["errors"]:
        assert "rank 1 did not reach the dispatch barrier" in error and "MEGAMOE_TIMEOUT_S" in error
    # The late rank finds rank 0's slots marked aborted and stops at once.
    for error in late["errors"]:
        assert "rank 0 aborted the call at the dispatch barrier" in error
    # The timeout is real time here too (InterpreterClock): within timeout + 5 s, as on GPUs;
    # the late rank needs no timeout at all.
    assert TIMEOUT_S <= first["seconds"] < TIMEOUT_S + 5
    assert late["seconds"] < 5


def test_layout_symm():
    args = (256, 64, 6, 4096, 2048)
    ep1 = [r.name for r in buffer_layout(*args) if r.name not in ("x_rebased", "x_rebased_scales")]
    symm = {r.name: r for r in buffer_layout(*args, num_ranks=4, backend="symm")}
    assert list(symm) == ep1 + ["signals", "recv_topk", "recv_x", "recv_scales", "recv_weights"]
    assert symm["signals"].shape == (2 * 4 + 1,)
    assert symm["recv_topk"].shape == (4 * 64 * 6,)
    assert symm["recv_x"].shape == (4 * 64 * 6, 4096)
    assert symm["recv_scales"].shape == (4 * 64 * 6, 128)
    assert all(r.offset % 256 == 0 for r in symm.values())
    auto_one_node = [r.name for r in buffer_layout(*args, num_ranks=4, one_cuda_node=True)]
    assert auto_one_node == list(symm)


def test_info_command_symm(capsys):
    from megamoe.cli import main

    assert main(["info", "--ranks", "2", "--tokens", "64", "--backend", "symm"]) == 0
    out = capsys.readouterr().out
    assert "backend symm" in out and "recv_topk" in out and "send_rows" not in out


# ------------------------------------------------------------------ GPUs (device tool)

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}   # DESIGN.md section 8


def _gpu_count_or_skip(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


@pytest.mark.gpu
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_symm_on_gpus_matches_ep1(num_ranks, tmp_path):
    """The CPU cases over NVLink. Against the reference, not bitwise against EP = 1: the tile
    configs follow the rows per rank, and on the GPU the MMA shape follows the tile."""
    _gpu_count_or_skip(num_ranks)
    cases = [c for c in SYMM_CASES + CASES if len(c.tokens) == num_ranks]
    ranks = run_ranks(_run_ep_cases, num_ranks, cases, "cuda", "symm", workdir=tmp_path, backend="nccl",
                      env=NCCL_ENV)
    for case in cases:
        _check_against_ep1(case, ranks, "cuda:0", bitwise=False)


def _real_shape_rank(rank, num_ranks, group, name, token_counts):
    """Worker: a model shape on symm and nccl buffers; errors against the reference, and a CUDA
    graph of the symm call replayed on new inputs, bitwise against eager calls."""
    from megamoe.testing import MODEL_SHAPES, make_routing

    shape = MODEL_SHAPES[name]
    device = torch.device("cuda", rank)
    cap = max(token_counts)
    local = shape.num_experts // num_ranks
    full = make_problem(shape, cap * num_ranks, device=device, seed=7, masked_ratio=0.05)
    l1, l2 = megamoe.transform_weights(_local_weights(full.l1, rank, local), _local_weights(full.l2, rank, local))
    bufs = {b: megamoe.MegaMoEBuffer(shape.num_experts, cap, shape.num_topk, shape.hidden, shape.intermediate,
                                     group=group, backend=b) for b in ("symm", "nccl")}
    out = {"errors": {}, "graph_bitwise": None}
    for tokens in token_counts:
        # Every rank brings `tokens` tokens: rank r's are rows [r * cap, r * cap + tokens) of the global set.
        rows = slice(rank * cap, rank * cap + tokens)
        ref = megamoe.reference.mega_moe_reference(full.x[rows], full.topk_idx[rows], full.topk_weights[rows],
                                                   full.l1, full.l2)
        for b, buf in bufs.items():
            megamoe.pre_dispatch(full.x[rows], full.topk_idx[rows], full.topk_weights[rows], buf)
            y = torch.full_like(full.x[rows], float("nan"))
            megamoe.mega_moe(y, l1, l2, buf)
            buf.check_errors()
            out["errors"][f"{b}-{tokens}"] = relative_error(y, ref)
    # A graph of the symm call at the smallest count, replayed on fresh inputs.
    tokens = min(token_counts)
    buf = bufs["symm"]
    g = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(tokens, shape.hidden, device=device, generator=g).bfloat16()
    idx, w = make_routing(tokens, shape.num_experts, shape.num_topk, generator=g)
    y = torch.empty_like(x)
    megamoe.pre_dispatch(x, idx, w, buf)
    megamoe.mega_moe(y, l1, l2, buf)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        megamoe.pre_dispatch(x, idx, w, buf, check_expert_ids=False)
        megamoe.mega_moe(y, l1, l2, buf)
    same = True
    for step in range(5):
        x.copy_(torch.randn(tokens, shape.hidden, device=device, generator=g).bfloat16())
        new_idx, new_w = make_routing(tokens, shape.num_experts, shape.num_topk, generator=g)
        idx.copy_(new_idx)
        w.copy_(new_w)
        y.fill_(float("nan"))
        graph.replay()
        replayed = y.clone()
        megamoe.pre_dispatch(x, idx, w, buf)
        megamoe.mega_moe(y, l1, l2, buf)
        same &= torch.equal(replayed.view(torch.int16), y.view(torch.int16))
    buf.check_errors()
    out["graph_bitwise"] = bool(same)
    return out


@pytest.mark.gpu
def test_symm_model_shape_and_graph_on_gpus(tmp_path):
    _gpu_count_or_skip(2)
    ranks = run_ranks(_real_shape_rank, 2, "v4-flash", (1, 64, 600), workdir=tmp_path, backend="nccl",
                      env=NCCL_ENV, deadline_s=400)
    for rank, out in enumerate(ranks):
        for key, err in out["errors"].items():
            assert err <= LAYER_KERNEL_VS_REFERENCE, f"rank {rank} {key}: {err:.3e}"
        assert out["graph_bitwise"], f"rank {rank}"


def _ipc_release_in_steps(rank, num_ranks, group, nbytes):
    """Rank 0's storage, mapped by the other ranks over CUDA IPC on the one GPU, released by
    rank 0, then rank 1, then the rest; after each step rank 0 returns what it still holds (its
    allocated bytes above where it started, after torch.cuda.ipc_collect)."""
    import torch.distributed as dist

    from megamoe.comm.symm import SymmetricStorage

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    start = torch.cuda.memory_allocated(device)
    storage = SymmetricStorage(nbytes, group, rank, num_ranks, device, shared_device=True)
    held = []
    for releasing in ({0}, {1}, set(range(2, num_ranks))):
        if rank in releasing:
            storage = None
        torch.cuda.synchronize(device)
        dist.barrier(group)
        if rank == 0:
            torch.cuda.ipc_collect()
            held.append(torch.cuda.memory_allocated(device) - start)
        dist.barrier(group)
    assert storage is None
    return held


@pytest.mark.gpu
def test_ranks_sharing_a_gpu_keep_a_peer_mapped_until_all_release(tmp_path):
    """Every peer gets its own CUDA IPC share (docs/RELIABILITY.md finding 8): rank 0's memory
    stays allocated while ranks 2 and 3 still map it, after rank 1 released its mapping. With one
    share for all peers, rank 1's release let rank 0 free it."""
    nbytes = 32 << 20
    held = run_ranks(_ipc_release_in_steps, 4, nbytes, workdir=tmp_path, env=NCCL_ENV)[0]
    assert held[0] >= nbytes and held[1] >= nbytes, held
    assert held[2] < nbytes, held
