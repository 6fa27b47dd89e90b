"""The `megamoe` command: demo | bench | info | stress."""

from __future__ import annotations

import argparse
import sys
import time


def _device_summary(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA, Triton kernels)"
    from . import env

    path = "Triton kernels in the interpreter" if env.triton_interpret() else "plain-torch CPU path"
    return f"CPU ({path})"


def demo(args) -> int:
    import torch

    import megamoe
    from megamoe.testing import MoEShape, make_problem, relative_error

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = MoEShape("v4-flash/8", args.experts, 6, args.hidden, args.intermediate)
    print(f"megamoe {megamoe.__version__} demo: a scaled-down v4-flash MoE layer "
          f"(E={shape.num_experts}, top-{shape.num_topk}, H={shape.hidden}, I={shape.intermediate}), "
          f"{args.tokens} tokens, mode {args.mode}")
    print(f"device: {_device_summary(device)}")
    problem = make_problem(shape, args.tokens, mode=args.mode, masked_ratio=0.05, seed=0, device=device)
    buf = megamoe.MegaMoEBuffer(shape.num_experts, args.tokens, shape.num_topk, shape.hidden,
                                shape.intermediate, mode=args.mode, device=device)
    l1, l2 = megamoe.transform_weights(problem.l1, problem.l2, mode=args.mode)
    y = torch.empty_like(problem.x)
    stats = torch.zeros(shape.num_experts, dtype=torch.int32, device=device)

    def call():
        megamoe.pre_dispatch(problem.x, problem.topk_idx, problem.topk_weights, buf)
        megamoe.mega_moe(y, l1, l2, buf, recv_stats=stats)

    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed_us = (time.perf_counter() - start) / reps * 1e6
    ref, counts = megamoe.reference.mega_moe_reference(problem.x, problem.topk_idx, problem.topk_weights,
                                                       problem.l1, problem.l2, mode=args.mode,
                                                       return_recv_counts=True)
    err = relative_error(y, ref)
    counts_ok = bool((stats == counts * (reps + 1)).all())
    print(f"ran: pre_dispatch + mega_moe ({'fused Triton kernels' if device.type == 'cuda' else 'CPU path'})")
    print(f"accuracy vs float64 reference: relative Frobenius error {err:.2e} (contract: <= 1e-2)")
    print(f"recv_stats match the reference's per-expert counts: {counts_ok}")
    print(f"time: {elapsed_us:.0f} us per call (wall clock, eager, mean of {reps})")
    buf.destroy()
    return 0 if err <= 1e-2 and counts_ok else 1


def info(args) -> int:
    from .buffer import buffer_layout, describe_layout
    from .testing import MODEL_SHAPES

    shape = MODEL_SHAPES[args.shape]
    backend = args.backend if args.ranks > 1 else "auto"
    regions = buffer_layout(shape.num_experts, args.tokens, shape.num_topk, shape.hidden, shape.intermediate,
                            num_ranks=args.ranks, mode=args.mode, intermediate_sf=args.intermediate_sf,
                            backend=backend)
    print(f"MegaMoEBuffer for {shape.name}: E={shape.num_experts}, K={shape.num_topk}, H={shape.hidden}, "
          f"I={shape.intermediate}, {args.tokens} tokens per rank, {args.ranks} rank(s), mode {args.mode}"
          + (f", backend {backend}" if args.ranks > 1 else ""))
    print(describe_layout(regions))
    return 0


EP_ONLY_FLAGS = ("device", "backends", "baselines", "warmup", "iters", "deadline")


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated integers, got {text!r}") from None


def bench(args) -> int:
    if args.ep is not None:
        return bench_ep(args)
    given = [f"--{name}" for name in EP_ONLY_FLAGS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --ep N (the EP = 1 benchmark runs on one CUDA GPU)")
    from .bench.run import DEFAULT_SHAPES, DEFAULT_TOKENS, run

    run(shapes=(args.shapes or ",".join(DEFAULT_SHAPES)).split(","),
        tokens=_int_list("tokens", args.tokens) if args.tokens else DEFAULT_TOKENS,
        routings=args.routing.split(","), out_dir=args.out, n_sets=args.sets, loop=not args.no_loop,
        check=not args.no_check)
    return 0


def bench_ep(args) -> int:
    """`megamoe bench --ep N`: N ranks, one shape; exit status 1 if a path failed its check."""
    from .bench import ep

    if args.routing != "uniform":
        raise ValueError(f"--routing: the EP benchmark routes uniformly, got {args.routing!r}")
    shapes = (args.shapes or ep.DEFAULT_SHAPE).split(",")
    if len(shapes) != 1:
        raise ValueError(f"--shapes: the EP benchmark runs one shape per run, got {args.shapes!r}")
    optional = {name: getattr(args, name) for name in ("warmup", "iters") if getattr(args, name) is not None}
    if args.deadline is not None:
        optional["deadline_s"] = args.deadline
    if args.backends is not None:
        optional["backends"] = tuple(b for b in args.backends.split(",") if b)
    if args.baselines is not None:
        optional["baselines"] = tuple(b for b in args.baselines.split(",") if b)
    cfg = ep.config_from_names(args.ep, shapes[0], tokens=_int_list("tokens", args.tokens) if args.tokens
                               else ep.DEFAULT_TOKENS, device_type=args.device or "cuda", sets=args.sets,
                               check=not args.no_check, out_dir=args.out, **optional)
    result = ep.run_ep(cfg)
    failed = ep.failed_paths(result)
    if failed:
        print("failed their check: " + "; ".join(failed))
    return 1 if failed else 0


def stress(args) -> int:
    from .stress import run_cli

    return run_cli(args)


def main(argv=None) -> int:
    from .bench import ep
    from .bench.run import DEFAULT_SHAPES, DEFAULT_TOKENS
    from .testing import MODEL_SHAPES

    parser = argparse.ArgumentParser(prog="megamoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run a small MoE layer on the best device here and check it")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--mode", default="fp8xfp4", choices=["fp8xfp4", "bf16xbf16"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.set_defaults(func=demo)

    p = sub.add_parser("info", help="print the buffer layout for a model shape")
    p.add_argument("--shape", default="v4-flash", choices=sorted(MODEL_SHAPES))
    p.add_argument("--tokens", type=int, default=8192, help="max tokens per rank")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--backend", default="nccl", choices=["nccl", "symm"],
                   help="with --ranks > 1: the backend whose regions to show (auto picks symm inside one node)")
    p.add_argument("--mode", default="fp8xfp4", choices=["fp8xfp4", "bf16xbf16"])
    p.add_argument("--intermediate-sf", default="ue8m0", choices=["ue8m0", "fp32"])
    p.set_defaults(func=info)

    p = sub.add_parser("bench", help="benchmark against the PyTorch baselines (needs a GPU); --ep N: N ranks")
    p.add_argument("--shapes", default=None, help=f"comma list of {', '.join(MODEL_SHAPES)} (default: "
                   f"{','.join(DEFAULT_SHAPES)}; with --ep one shape, default {ep.DEFAULT_SHAPE})")
    p.add_argument("--tokens", default=None, help="tokens per rank, comma list (default: "
                   f"{','.join(map(str, DEFAULT_TOKENS))}; with --ep {','.join(map(str, ep.DEFAULT_TOKENS))})")
    p.add_argument("--routing", default="uniform", help="comma list of uniform, skewed, one_expert")
    p.add_argument("--sets", type=int, default=4, help="rotating input sets per measurement")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--no-loop", action="store_true", help="skip the slow per-expert loop baseline")
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="expert parallelism: spawn N ranks and time symm, nccl, the torch all_to_all pipeline "
                        "and EP = 1 of the same per-rank work (docs/EP.md)")
    p.add_argument("--device", default=None, help="with --ep: cuda (N GPUs, NCCL; default) or cpu (gloo ranks)")
    p.add_argument("--backends", default=None, help="with --ep: MegaMoEBuffer backends to time, comma list "
                   f"(default: {','.join(ep.DEFAULT_BACKENDS)})")
    p.add_argument("--baselines", default=None, help="with --ep: baselines to time, comma list "
                   f"(default: {','.join(ep.DEFAULT_BASELINES)}; empty: none)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"with --ep: warm-up iterations per path (default {ep.DEFAULT_WARMUP})")
    p.add_argument("--iters", type=int, default=None, help="with --ep: timed iterations per path, the same on "
                   f"every rank (default {ep.DEFAULT_ITERS})")
    p.add_argument("--deadline", type=float, default=None, help="with --ep: seconds before every rank is killed "
                   f"(default {ep.DEFAULT_DEADLINE_S:.0f})")
    p.set_defaults(func=bench)

    p = sub.add_parser("stress", help="reliability: random cases against the reference; --faults, --graphs, --large")
    from .stress import add_cli_arguments

    add_cli_arguments(p)
    p.set_defaults(func=stress)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
