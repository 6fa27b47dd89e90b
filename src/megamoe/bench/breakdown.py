"""Where the time of one EP = 1 call goes, and how tile configs move it (GPU).

Times CUDA-graph replays of growing prefixes of the call (pre_dispatch; + plan; + L1; + L2;
+ combine) over rotating input sets and reports each stage as the difference, per config
variant. This is METHOD.md's "time variants that leave one stage out".

    python -m megamoe.bench.breakdown --shape v4-flash --tokens 1,64 --variants default,m16n32 [--mma fp16-l1]
"""

from __future__ import annotations

import argparse

import torch

from ..buffer import MegaMoEBuffer
from ..experts import ExpertOptions
from ..kernels.config import GemmConfig, force_config
from ..kernels.pre_dispatch import pre_dispatch
from ..testing import MODEL_SHAPES, make_problem, make_routing, relative_error
from ..reference import DEFAULT_MMA, MMAS, mega_moe_reference
from ..weights import transform_weights
from .timing import time_graph

# name: forced configs; {} = the heuristic.
VARIANTS = {
    "default": {},
    "m16": dict(l1=GemmConfig(16, 32, 4, 4), l2=GemmConfig(16, 64, 4, 4)),
    # FMA tiles: one or two rows a tile on the FP32 units (expert_mma.mxfp4_rows_fma).
    "fma1": dict(l1=GemmConfig(1, 32, 4, 1), l2=GemmConfig(1, 64, 4, 1)),
    "fma2": dict(l1=GemmConfig(2, 32, 4, 1), l2=GemmConfig(2, 64, 4, 1)),
    "fma1s2": dict(l1=GemmConfig(1, 32, 4, 2), l2=GemmConfig(1, 64, 4, 2)),   # weights loaded a step ahead
    # K split over 2 or 4 groups of 4 warps a program (GemmConfig.k_split), with or without loading ahead.
    "fma1k2": dict(l1=GemmConfig(1, 32, 8, 1, k_split=2), l2=GemmConfig(1, 64, 8, 1, k_split=2)),
    "fma1k4": dict(l1=GemmConfig(1, 32, 16, 1, k_split=4), l2=GemmConfig(1, 64, 16, 1, k_split=4)),
    "fma1s2k2": dict(l1=GemmConfig(1, 32, 8, 2, k_split=2), l2=GemmConfig(1, 64, 8, 2, k_split=2)),
    # Split launches (GemmConfig.fma_mix): MMA tiles for the experts with more than 1 (2) rows, FMA
    # tiles of their row count for the others.
    "mix1": dict(l1=GemmConfig(16, 32, 4, 4, fma_mix=1), l2=GemmConfig(16, 64, 4, 4, fma_mix=1)),
    "mix2": dict(l1=GemmConfig(16, 32, 4, 4, fma_mix=2), l2=GemmConfig(16, 64, 4, 4, fma_mix=2)),
    "mix21": dict(l1=GemmConfig(16, 32, 4, 4, fma_mix=2), l2=GemmConfig(16, 64, 4, 4, fma_mix=1)),
    "n64": dict(l1=GemmConfig(16, 64, 4, 4), l2=GemmConfig(16, 128, 4, 4)),
    "m32": dict(l1=GemmConfig(32, 32, 4, 4), l2=GemmConfig(32, 64, 4, 4)),
    "m64": dict(l1=GemmConfig(64, 32, 4, 3), l2=GemmConfig(64, 64, 4, 3)),
    "m64w8": dict(l1=GemmConfig(64, 64, 8, 3), l2=GemmConfig(64, 128, 8, 3)),
    # Prefill: more tokens or more columns per tile, more stages.
    "m128": dict(l1=GemmConfig(128, 64, 8, 3), l2=GemmConfig(128, 128, 8, 3)),
    "m64n128": dict(l1=GemmConfig(64, 128, 8, 3), l2=GemmConfig(64, 256, 8, 3)),
    "m64s4": dict(l1=GemmConfig(64, 64, 8, 4), l2=GemmConfig(64, 128, 8, 4)),
}

STAGES = ("pre_dispatch", "plan", "l1", "l2", "combine")


def breakdown(shape_name: str, tokens_list, variants, n_sets: int = 4, log=print, mma: str = DEFAULT_MMA):
    shape = MODEL_SHAPES[shape_name]
    device = torch.device("cuda")
    problem = make_problem(shape, 1, device=device, seed=0)
    l1, l2 = transform_weights(problem.l1, problem.l2)
    buf = MegaMoEBuffer(shape.num_experts, max(tokens_list), shape.num_topk, shape.hidden, shape.intermediate,
                        mma=mma)
    opts = ExpertOptions()
    g = torch.Generator(device=device).manual_seed(7)
    k = shape.num_topk
    results = []
    for tokens in tokens_list:
        sets = []
        for _ in range(n_sets):
            x = torch.randn(tokens, shape.hidden, generator=g, device=device).bfloat16()
            idx, w = make_routing(tokens, shape.num_experts, k, generator=g)
            sets.append((x, idx, w, torch.empty_like(x)))

        def call(s, upto):
            x, idx, w, y = s
            pre_dispatch(x, idx, w, buf)
            for _, step in buf.backend.steps(y, l1, l2, buf, opts, None)[:upto]:
                step()

        for name in variants:
            with force_config(**VARIANTS[name]):
                x, idx, w, y = sets[0]
                call(sets[0], 4)
                err = relative_error(y, mega_moe_reference(x, idx, w, problem.l1, problem.l2))
                cumulative = [time_graph([lambda s=s, u=upto: call(s, u) for s in sets]) for upto in range(5)]
            stages = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
            row = dict(shape=shape_name, tokens=tokens, variant=name, total_us=cumulative[-1], rel_err=err,
                       **{f"{s}_us": v for s, v in zip(STAGES, stages)})
            log(format_row(row))
            results.append(row)
    buf.destroy()
    return results


HEADER = (f"{'shape':<14}{'tokens':>7} {'variant':<9}" + "".join(f"{s:>13}" for s in STAGES)
          + f"{'total':>10}{'err':>10}")


def format_row(r) -> str:
    return (f"{r['shape']:<14}{r['tokens']:>7} {r['variant']:<9}"
            + "".join(f"{r[s + '_us']:>13.1f}" for s in STAGES) + f"{r['total_us']:>10.1f}{r['rel_err']:>10.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="v4-flash")
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--mma", default=DEFAULT_MMA, choices=MMAS, help="MegaMoEBuffer(mma=...)")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    rows = breakdown(args.shape, [int(t) for t in args.tokens.split(",")], args.variants.split(","),
                     log=lambda s: print(s, flush=True), mma=args.mma)
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))


if __name__ == "__main__":
    main()
