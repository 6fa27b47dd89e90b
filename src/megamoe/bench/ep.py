"""`megamoe bench --ep N`: expert parallelism on N ranks, every path per rank, in one run.

Dimension letters: T tokens per rank, C = max T, E experts, E_l = E / N local experts, K top-k,
H hidden, I intermediate, R = N ranks.

The launcher (`run_ep`) spawns N processes that meet through a fresh file store
(`file:///tmp/...`): NCCL on N GPUs (device = rank, NVLink multicast off, DESIGN.md section 8)
or gloo on the CPU. Each rank dumps its stacks and exits at the deadline; the launcher kills
every rank and raises as soon as one fails, or when the deadline passes.

Each rank owns the weights of its E_l experts (`testing.make_problem`, MXFP4, through
`transform_weights`) and, per tokens-per-rank value T, `--sets` input sets of T random BF16
tokens with uniform routing (K distinct experts of all E per token). Paths, all on the same
inputs:

    symm   MegaMoEBuffer(E, C, K, H, I, group, backend="symm"): pre_dispatch + mega_moe, timed
           as CUDA-graph replays (eagerly, with a note, if capture raises; eagerly on the CPU);
           "unavailable" on the CPU when the constructor refuses (symm wants TRITON_INTERPRET=1).
    nccl   the same with backend="nccl", eager (it reads the exchanged counts on the host).
    torch  baseline: what a PyTorch user writes (`baselines.torch_ep_moe`): exchange counts,
           all_to_all_single of BF16 rows to the experts' owners, the BF16 torch._grouped_mm
           pipeline of `megamoe bench` on the received rows, all_to_all_single back, weighted
           sum; on the same MXFP4 weights, dequantized to BF16 (exact).
    ep1    baseline: the EP = 1 time of the same per-rank work: MegaMoEBuffer(E_l, R*C*K, 1, H, I)
           with no group, one token per row this rank receives (every rank's (token, slot)
           routed to its experts): the same rows through the same experts as this rank's L1
           and L2 in the symm call; CUDA-graph replays.

Before timing, each path's y is checked (`CHECK_TOLERANCE`): on CUDA against the nccl path's
y; on the CPU against megamoe.reference on the rank's tokens and all ranks' gathered weights.
ep1 is checked against the reference on its own inputs. A path that fails on any rank is
reported FAILED and not timed. Timing: a fixed number of warm-up and timed iterations, the
same on every rank, a barrier before each timed loop, the median per call per rank.

On CUDA the run also measures peer-read bandwidth over NVLink once (symmetric memory: each
rank copies its next peer's buffer into local memory, all ranks at once) and reports, per rank:

    bytes    per call: rows received from peers x (H FP8 + H/32 scale + 4 weight bytes) to
             dispatch them, plus those rows' 2H-byte BF16 results sent back
    floor    ep1 time + bytes / peer-read bandwidth
    GB/s     bytes / symm time

Rank 0 prints a table per rank and for the slowest rank, the targets of the issue, and writes
ep<N>.json (all ranks' medians, card, date, shape, versions) into the output directory.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .. import reference
from ..buffer import MegaMoEBuffer
from ..formats import dequantize_mxfp4
from ..kernels.pre_dispatch import pre_dispatch
from ..moe import mega_moe
from ..testing import MODEL_SHAPES, MoEShape, make_problem, make_routing, relative_error
from ..weights import transform_weights
from . import baselines

DEFAULT_SHAPE = "v4-flash"
DEFAULT_TOKENS = (1, 8, 64, 128, 512, 4096)
BACKENDS = ("symm", "nccl")
"""MegaMoEBuffer backends `--backends` may name."""
DEFAULT_BACKENDS = BACKENDS
BASELINES = ("torch", "ep1")
"""Baselines `--baselines` may name."""
DEFAULT_BASELINES = BASELINES
PATHS = BACKENDS + BASELINES
DEFAULT_WARMUP = 5
DEFAULT_ITERS = 20
DEFAULT_SETS = 4
DEFAULT_DEADLINE_S = 450.0
"""Most seconds a whole run may take: under the device tool's 600 s, with room for a `timeout 500`."""

RANK_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
"""NVLink multicast stays off (DESIGN.md section 8); set in every rank before the group exists."""

CHECK_TOLERANCE = {"symm": 1e-2, "nccl": 1e-2, "ep1": 1e-2, "torch": 0.1}
"""Relative Frobenius error a path's y may have against its check (tests/tolerances.py):
fused paths against the float64 reference: LAYER_CONTRACT (1e-2); symm against nccl on CUDA:
each is within LAYER_KERNEL_VS_REFERENCE (5e-3) of the reference, so 1e-2 apart at most.
torch: BF16 activations on the same (dequantized) weights, so it misses our two FP8 activation
roundings (FP8_REFERENCE_VS_DEQUANTIZED, 8e-2; measured about 4.7e-2) and adds its own BF16
roundings (about 4e-3) and, against nccl, the kernels' 5e-3: 0.1."""
CHECK_TOKENS = 16
"""Tokens of the checked set that the float64 reference recomputes for the ep1 check (K times as
many rows there, one token each; it loops over the experts in float64, so a whole 4096-token
set would take long)."""

SPEEDUP_TARGETS = ((1, 128, 1.5), (4096, 4096, 1.1))
"""(min T, max T, nccl time / symm time at least): the issue's targets."""
FLOOR_TARGET = 1.3
"""symm time at most this many times the floor (ep1 time + NVLink time of the bytes moved)."""

NVLINK_BYTES = 1 << 28
"""Bytes of the peer-read measurement: 256 MiB, about 0.7 ms at 370 GB/s, bandwidth bound."""
NVLINK_WARMUP, NVLINK_ITERS = 3, 10


@dataclass(frozen=True)
class EPBenchConfig:
    """What `megamoe bench --ep N` runs; `check_config` validates it."""

    num_ranks: int
    shape: MoEShape
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    device_type: str = "cuda"
    warmup: int = DEFAULT_WARMUP
    iters: int = DEFAULT_ITERS
    sets: int = DEFAULT_SETS
    check: bool = True
    out_dir: str = "bench_out"
    deadline_s: float = DEFAULT_DEADLINE_S

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in PATHS if p in self.backends + self.baselines)


def _check_names(flag: str, names, allowed) -> None:
    names = tuple(names)
    unknown = [n for n in names if n not in allowed]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"{flag}: expected distinct names among {','.join(allowed)}, got {','.join(names)!r}")


def check_config(cfg: EPBenchConfig) -> None:
    """Raise ValueError naming the command-line flag of the first invalid setting."""
    if isinstance(cfg.num_ranks, bool) or not isinstance(cfg.num_ranks, int) or cfg.num_ranks < 2:
        raise ValueError(f"--ep: expected a rank count >= 2 (EP = 1 is `megamoe bench` without --ep), "
                         f"got {cfg.num_ranks!r}")
    if cfg.device_type not in ("cuda", "cpu"):
        raise ValueError(f"--device: expected cuda or cpu, got {cfg.device_type!r}")
    if cfg.device_type == "cuda" and torch.cuda.device_count() < cfg.num_ranks:
        raise ValueError(f"--ep: {cfg.num_ranks} ranks need {cfg.num_ranks} CUDA devices, "
                         f"found {torch.cuda.device_count()} (use --device cpu for gloo ranks on the CPU)")
    shape = cfg.shape
    if shape.num_experts % cfg.num_ranks:
        raise ValueError(f"--ep: the {shape.name} shape's {shape.num_experts} experts do not split evenly "
                         f"over {cfg.num_ranks} ranks")
    if not cfg.tokens or any(isinstance(t, bool) or not isinstance(t, int) or t <= 0 for t in cfg.tokens):
        raise ValueError(f"--tokens: expected positive token counts per rank, got {cfg.tokens!r}")
    _check_names("--backends", cfg.backends, BACKENDS)
    _check_names("--baselines", cfg.baselines, BASELINES)
    if not cfg.paths:
        raise ValueError("--backends, --baselines: nothing to time")
    for flag, value, low in (("--warmup", cfg.warmup, 0), ("--iters", cfg.iters, 1), ("--sets", cfg.sets, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag}: expected an integer >= {low}, got {value!r}")
    if not cfg.deadline_s > 0:
        raise ValueError(f"--deadline: expected a positive number of seconds, got {cfg.deadline_s!r}")


# ------------------------------------------------------------------ launcher

def run_ep(cfg: EPBenchConfig) -> dict:
    """Run the benchmark on cfg.num_ranks spawned ranks; return what rank 0 wrote to ep<N>.json.

    Raises RuntimeError, with every failed rank's traceback, when a rank fails or the run
    passes cfg.deadline_s (all ranks are killed first).
    """
    check_config(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    out_file = Path(cfg.out_dir) / f"ep{cfg.num_ranks}.json"
    if out_file.exists():
        out_file.unlink()
    workdir = Path(tempfile.mkdtemp(prefix="megamoe-ep-", dir="/tmp"))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(rank, cfg, str(workdir), os.getpid()), daemon=True)
             for rank in range(cfg.num_ranks)]
    try:
        for p in procs:
            p.start()
        failure = _wait_for_ranks(procs, cfg.deadline_s + 15)
        if failure:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join()
            errors = [f"rank {r}:\n{(workdir / f'rank{r}.err').read_text()}"
                      for r in range(cfg.num_ranks) if (workdir / f"rank{r}.err").exists()]
            raise RuntimeError(f"megamoe bench --ep {cfg.num_ranks}: {failure}; all ranks killed"
                               + ("\n" + "\n".join(errors) if errors else " (their stderr has the stacks)"))
        with open(out_file) as f:
            return json.load(f)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_ranks(procs, deadline_s: float) -> str | None:
    """None once every rank exited cleanly; else what went wrong (the first rank to fail)."""
    end = time.monotonic() + deadline_s
    while True:
        codes = [p.exitcode for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            return f"rank {failed[0]} exited with code {codes[failed[0]]}"
        if all(c == 0 for c in codes):
            return None
        if time.monotonic() > end:
            return f"still running after {deadline_s:.0f} s"
        time.sleep(0.1)


def _exit_with_parent(parent_pid: int) -> None:
    # A launcher killed from outside (`timeout`, the device tool) must not leave ranks behind.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _rank_main(rank: int, cfg: EPBenchConfig, workdir: str, parent_pid: int) -> None:
    os.environ.update(RANK_ENVIRONMENT)
    faulthandler.dump_traceback_later(cfg.deadline_s, exit=True)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        if cfg.device_type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            # The ranks share the cores: an equal share each keeps them from starving one another.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.num_ranks))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=cfg.num_ranks,
                                timeout=timedelta(seconds=cfg.deadline_s),
                                device_id=device if device.type == "cuda" else None)
        _bench_rank(rank, cfg, dist.group.WORLD, device)
        _barrier(dist.group.WORLD, device)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the launcher reports it and kills the other ranks
        Path(workdir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ collectives and timing

def _barrier(group, device) -> None:
    dist.barrier(group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _agree(ok: bool, group, device) -> bool:
    """True on every rank when `ok` is true on every rank (control flow stays in step)."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _all_gather_cat(t: torch.Tensor, group, num_ranks: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(num_ranks)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _timed_loop(step, iters: int, group, device) -> list[float]:
    """Microseconds of each of `iters` calls of step(i), after a barrier."""
    _barrier(group, device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (start, end) in enumerate(events):
            start.record()
            step(i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) * 1e3 for start, end in events]
    times = []
    for i in range(iters):
        start = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def _time_eager(calls, cfg: EPBenchConfig, group, device) -> float:
    """Median us per call; iteration i runs calls[i % len(calls)] (rotating input sets)."""
    for i in range(cfg.warmup):
        calls[i % len(calls)]()
    return statistics.median(_timed_loop(lambda i: calls[i % len(calls)](), cfg.iters, group, device))


def _capture(calls, group, device):
    """A CUDA graph of every call in turn, or (None, why) if capture raised on any rank."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm the allocator outside capture
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph, why = torch.cuda.CUDAGraph(), ""
    try:
        with torch.cuda.graph(graph):
            for call in calls:
                call()
    except Exception as exc:  # noqa: BLE001 - reported, and the path is timed eagerly instead
        graph, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if not _agree(graph is not None, group, device):
        return None, why or "capture raised on another rank"
    return graph, ""


def _time_graph(calls, cfg: EPBenchConfig, group, device, label: str, notes: list[str]) -> tuple[float, str]:
    """Median us per call over CUDA-graph replays of all calls; eager if capture raises."""
    graph, why = _capture(calls, group, device)
    if graph is None:
        notes.append(f"{label}: CUDA-graph capture failed ({why}); timed eagerly")
        return _time_eager(calls, cfg, group, device), "eager"
    for _ in range(cfg.warmup):
        graph.replay()
    times = _timed_loop(lambda i: graph.replay(), cfg.iters, group, device)
    return statistics.median(times) / len(calls), "cuda-graph"


# ------------------------------------------------------------------ NVLink

def measure_peer_read(group, rank: int, num_ranks: int, device) -> dict:
    """GB/s of this rank reading its next peer's symmetric buffer into local memory.

    Every rank reads at once (as in a dispatch). "copy": Tensor.copy_ (copy engine); "sm":
    an elementwise kernel that loads the peer's memory (how Triton kernels pull rows). The
    first bytes read are checked against what the peer wrote.
    """
    from torch.distributed import _symmetric_memory as symm_mem

    peer = (rank + 1) % num_ranks
    local = symm_mem.empty(NVLINK_BYTES, dtype=torch.uint8, device=device)
    local.fill_(rank + 1)
    torch.cuda.synchronize(device)
    handle = symm_mem.rendezvous(local, group)
    remote = handle.get_buffer(peer, (NVLINK_BYTES,), torch.uint8)
    dst = torch.empty_like(remote)
    result = {"peer": peer, "bytes": NVLINK_BYTES}
    kernels = {"copy": lambda: dst.copy_(remote),
               "sm": lambda: torch.bitwise_or(remote.view(torch.int64), 0, out=dst.view(torch.int64))}
    for name, kernel in kernels.items():
        for _ in range(NVLINK_WARMUP):
            kernel()
        us = statistics.median(_timed_loop(lambda i: kernel(), NVLINK_ITERS, group, device))
        if not bool((dst[:4096] == peer + 1).all()):
            raise RuntimeError(f"peer read ({name}) from rank {peer}: the bytes read are not the ones it wrote")
        result[f"{name}_gbps"] = NVLINK_BYTES / us / 1e3
    _barrier(group, device)  # no rank frees its buffer (on return) while a peer still reads it
    result["gbps"] = max(result["copy_gbps"], result["sm_gbps"])
    return result


# ------------------------------------------------------------------ one rank

@dataclass
class _InputSet:
    x: torch.Tensor              # [T, H] bfloat16
    topk_idx: torch.Tensor       # [T, K] int64 global expert ids
    topk_weights: torch.Tensor   # [T, K] float32
    local_x: torch.Tensor        # [N, H] the N rows this rank receives, one token each (the ep1 work)
    local_idx: torch.Tensor      # [N, 1] int64 their experts among the E_l local ones
    local_weights: torch.Tensor  # [N, 1] float32
    y: dict = field(default_factory=dict)   # path -> [T, H] bfloat16


@dataclass
class _Rank:
    """One rank's weights, buffers and process group."""

    cfg: EPBenchConfig
    rank: int
    group: object
    device: torch.device
    l1_user: tuple               # this rank's E_l experts, user layout (uint8 codes, uint8 scales)
    l2_user: tuple
    l1: object                   # the same through transform_weights
    l2: object
    w1: torch.Tensor | None      # [E_l, 2I, H] bfloat16 dequantized (torch baseline)
    w2: torch.Tensor | None      # [E_l, H, I]
    buffers: dict                # path -> MegaMoEBuffer
    grouped: bool                # torch._grouped_mm runs here (else the per-expert loop)

    @property
    def num_local(self) -> int:
        return self.cfg.shape.num_experts // self.cfg.num_ranks


def _dequantized_bf16(weights, out: torch.Tensor) -> torch.Tensor:
    """MXFP4 user-layout weights to BF16 (exact), into `out`, one expert at a time."""
    codes, scales = weights
    for expert in range(codes.shape[0]):
        out[expert] = dequantize_mxfp4(codes[expert], scales[expert]).bfloat16()
    return out


def _grouped_mm_runs(device) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(4, 32, dtype=torch.bfloat16, device=device)
        b = torch.ones(2, 32, 32, dtype=torch.bfloat16, device=device)
        torch._grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _build_rank(rank: int, cfg: EPBenchConfig, group, device, status: dict, notes: list[str]) -> _Rank:
    shape, num_local = cfg.shape, cfg.shape.num_experts // cfg.num_ranks
    capacity = max(cfg.tokens)
    problem = make_problem(shape, 0, num_experts=num_local, seed=1000 + rank, device=device)
    l1, l2 = transform_weights(problem.l1, problem.l2)
    w1 = w2 = None
    if "torch" in cfg.paths:  # the BF16 originals' memory holds the exact dequantized values
        w1, w2 = _dequantized_bf16(problem.l1, problem.w1), _dequantized_bf16(problem.l2, problem.w2)
    grouped = _grouped_mm_runs(device)
    if "torch" in cfg.paths and not grouped:
        notes.append(f"torch: torch._grouped_mm does not run on {device.type} here; "
                     "the torch baseline uses a per-expert matmul loop")
    buffers = {}
    oracle = cfg.check and device.type == "cuda" and "nccl" not in cfg.backends
    for backend in BACKENDS:
        if backend not in cfg.backends and not (backend == "nccl" and oracle):
            continue
        why = ""
        try:
            buffers[backend] = MegaMoEBuffer(shape.num_experts, capacity, shape.num_topk, shape.hidden,
                                             shape.intermediate, group=group, backend=backend, device=device)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot be built is reported, the others run
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if not _agree(not why, group, device):
            # On the CPU a backend may refuse its setting (symm wants the Triton interpreter); on
            # GPUs a constructor that raises is a failure.
            status[backend] = "unavailable" if device.type == "cpu" else "FAILED"
            notes.append(f"{backend}: MegaMoEBuffer(..., backend={backend!r}) raised {why or 'on another rank'}")
            buffers.pop(backend, None)
    if "ep1" in cfg.paths:   # one token per received row (received_work)
        buffers["ep1"] = MegaMoEBuffer(num_local, cfg.num_ranks * capacity * shape.num_topk, 1, shape.hidden,
                                       shape.intermediate, device=device)
    return _Rank(cfg, rank, group, device, problem.l1, problem.l2, l1, l2, w1, w2, buffers, grouped)


def _make_sets(r: _Rank, tokens: int) -> list[_InputSet]:
    shape = r.cfg.shape
    g = torch.Generator(device=r.device).manual_seed(7919 * tokens + 104729 * r.rank + 1)
    sets = []
    for _ in range(r.cfg.sets):
        x = torch.randn(tokens, shape.hidden, generator=g, device=r.device).bfloat16()
        idx, w = make_routing(tokens, shape.num_experts, shape.num_topk, "uniform", generator=g)
        sets.append(_InputSet(x, idx, w, *received_work(x, idx, w, r.group, r.rank, r.cfg.num_ranks, r.num_local)))
    return sets


def received_work(x, topk_idx, topk_weights, group, rank: int, num_ranks: int, num_local: int):
    """(x [N, H], ids [N, 1], weights [N, 1]) of the EP = 1 call that does this rank's share of
    the EP call: one token per (token, slot) of any rank routed to this rank's experts.

    Its L1 and L2 get the same rows of the same experts as this rank's do in the EP call, and
    pick their tiles from the same row count. (At one token per rank the experts a rank
    receives vary from call to call, and with them the GEMMs' waves of tiles: a statistically
    similar EP = 1 input would not be the same work.)
    """
    all_x = _all_gather_cat(x, group, num_ranks)
    all_idx = _all_gather_cat(topk_idx, group, num_ranks)
    all_w = _all_gather_cat(topk_weights, group, num_ranks)
    first = rank * num_local
    token, slot = torch.nonzero((all_idx >= first) & (all_idx < first + num_local), as_tuple=True)
    return all_x[token], (all_idx[token, slot] - first).unsqueeze(1), all_w[token, slot].unsqueeze(1)


def _call(r: _Rank, path: str, s: _InputSet):
    """A closure running `path` once on input set s, writing s.y[path]."""
    if path == "torch":
        def run():
            s.y["torch"] = baselines.torch_ep_moe(s.x, s.topk_idx, s.topk_weights, r.w1, r.w2, r.group,
                                                  grouped=r.grouped)
        return run
    buf = r.buffers[path]
    x, idx, w = (s.local_x, s.local_idx, s.local_weights) if path == "ep1" else (s.x, s.topk_idx, s.topk_weights)
    y = s.y.setdefault(path, torch.empty_like(x))

    def run():
        pre_dispatch(x, idx, w, buf)
        mega_moe(y, r.l1, r.l2, buf)
    return run


def _check_paths(r: _Rank, paths, s: _InputSet, global_weights) -> dict:
    """Run each path once on s; its relative error against its check (None: not checked)."""
    errors = {}
    if r.device.type == "cpu":
        oracle = reference.mega_moe_reference(s.x, s.topk_idx, s.topk_weights, *global_weights)
    elif "nccl" in r.buffers:   # built for this whenever checking on CUDA, unless its construction failed
        _call(r, "nccl", s)()
        oracle = s.y["nccl"]
    else:
        oracle = None
    for path in paths:
        if path == "nccl" and r.device.type == "cuda":   # the oracle itself: only finite
            errors[path] = None if bool(torch.isfinite(oracle).all()) else math.inf
            continue
        _call(r, path, s)()
        if path == "ep1":
            # One row per token here: as many rows as CHECK_TOKENS tokens of K slots, so that one
            # rare rounding event (a UE8M0 scale one step up) weighs as much as in the layer checks.
            n = min(CHECK_TOKENS * r.cfg.shape.num_topk, s.local_x.shape[0])
            ref = reference.mega_moe_reference(s.local_x[:n], s.local_idx[:n], s.local_weights[:n], r.l1_user,
                                               r.l2_user)
            errors[path] = relative_error(s.y[path][:n], ref)
        else:   # None: not checked (no nccl result to compare with)
            errors[path] = None if oracle is None else relative_error(s.y[path], oracle)
    return errors


def _bytes_moved(r: _Rank, sets: list[_InputSet]) -> tuple[float, float]:
    """(rows received from peers, bytes moved) per call for this rank, averaged over the sets."""
    shape, num_ranks = r.cfg.shape, r.cfg.num_ranks
    received = 0
    for s in sets:
        flat = s.topk_idx.reshape(-1)
        dest = torch.where(flat >= 0, flat // r.num_local, num_ranks)
        counts = torch.zeros(num_ranks + 1, dtype=torch.int64, device=r.device)
        counts.scatter_add_(0, dest, torch.ones_like(dest))
        matrix = _all_gather_cat(counts[:num_ranks].unsqueeze(0), r.group, num_ranks)   # [src, dst]
        received += int(matrix[:, r.rank].sum() - matrix[r.rank, r.rank])
    rows = received / len(sets)
    h = shape.hidden
    return rows, rows * (h + h // 32 + 4 + 2 * h)


def _bench_rank(rank: int, cfg: EPBenchConfig, group, device) -> None:
    num_ranks = cfg.num_ranks
    notes: list[str] = []
    status = {p: "ok" for p in cfg.paths}
    nvlink = None
    if device.type == "cuda":
        why = ""
        try:
            nvlink = measure_peer_read(group, rank, num_ranks, device)
        except Exception as exc:  # noqa: BLE001 - reported; the floor is then unknown
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if not _agree(not why, group, device):
            notes.append(f"NVLink peer read failed ({why or 'on another rank'}); no floor")
            nvlink = None
    r = _build_rank(rank, cfg, group, device, status, notes)
    global_weights = None
    if cfg.check and device.type == "cpu":
        global_weights = tuple(tuple(_all_gather_cat(t, group, num_ranks) for t in w) for w in (r.l1_user, r.l2_user))
    meta = _gather_to_rank0(rank, num_ranks, {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                 platform.machine()),
        "nvlink": nvlink, "notes": notes})
    report = _Report(cfg, meta) if rank == 0 else None
    for tokens in cfg.tokens:
        sets = _make_sets(r, tokens)
        row = {"tokens": tokens, "rank": rank, "status": {}, "rel_err": {}, "method": {}, "notes": [],
               **{f"{path}_us": None for path in PATHS}}
        runnable = [p for p in cfg.paths if status[p] == "ok"]
        if cfg.check:
            errors = _check_paths(r, runnable, sets[0], global_weights)
            row["rel_err"] = errors
            for path in runnable:
                err = errors[path]
                if not _agree(err is None or err <= CHECK_TOLERANCE[path], group, device):
                    row["status"][path] = "FAILED"
        for path in cfg.paths:
            row["status"].setdefault(path, status[path] if path not in runnable else "ok")
            if row["status"][path] != "ok":
                continue
            calls = [_call(r, path, s) for s in sets]
            if device.type == "cuda" and path in ("symm", "ep1"):
                row[f"{path}_us"], row["method"][path] = _time_graph(calls, cfg, group, device, path, row["notes"])
            else:
                row[f"{path}_us"], row["method"][path] = _time_eager(calls, cfg, group, device), "eager"
        row["recv_rows_from_peers"], row["bytes_moved"] = _bytes_moved(r, sets)
        _derive(row, nvlink)
        rows = _gather_to_rank0(rank, num_ranks, row)
        if report is not None:
            report.add(tokens, rows)
        del sets
    if report is not None:
        report.finish()
    for buf in r.buffers.values():
        buf.destroy()


def _derive(row: dict, nvlink: dict | None) -> None:
    """The floor, ratios and GB/s of one rank's row."""
    symm, nccl, ep1, nbytes = row.get("symm_us"), row.get("nccl_us"), row.get("ep1_us"), row["bytes_moved"]
    row["nvlink_gbps"] = nvlink["gbps"] if nvlink else None
    row["floor_us"] = ep1 + nbytes / nvlink["gbps"] / 1e3 if nvlink and ep1 else None
    row["symm_vs_nccl"] = nccl / symm if symm and nccl else None
    row["symm_over_floor"] = symm / row["floor_us"] if symm and row["floor_us"] else None
    row["symm_gbps"] = nbytes / symm / 1e3 if symm else None
    row["nccl_gbps"] = nbytes / nccl / 1e3 if nccl else None


def _gather_to_rank0(rank: int, num_ranks: int, obj) -> list | None:
    out = [None] * num_ranks if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ------------------------------------------------------------------ report (rank 0)

def _cell(row: dict, path: str) -> str:
    status = row["status"].get(path)
    if status is None:
        return "-"
    if status != "ok":
        return {"unavailable": "n/a"}.get(status, status)
    value = row.get(f"{path}_us")
    return "-" if value is None else f"{value:.1f}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = (f"{'tokens':>7}{'rank':>6}{'symm us':>10}{'nccl us':>10}{'torch us':>10}{'ep1 us':>10}"
                f"{'nccl/symm':>11}{'floor us':>10}{'symm/floor':>12}{'GB/s':>8}")


def format_row(row: dict, rank_label=None) -> str:
    rank = row["rank"] if rank_label is None else rank_label
    return (f"{row['tokens']:>7}{rank:>6}{_cell(row, 'symm'):>10}{_cell(row, 'nccl'):>10}"
            f"{_cell(row, 'torch'):>10}{_cell(row, 'ep1'):>10}{_fmt(row['symm_vs_nccl'], '.2f'):>11}"
            f"{_fmt(row['floor_us'], '.1f'):>10}{_fmt(row['symm_over_floor'], '.2f'):>12}"
            f"{_fmt(row['symm_gbps'], '.0f'):>8}")


def _slowest(rows: list[dict]) -> dict:
    """One call of a collective path lasts as long as its slowest rank: max over ranks."""
    def worst(key):
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else max(values)

    summary = {"tokens": rows[0]["tokens"], "rank": "max", "notes": [],
               "status": {p: next((r["status"][p] for r in rows if r["status"][p] != "ok"), "ok")
                          for p in rows[0]["status"]}}
    for key in ("symm_us", "nccl_us", "torch_us", "ep1_us", "floor_us", "bytes_moved"):
        summary[key] = worst(key)
    symm, nccl, floor = summary["symm_us"], summary["nccl_us"], summary["floor_us"]
    summary["symm_vs_nccl"] = nccl / symm if symm and nccl else None
    summary["symm_over_floor"] = symm / floor if symm and floor else None
    summary["symm_gbps"] = summary["bytes_moved"] / symm / 1e3 if symm and summary["bytes_moved"] else None
    return summary


def _targets(summary: dict) -> list[dict]:
    out = []
    tokens = summary["tokens"]
    for low, high, goal in SPEEDUP_TARGETS:
        if low <= tokens <= high:
            value = summary["symm_vs_nccl"]
            out.append({"tokens": tokens, "what": "nccl time / symm time", "goal": f">= {goal}", "value": value,
                        "met": None if value is None else value >= goal})
    value = summary["symm_over_floor"]
    out.append({"tokens": tokens, "what": "symm time / floor", "goal": f"<= {FLOOR_TARGET}", "value": value,
                "met": None if value is None else value <= FLOOR_TARGET})
    return out


class _Report:
    """Rank 0's table and JSON, rewritten after every token count (a run cut short keeps its rows)."""

    def __init__(self, cfg: EPBenchConfig, meta: list[dict]):
        self.cfg = cfg
        self.path = Path(cfg.out_dir) / f"ep{cfg.num_ranks}.json"
        cards = [m["card"] for m in meta]
        notes = list(dict.fromkeys(n for m in meta for n in m["notes"]))
        triton_version = sys.modules["triton"].__version__ if "triton" in sys.modules else None
        self.data = {
            "benchmark": f"megamoe bench --ep {cfg.num_ranks}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "card": cards[0], "cards": cards, "device": cfg.device_type, "num_ranks": cfg.num_ranks,
            "shape": asdict(cfg.shape), "mode": "fp8xfp4", "routing": "uniform",
            "tokens": list(cfg.tokens), "paths": list(cfg.paths),
            "warmup": cfg.warmup, "iters": cfg.iters, "sets": cfg.sets, "check_tolerance": CHECK_TOLERANCE,
            "torch": torch.__version__, "triton": triton_version,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            "nvlink": [m["nvlink"] for m in meta], "notes": notes,
            "rows": [], "summary": [], "targets": [], "complete": False,
        }
        shape = cfg.shape
        print(f"megamoe bench --ep {cfg.num_ranks} on {cards[0]} ({cfg.device_type}), {self.data['date']}: "
              f"{shape.name} (E={shape.num_experts}, K={shape.num_topk}, H={shape.hidden}, I={shape.intermediate}), "
              f"E/rank={shape.num_experts // cfg.num_ranks}, uniform routing, {cfg.sets} input sets, "
              f"{cfg.warmup} warm-up + {cfg.iters} timed iterations per path, medians", flush=True)
        for rank, m in enumerate(meta):
            if m["nvlink"]:
                nv = m["nvlink"]
                print(f"rank {rank}: reads rank {nv['peer']} over NVLink at {nv['copy_gbps']:.0f} GB/s (copy_), "
                      f"{nv['sm_gbps']:.0f} GB/s (SM loads)", flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
        print(TABLE_HEADER, flush=True)
        self._write()

    def add(self, tokens: int, rows: list[dict]) -> None:
        summary = _slowest(rows)
        self.data["rows"] += rows
        self.data["summary"].append(summary)
        self.data["targets"] += _targets(summary)
        for row in rows:
            print(format_row(row), flush=True)
        print(format_row(summary), flush=True)
        for row in rows:
            for path, status in row["status"].items():
                if status == "FAILED":
                    print(f"  rank {row['rank']}: {path} FAILED its check: relative error "
                          f"{row['rel_err'].get(path)} > {CHECK_TOLERANCE[path]}", flush=True)
            for note in row["notes"]:
                print(f"  rank {row['rank']}: {note}", flush=True)
        self._write()

    def finish(self) -> None:
        self.data["complete"] = True
        self._write()
        print("targets (slowest rank)" + (": a CPU run, for the record only; the targets are for GPUs"
                                           if self.cfg.device_type == "cpu" else ":"))
        for t in self.data["targets"]:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            print(f"  T={t['tokens']:>5}: {t['what']} {_fmt(t['value'], '.2f')} (goal {t['goal']}): {verdict}")
        print(f"wrote {self.path}", flush=True)

    def _write(self) -> None:
        tmp = self.path.with_suffix(".json.part")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def failed_paths(result: dict) -> list[str]:
    """'path at T tokens on rank r' for every path that failed its check in a run's JSON."""
    return [f"{path} at {row['tokens']} tokens on rank {row['rank']}"
            for row in result["rows"] for path, status in row["status"].items() if status == "FAILED"]


def config_from_names(num_ranks: int, shape: str, **kwargs) -> EPBenchConfig:
    """An EPBenchConfig with the shape given by name (MODEL_SHAPES)."""
    if shape not in MODEL_SHAPES:
        raise ValueError(f"--shapes: expected one of {','.join(sorted(MODEL_SHAPES))}, got {shape!r}")
    return EPBenchConfig(num_ranks, MODEL_SHAPES[shape], **kwargs)
