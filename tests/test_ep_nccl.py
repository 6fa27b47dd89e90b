"""Expert parallelism through torch.distributed (the nccl backend), on CPU gloo ranks.

Each EP case runs once on R spawned ranks (tests/gloo_ranks.py) and is compared with EP = 1 on
the same global inputs, computed in this process on the same path (Triton interpreter or plain
torch). The comparison is bitwise: every (token, slot) row goes through the same quantized
operands and per-row GEMM sums at any EP, and combine adds the slots in slot order. recv_stats
(rows per local expert) and the exchanged count matrix are integer metadata, compared exactly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import megamoe
from megamoe.buffer import buffer_layout
from megamoe.kernels.config import GemmConfig, force_config
from megamoe.testing import MoEShape, make_problem, relative_error

from gloo_ranks import run_ranks
from tolerances import LAYER_KERNEL_VS_REFERENCE

PATHS = {"interpreter": "1", "torch": "0"}   # TRITON_INTERPRET of each CPU path


@dataclass(frozen=True)
class EPCase:
    tokens: tuple[int, ...]      # tokens of each rank; R = len(tokens)
    experts: int = 8
    topk: int = 3
    hidden: int = 64
    inter: int = 32
    routing: str = "uniform"
    masked: float = 0.0
    mode: str = "fp8xfp4"
    after_full_call: bool = False  # first run a call with every rank at capacity on the same buffer

    @property
    def capacity(self) -> int:
        return max(self.tokens) + 1   # rows past T on every rank

    @property
    def shape(self) -> MoEShape:
        return MoEShape("ep", self.experts, self.topk, self.hidden, self.inter)

    def __str__(self):
        tokens = "-".join(map(str, self.tokens))
        return (f"R{len(self.tokens)}-T{tokens}-E{self.experts}-K{self.topk}-H{self.hidden}-I{self.inter}"
                f"-{self.routing}-m{self.masked}-{self.mode}{'-reuse' if self.after_full_call else ''}")


CASES = [
    EPCase((5, 11), masked=0.3, after_full_call=True),      # different token counts, masked slots
    EPCase((0, 7)),                                          # a rank with no tokens
    EPCase((6, 4), routing="one_expert"),                    # every token to expert 0: rank 1 receives nothing
    EPCase((4, 9), masked=0.2, mode="bf16xbf16"),
    EPCase((3, 0, 8, 5), masked=0.2),
    EPCase((2, 3, 1, 4), routing="one_expert"),
    EPCase((4, 2, 0, 3), experts=4, topk=2, routing="skewed"),  # K > local experts: min(K, E_l) bound
    EPCase((3, 5, 2, 6), masked=1.0),                         # every slot masked: nothing moves
]


def _global_problem(case: EPCase, seed: int = 0):
    return make_problem(case.shape, sum(case.tokens), mode=case.mode, routing=case.routing,
                        masked_ratio=case.masked, seed=seed)


def _local_weights(weights, rank: int, local: int):
    """This rank's experts of user-layout weights (a tensor, or (codes, scales) in fp8xfp4)."""
    if isinstance(weights, tuple):
        return tuple(w[rank * local:(rank + 1) * local] for w in weights)
    return weights[rank * local:(rank + 1) * local]


def _rank_slice(case: EPCase, rank: int) -> slice:
    start = sum(case.tokens[:rank])
    return slice(start, start + case.tokens[rank])


def _run_ep_cases(rank, num_ranks, group, cases, device_type="cpu", backend="nccl"):
    """Worker: every case of this rank count on one group; per case y, stats added, count matrix
    (nccl backend only)."""
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    results = {}
    for case in cases:
        local = case.experts // num_ranks
        buf = megamoe.MegaMoEBuffer(case.experts, case.capacity, case.topk, case.hidden, case.inter, group=group,
                                    mode=case.mode, device=device, backend=backend)
        assert buf.backend.name == backend and buf.rank == rank
        p = _global_problem(case).to(device)
        l1, l2 = megamoe.transform_weights(_local_weights(p.l1, rank, local), _local_weights(p.l2, rank, local),
                                           mode=case.mode)
        if case.after_full_call:
            full = make_problem(case.shape, case.capacity, mode=case.mode, seed=100 + rank).to(device)
            megamoe.pre_dispatch(full.x, full.topk_idx, full.topk_weights, buf)
            megamoe.mega_moe(torch.empty_like(full.x), l1, l2, buf)
        rows = _rank_slice(case, rank)
        megamoe.pre_dispatch(p.x[rows], p.topk_idx[rows], p.topk_weights[rows], buf)
        stats = torch.randint(0, 100, (local,), dtype=torch.int32).to(device)
        stats0 = stats.clone()
        y = torch.full_like(p.x[rows], float("nan"))
        megamoe.mega_moe(y, l1, l2, buf, recv_stats=stats)
        results[str(case)] = {"y": y.cpu(), "stats": (stats - stats0).cpu()}
        if backend == "nccl":
            results[str(case)]["count_matrix"] = buf.count_matrix.cpu()
        buf.destroy()
    return results


def _run_ep_cases_forced(rank, num_ranks, group, cases, device_type, backend, configs):
    """Worker: `_run_ep_cases` with the given tile configs forced (`config.force_config`)."""
    with force_config(**configs):
        return _run_ep_cases(rank, num_ranks, group, cases, device_type, backend)


def _ep1(case: EPCase, device="cpu"):
    """EP = 1 on the global inputs in this process: the problem, y, and rows per expert."""
    p = _global_problem(case).to(device)
    buf = megamoe.MegaMoEBuffer(case.experts, max(sum(case.tokens), 1), case.topk, case.hidden, case.inter,
                                mode=case.mode, device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2, mode=case.mode)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.full_like(p.x, float("nan"))
    stats = torch.zeros(case.experts, dtype=torch.int32, device=device)
    megamoe.mega_moe(y, l1, l2, buf, recv_stats=stats)
    return p.to("cpu"), y.cpu(), stats.cpu()


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    """(num_ranks, path) -> per-rank results of every case of that rank count, run once."""
    cache = {}

    def get(num_ranks: int, path: str):
        if (num_ranks, path) not in cache:
            cases = [c for c in CASES if len(c.tokens) == num_ranks]
            workdir = tmp_path_factory.mktemp(f"ep{num_ranks}-{path}")
            try:
                cache[num_ranks, path] = run_ranks(_run_ep_cases, num_ranks, cases, workdir=workdir,
                                                   env={"TRITON_INTERPRET": PATHS[path], "OMP_NUM_THREADS": "1"})
            except AssertionError as err:
                cache[num_ranks, path] = err   # every case of the run fails with it; none reruns it
        result = cache[num_ranks, path]
        if isinstance(result, AssertionError):
            raise result
        return result

    return get


def _check_against_ep1(case: EPCase, ranks: list, device="cpu", bitwise: bool = True) -> None:
    """Each rank's y against EP = 1 (bitwise), or else against the reference (precision contract)."""
    num_ranks = len(case.tokens)
    local = case.experts // num_ranks
    p, y1, stats1 = _ep1(case, device)
    ref = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2, mode=case.mode)
    assert relative_error(y1, ref) <= LAYER_KERNEL_VS_REFERENCE
    for rank, result in enumerate(ranks):
        got = result[str(case)]
        rows = _rank_slice(case, rank)
        if bitwise:
            assert torch.equal(got["y"].view(torch.int16), y1[rows].view(torch.int16)), f"rank {rank}"
        else:
            assert relative_error(got["y"], ref[rows]) <= LAYER_KERNEL_VS_REFERENCE, f"rank {rank}"
        assert torch.equal(got["stats"], stats1[rank * local:(rank + 1) * local]), f"rank {rank}"
        if "count_matrix" not in got:
            continue
        # count_matrix[i, j]: rows rank i sent to rank j, from the global routing.
        matrix = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
        for src in range(num_ranks):
            ids = p.topk_idx[_rank_slice(case, src)].reshape(-1)
            for dst in range(num_ranks):
                matrix[src, dst] = ((ids >= dst * local) & (ids < (dst + 1) * local)).sum()
        assert torch.equal(got["count_matrix"], matrix), f"rank {rank}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ep_matches_ep1(case, path, ep_runs, monkeypatch):
    if path == "interpreter" and torch.cuda.is_available():
        pytest.skip("this process runs compiled Triton here; the interpreter path is for CPU-only machines")
    monkeypatch.setenv("TRITON_INTERPRET", PATHS[path])
    _check_against_ep1(case, ep_runs(len(case.tokens), path))


TILES = {"prefill": dict(l1=GemmConfig(64, 32, 8, 3), l2=GemmConfig(64, 64, 8, 3)),
         "fma": dict(l1=GemmConfig(1, 32, 8, 1, k_split=2), l2=GemmConfig(2, 64, 4, 1)),
         "split": dict(l1=GemmConfig(16, 32, 4, 4, fma_mix=2), l2=GemmConfig(16, 64, 4, 4, fma_mix=1))}


@pytest.mark.parametrize("backend", ["nccl", "symm"])
@pytest.mark.parametrize("tiles", ["prefill", "fma", "split"])
def test_tile_kinds_across_ranks(tiles, backend, tmp_path, monkeypatch):
    """The prefill tiles at 2 ranks, where the received rows and `inter` are rebased per 128 of
    K in place (kernels/rebase.py; the symm backend counts its rows on the device), and the FMA
    tiles, which read the received rows (gathered in expert order by symm) one or two at a time
    (L1's with its K steps split over two groups of warps),
    and the split launches (MMA tiles, then FMA tiles, each selecting experts by row count);
    against EP = 1 with the same tiles (x rebased into x_rebased for the prefill tiles): bitwise,
    as for every case. H = 160 and I = 96 end on partial K steps. The FMA tiles' case is a
    decode batch: one-row programs are slow in the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("this process runs compiled Triton here; the GPU runs check the EP paths (megamoe bench --ep)")
    # (4, 4): rank 0's experts get 1, 2, 4 and 1 rows, rank 1's 1, 1, 5 and 1.
    tokens = {"prefill": (40, 29), "fma": (9, 5), "split": (4, 4)}[tiles]
    case = EPCase(tokens, hidden=160, inter=96, masked=0.2)
    env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    ranks = run_ranks(_run_ep_cases_forced, 2, [case], "cpu", backend, TILES[tiles], workdir=tmp_path, env=env)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with force_config(**TILES[tiles]):
        _check_against_ep1(case, ranks)


# ------------------------------------------------------------------ errors across ranks

def _disagreements(rank, num_ranks, group):
    """Worker: constructions and calls that must fail the same way on every rank."""
    def error_of(fn):
        try:
            fn()
        except ValueError as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    base = dict(num_experts=4, max_tokens_per_rank=4, num_topk=3, hidden=64, intermediate=32)

    def make(**changes):
        args = dict(base, **changes)
        return megamoe.MegaMoEBuffer(args.pop("num_experts"), args.pop("max_tokens_per_rank"), args.pop("num_topk"),
                                     args.pop("hidden"), args.pop("intermediate"), group=group, device="cpu", **args)

    errors = {
        "hidden": error_of(lambda: make(hidden=96 if rank == 1 else 64)),
        "mode": error_of(lambda: make(mode="bf16xbf16" if rank == 1 else "fp8xfp4")),
        "mma": error_of(lambda: make(mma="fp16" if rank == 1 else "fp8")),
        "invalid": error_of(lambda: make(max_tokens_per_rank="4" if rank == 1 else 4)),
        "symm": error_of(lambda: make(backend="symm")),
    }
    # Slots repeating an expert overflow the receive capacity R * C * min(K, E_l) = 16 of rank 0.
    buf = make()
    p = make_problem(MoEShape("dup", 4, 3, 64, 32), 4, seed=0)
    l1, l2 = megamoe.transform_weights(_local_weights(p.l1, rank, 2), _local_weights(p.l2, rank, 2))
    megamoe.pre_dispatch(p.x, torch.tensor([[0, 0, 1]] * 4), p.topk_weights, buf)
    errors["overflow"] = error_of(lambda: megamoe.mega_moe(torch.empty_like(p.x), l1, l2, buf))
    # The group is still usable after all of these.
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.full_like(p.x, float("nan"))
    megamoe.mega_moe(y, l1, l2, buf)
    errors["after"] = "finite" if bool(torch.isfinite(y).all()) else "not finite"
    return errors


def test_disagreeing_ranks_raise_everywhere(tmp_path):
    results = run_ranks(_disagreements, 2, workdir=tmp_path, env={"TRITON_INTERPRET": "0"})
    for rank, errors in enumerate(results):
        assert errors["hidden"].startswith("ValueError") and "hidden (rank 0: 64, rank 1: 96)" in errors["hidden"]
        assert "mode (rank 0: 'fp8xfp4', rank 1: 'bf16xbf16')" in errors["mode"]
        assert "mma (rank 0: 'fp8', rank 1: 'fp16')" in errors["mma"]
        assert "max_tokens_per_rank (rank 0: 4, rank 1: an invalid value)" in errors["invalid"]
        # The CPU symm path runs its kernels in the interpreter; this run is without it.
        assert errors["symm"].startswith("ValueError") and "TRITON_INTERPRET=1" in errors["symm"]
        assert errors["overflow"].startswith("ValueError") and "rank 0 would receive 24 rows" in errors["overflow"]
        assert errors["after"] == "finite", f"rank {rank}"


TIMEOUT_S = 2


def _missing_rank(rank, num_ranks, group, where, done_file):
    """Worker: rank 1 never reaches the collective `where`; rank 0 reports what it raised."""
    os.environ["MEGAMOE_TIMEOUT_S"] = str(TIMEOUT_S)
    if rank == 1:
        if where == "mega_moe":
            megamoe.MegaMoEBuffer(4, 4, 2, 64, 32, group=group, device="cpu")
        # Alive but absent until rank 0 is done: it must time out, not see a closed connection.
        give_up = time.monotonic() + 60
        while not os.path.exists(done_file) and time.monotonic() < give_up:
            time.sleep(0.1)
        return None
    try:
        return _time_missing_rank(group, where)
    finally:
        open(done_file, "w").close()


def _time_missing_rank(group, where):
    start = time.monotonic()
    try:
        if where == "mega_moe":
            buf = megamoe.MegaMoEBuffer(4, 4, 2, 64, 32, group=group, device="cpu")
            p = make_problem(MoEShape("m", 4, 2, 64, 32), 3, seed=0)
            l1, l2 = megamoe.transform_weights(_local_weights(p.l1, 0, 2), _local_weights(p.l2, 0, 2))
            megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
            start = time.monotonic()
            megamoe.mega_moe(torch.empty_like(p.x), l1, l2, buf)
        else:
            megamoe.MegaMoEBuffer(4, 4, 2, 64, 32, group=group, device="cpu")
    except TimeoutError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": "no error", "seconds": time.monotonic() - start}


@pytest.mark.parametrize("where", ["constructor", "mega_moe"])
def test_missing_rank_times_out(where, tmp_path):
    result = run_ranks(_missing_rank, 2, where, str(tmp_path / "rank0_done"), workdir=tmp_path,
                       env={"TRITON_INTERPRET": "0"})[0]
    assert "MEGAMOE_TIMEOUT_S" in result["error"]
    expected = "arguments of all ranks" if where == "constructor" else "all_gather of the send counts"
    assert expected in result["error"]
    # Raised by MEGAMOE_TIMEOUT_S, well before the group's own timeout (30 s) would act.
    assert TIMEOUT_S <= result["seconds"] < TIMEOUT_S + 8


# ------------------------------------------------------------------ one process

@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_nccl_backend_equals_local(one_rank_group):
    """backend="nccl" on a group of one rank runs every step (sort, pack, exchange, return)."""
    case = EPCase((13,), masked=0.2)
    p = _global_problem(case)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    bad = p.topk_idx.clone()
    bad[2, 1] = 99   # dropped and reported, as at EP = 1
    ys = []
    for group, backend in ((None, "auto"), (one_rank_group, "nccl")):
        buf = megamoe.MegaMoEBuffer(8, case.capacity, 3, 64, 32, group=group, backend=backend, device="cpu")
        megamoe.pre_dispatch(p.x, bad, p.topk_weights, buf, check_expert_ids=False)
        y = torch.full_like(p.x, float("nan"))
        megamoe.mega_moe(y, l1, l2, buf)
        with pytest.raises(ValueError, match="1 expert id"):
            buf.check_errors()
        ys.append(y)
    assert buf.backend.name == "nccl"
    assert torch.equal(ys[0].view(torch.int16), ys[1].view(torch.int16))
    # Send order: valid entries by destination (one rank here), (token, slot) order; masked last.
    flat = bad.view(-1)
    valid = (flat >= 0) & (flat < 8)
    expected = torch.cat([valid.nonzero().flatten(), (~valid).nonzero().flatten()])
    assert torch.equal(buf.send_entries[:flat.numel()], expected)
    assert buf.count_matrix.tolist() == [[int(valid.sum())]]


def test_backend_argument_checks(one_rank_group, monkeypatch):
    with pytest.raises(ValueError, match="backend: 'nccl' needs a process group"):
        megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, backend="nccl", device="cpu")
    with pytest.raises(ValueError, match="backend: expected one of"):
        megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, backend="mpi", device="cpu")
    with pytest.raises(TypeError, match="group: expected None or a torch.distributed.ProcessGroup"):
        megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, group="world", device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'symm' on the CPU runs its kernels in the Triton interpreter"):
        megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, group=one_rank_group, backend="symm", device="cpu")
    assert megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, group=one_rank_group, device="cpu").backend.name == "local"


def test_no_rendezvous_during_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, group="not even checked", device="cpu")


def test_layout():
    args = (256, 64, 6, 4096, 2048)
    staging = ["send_counts", "count_matrix", "send_entries", "send_rows", "recv_rows", "recv_expert",
               "recv_weights", "recv_scales", "recv_out"]
    ep1 = {r.name: r for r in buffer_layout(*args)}
    assert not set(staging) & set(ep1)
    # EP = 1 only: the copy of x that L1's prefill tiles read (kernels/rebase.py).
    local_only = ["x_rebased", "x_rebased_scales"]
    assert list(ep1)[-2:] == local_only
    assert ep1["x_rebased"].shape == (64, 4096) and ep1["x_rebased_scales"].shape == (64, 4096 // 32)
    assert "x_rebased" not in [r.name for r in buffer_layout(*args, mode="bf16xbf16")]
    ep8 = {r.name: r for r in buffer_layout(*args, num_ranks=8)}
    assert list(ep8) == list(ep1)[:-2] + staging
    record = 4096 + 4 * 32 + 8 + 8   # FP8 row, scale bytes, expert id, weight, padding to 16 bytes
    assert ep8["send_rows"].shape == (64 * 6, 2 * 4096)
    assert ep8["recv_rows"].shape == (8 * 64 * 6, record)
    assert ep8["recv_out"].shape == (8 * 64 * 6, 4096)
    assert ep8["recv_scales"].shape == (8 * 64 * 6, 4096 // 32)
    assert ep8["count_matrix"].shape == (8, 8)
    assert all(r.offset % 256 == 0 for r in ep8.values())
    assert ep8["recv_rows"].shape[0] == ep8["sorted_rows"].shape[0]


def test_info_command_with_ranks(capsys):
    from megamoe.cli import main

    assert main(["info", "--ranks", "4", "--tokens", "128"]) == 0
    out = capsys.readouterr().out
    assert "4 rank(s)" in out and "recv_rows" in out and "send_rows" in out


@pytest.mark.gpu
def test_ep_on_gpus_with_nccl(tmp_path):
    """The 2-rank cases through NCCL on 2 GPUs. Against the reference, not bitwise against EP = 1:
    the GEMM tile configs follow the rows per rank, and on the GPU the MMA shape follows the tile."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cases = [c for c in CASES if len(c.tokens) == 2]
    ranks = run_ranks(_run_ep_cases, 2, cases, "cuda", workdir=tmp_path, backend="nccl",
                      env={"NCCL_NVLS_ENABLE": "0"})   # DESIGN.md section 8: NVLink multicast stays off
    for case in cases:
        _check_against_ep1(case, ranks, "cuda:0", bitwise=False)


class _FakeWork:
    """A torch.distributed Work that completes `done_after_s` after it is made (None: never)."""

    def __init__(self, done_after_s):
        self.done_at = None if done_after_s is None else time.monotonic() + done_after_s

    def wait(self, timeout):
        left = timeout.total_seconds()
        if self.done_at is not None and self.done_at - time.monotonic() <= left:
            time.sleep(max(self.done_at - time.monotonic(), 0.0))
            return True
        time.sleep(left)
        return False


def test_the_waits_of_one_call_share_one_timeout(monkeypatch):
    """A collective that completes late leaves the next one only the rest of MEGAMOE_TIMEOUT_S: the
    call raises once the timeout has passed since its start, not a second timeout later (a peer
    killed inside a ring all_gather had left one survivor waiting 20.5 s with a timeout of 10)."""
    from megamoe.comm.wait import Deadline, wait_for

    monkeypatch.setenv("MEGAMOE_TIMEOUT_S", "1")
    start = time.monotonic()
    deadline = Deadline()
    wait_for(_FakeWork(0.7), "first", deadline)
    with pytest.raises(TimeoutError, match=r"second: not complete within 1 s \(MEGAMOE_TIMEOUT_S\)"):
        wait_for(_FakeWork(None), "second", deadline)
    assert 1.0 <= time.monotonic() - start < 1.5     # a bound per wait would take 1.7 s

    # Past the deadline, a collective that has completed meanwhile is still taken.
    wait_for(_FakeWork(0.0), "third", deadline)
    # Without a deadline, each wait has the whole timeout.
    start = time.monotonic()
    wait_for(_FakeWork(0.4), "fourth")
    wait_for(_FakeWork(0.4), "fifth")
    assert time.monotonic() - start >= 0.8


def test_deadline_never_hands_out_less_than_is_left(monkeypatch):
    """The process groups take timeouts in whole milliseconds and drop the rest: the deadline
    rounds up, so no wait gives up before MEGAMOE_TIMEOUT_S (a 2 s timeout had raised after
    1.999997 s)."""
    from megamoe.comm.wait import Deadline

    monkeypatch.setenv("MEGAMOE_TIMEOUT_S", "2")
    deadline = Deadline()
    for _ in range(3):
        left = deadline.remaining()
        assert left.microseconds % 1000 == 0
        assert deadline.end - time.monotonic() <= left.total_seconds() <= 2.001
