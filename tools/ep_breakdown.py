"""Where the time of one symm-backend call goes at EP = N, next to EP = 1 of the same per-rank work (GPUs).

Times CUDA-graph replays of growing prefixes of the call on N GPUs (pre_dispatch; + dispatch
barrier; + plan; + gather; + l1; + l2; + combine barrier; + combine: `SymmBackend.steps`) and
reports each stage as the difference (METHOD.md's "time variants that leave one stage out"),
then the same for the EP = 1 call of the same rows through the same experts (`megamoe bench
--ep`'s ep1: one token per row the rank receives). Every rank replays the same
prefix the same fixed number of times. Medians of the slowest rank, microseconds.

    PYTHONPATH=src timeout 300 python tools/ep_breakdown.py --ranks 2 --tokens 1,8 --variants default,nocap

Variants change one thing for the symm call: `nocap` drops the persistent L1 and L2 register caps;
`sm8` gives the persistent L1/L2 8 programs an SM instead of the ones that fit at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import megamoe
from megamoe import experts
from megamoe.bench.ep import RANK_ENVIRONMENT, _barrier, _capture, _timed_loop, received_work
from megamoe.experts import ExpertOptions
from megamoe.testing import MODEL_SHAPES, make_problem, make_routing

WARMUP, ITERS, SETS = 5, 30, 4


@contextmanager
def variant(name: str):
    saved = experts.PERSISTENT_MAXNREG, experts._resident_programs
    if name == "nocap":
        experts.PERSISTENT_MAXNREG = {}
    if name == "sm8":
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        experts._resident_programs = lambda kernel, args, kwargs: 8 * sms
    try:
        yield
    finally:
        experts.PERSISTENT_MAXNREG, experts._resident_programs = saved


def prefix_times(sets, buf, steps_of, group, device) -> list[tuple[str, float]]:
    """[(stage, us)]: the graph time of each growing prefix minus the one before."""
    names = ["pre_dispatch"] + [name for name, _ in steps_of(sets[0])]
    cumulative = []
    for upto in range(len(names)):
        calls = []
        for s in sets:
            steps = steps_of(s)

            def call(s=s, steps=steps, upto=upto):
                megamoe.pre_dispatch(s["x"], s["idx"], s["w"], buf)
                for _, step in steps[:upto]:
                    step()
            calls.append(call)
        graph, why = _capture(calls, group, device)
        if graph is None:
            raise RuntimeError(f"capture failed: {why}")
        for _ in range(WARMUP):
            graph.replay()
        times = _timed_loop(lambda i: graph.replay(), ITERS, group, device)
        t = torch.tensor([statistics.median(times) / len(sets)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        cumulative.append(t.item())
    return list(zip(names, [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]))


def rank_main(rank: int, args, workdir: str):
    os.environ.update(RANK_ENVIRONMENT)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{workdir}/rendezvous", rank=rank,
                            world_size=args.ranks, timeout=timedelta(seconds=120), device_id=device)
    group = dist.group.WORLD
    shape = MODEL_SHAPES[args.shape]
    num_local, k = shape.num_experts // args.ranks, shape.num_topk
    problem = make_problem(shape, 0, num_experts=num_local, seed=1000 + rank, device=device)
    l1, l2 = megamoe.transform_weights(problem.l1, problem.l2)
    symm = megamoe.MegaMoEBuffer(shape.num_experts, args.capacity, k, shape.hidden, shape.intermediate,
                                 group=group, backend="symm", device=device)
    ep1 = megamoe.MegaMoEBuffer(num_local, args.ranks * args.capacity * k, 1, shape.hidden, shape.intermediate,
                                device=device)
    g = torch.Generator(device=device).manual_seed(17 + rank)
    rows = []
    for tokens in args.tokens:
        sets = []
        for _ in range(SETS):
            x = torch.randn(tokens, shape.hidden, generator=g, device=device).bfloat16()
            idx, w = make_routing(tokens, shape.num_experts, k, generator=g)
            local_x, local_idx, local_w = received_work(x, idx, w, group, rank, args.ranks, num_local)
            sets.append(dict(x=x, idx=idx, w=w, y=torch.empty_like(x)))
            sets.append(dict(x=local_x, idx=local_idx, w=local_w, y=torch.empty_like(local_x), local=True))
        symm_sets = [s for s in sets if not s.get("local")]
        ep1_sets = [s for s in sets if s.get("local")]
        for name in args.variants:
            with variant(name):
                stages = prefix_times(symm_sets, symm, lambda s: symm.backend.steps(
                    s["y"], l1, l2, symm, ExpertOptions(), None), group, device)
            rows.append((tokens, f"symm/{name}", stages))
        rows.append((tokens, "ep1", prefix_times(ep1_sets, ep1, lambda s: ep1.backend.steps(
            s["y"], l1, l2, ep1, ExpertOptions(), None), group, device)))
    _barrier(group, device)
    if rank == 0:
        print(f"{torch.cuda.get_device_name(device)}, {args.ranks} ranks, {args.shape}, C = {args.capacity}, "
              f"graph replays, slowest rank, us")
        for tokens, label, stages in rows:
            total = sum(us for _, us in stages)
            print(f"T={tokens:<5} {label:<14} total {total:8.1f}  " + "  ".join(f"{n} {us:.1f}" for n, us in stages))
    symm.destroy()
    ep1.destroy()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--shape", default="v4-flash")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--variants", default="default")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="megamoe-ep-breakdown-") as workdir:
        mp.spawn(rank_main, args=(args, workdir), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
