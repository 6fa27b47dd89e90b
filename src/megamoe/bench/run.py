"""`megamoe bench`: our fused path and the PyTorch baselines on the same inputs, one process.

For every model shape, routing and tokens-per-rank count it reports median microseconds per
call (CUDA-graph replay over rotating input sets), TFLOP/s, GB/s of the HBM floor's bytes,
the baselines measured in the same run, the floors from the device's measured ceilings, and
the accuracy of our output against the float64 reference. Writes a table, JSON and a PNG.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .. import reference
from ..buffer import MegaMoEBuffer
from ..kernels.pre_dispatch import pre_dispatch
from ..moe import mega_moe
from ..testing import MODEL_SHAPES, MoEShape, make_problem, make_routing, relative_error
from ..weights import transform_weights
from . import baselines
from .timing import measure_ceilings, time_eager, time_graph

DEFAULT_TOKENS = (1, 8, 64, 512, 4096, 8192)
DEFAULT_SHAPES = ("v4-flash", "gpt-oss-120b")


@dataclass
class BenchRow:
    shape: str
    routing: str
    tokens: int
    ours_us: float
    ours_fp32sf_us: float | None
    torch_bf16_us: float | None
    torch_fp8_us: float | None
    loop_us: float | None
    floor_hbm_us: float
    floor_compute_us: float
    tflops: float
    hbm_gbps: float
    rel_err: float
    rel_err_fp32sf: float | None
    ours_fp8mma_us: float | None = None      # MegaMoEBuffer(mma="fp8"): FP8 MMAs in L1 too (ours: the default)
    rel_err_fp8mma: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def floor_us(self) -> float:
        return max(self.floor_hbm_us, self.floor_compute_us)


def _weight_bytes_per_expert(shape: MoEShape) -> int:
    h, i = shape.hidden, shape.intermediate
    packed = 2 * i * h // 2 + h * i // 2
    return packed + packed // 16  # one scale byte per 32 elements (16 packed bytes)


def _safe_time(label, fn, notes):
    try:
        return fn()
    except Exception as exc:  # a baseline that does not run on this card/torch is reported, not fatal
        notes.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None


def bench_shape(shape: MoEShape, tokens_list, routings, ceilings, n_sets: int = 4, loop: bool = True,
                check: bool = True, log=print) -> list[BenchRow]:
    device = torch.device("cuda")
    max_tokens = max(tokens_list)
    problem = make_problem(shape, 1, device=device, seed=0)
    l1, l2 = transform_weights(problem.l1, problem.l2)
    buf = MegaMoEBuffer(shape.num_experts, max_tokens, shape.num_topk, shape.hidden, shape.intermediate)
    buf32 = MegaMoEBuffer(shape.num_experts, max_tokens, shape.num_topk, shape.hidden, shape.intermediate,
                          intermediate_sf="fp32")
    buf8 = MegaMoEBuffer(shape.num_experts, max_tokens, shape.num_topk, shape.hidden, shape.intermediate,
                         mma="fp8")
    fp8_weights = baselines.prepare_fp8_weights(problem.w1, problem.w2)
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for routing in routings:
        for tokens in tokens_list:
            sets = []
            for _ in range(n_sets):
                x = torch.randn(tokens, shape.hidden, generator=g, device=device).bfloat16()
                idx, w = make_routing(tokens, shape.num_experts, shape.num_topk, routing, generator=g)
                sets.append((x, idx, w, torch.empty_like(x)))
            notes: list[str] = []

            def ours(s, b=buf):
                x, idx, w, y = s
                pre_dispatch(x, idx, w, b)
                mega_moe(y, l1, l2, b)

            ours_us = time_graph([lambda s=s: ours(s) for s in sets])
            ours32_us = _safe_time("fp32 scales", lambda: time_graph([lambda s=s: ours(s, buf32) for s in sets]), notes)
            ours8_us = _safe_time("fp8 mma", lambda: time_graph([lambda s=s: ours(s, buf8) for s in sets]), notes)
            bf16_us = _safe_time("torch bf16", lambda: time_graph(
                [lambda s=s: baselines.torch_bf16_moe(s[0], s[1], s[2], problem.w1, problem.w2) for s in sets]), notes)
            fp8_us = _safe_time("torch fp8", lambda: time_graph(
                [lambda s=s: baselines.torch_fp8_moe(s[0], s[1], s[2], fp8_weights) for s in sets]), notes)
            loop_us = _safe_time("loop", lambda: time_eager(
                [lambda s=s: baselines.per_expert_loop(s[0], s[1], s[2], problem.w1, problem.w2) for s in sets],
                reps=3), notes) if loop else None

            valid_rows = sum(int((s[1] >= 0).sum()) for s in sets) / n_sets
            touched = sum(int(torch.unique(s[1][s[1] >= 0]).numel()) for s in sets) / n_sets
            flops = 2 * valid_rows * 3 * shape.hidden * shape.intermediate
            nbytes = touched * _weight_bytes_per_expert(shape) + 2 * 2 * tokens * shape.hidden
            floor_hbm = nbytes / ceilings.copy_gbps / 1e3
            floor_compute = flops / ceilings.fp8_tflops / 1e6

            err = err32 = err8 = float("nan")
            if check:
                x, idx, w, y = sets[0]
                ours(sets[0])
                ref = reference.mega_moe_reference(x, idx, w, problem.l1, problem.l2)
                err = relative_error(y, ref)
                ours(sets[0], buf32)
                ref32 = reference.mega_moe_reference(x, idx, w, problem.l1, problem.l2, intermediate_sf="fp32")
                err32 = relative_error(y, ref32)
                ours(sets[0], buf8)
                err8 = relative_error(y, ref)
            row = BenchRow(shape.name, routing, tokens, ours_us, ours32_us, bf16_us, fp8_us, loop_us, floor_hbm,
                           floor_compute, flops / ours_us / 1e6, nbytes / ours_us / 1e3, err, err32, ours8_us,
                           err8, notes)
            log(format_row(row))
            rows.append(row)
    buf.destroy()
    buf32.destroy()
    buf8.destroy()
    return rows


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


TABLE_HEADER = (f"{'shape':<14}{'routing':<9}{'tokens':>7}{'ours us':>10}{'fp32sf':>9}{'fp8mma':>9}{'bf16 us':>10}"
                f"{'fp8 us':>9}{'loop us':>10}{'floor':>9}{'%floor':>8}{'x bf16':>8}{'TFLOP/s':>9}{'GB/s':>8}"
                f"{'rel err':>10}{'err8':>10}")


def format_row(r: BenchRow) -> str:
    speedup = r.torch_bf16_us / r.ours_us if r.torch_bf16_us else None
    return (f"{r.shape:<14}{r.routing:<9}{r.tokens:>7}{r.ours_us:>10.1f}{_fmt(r.ours_fp32sf_us):>9}"
            f"{_fmt(r.ours_fp8mma_us):>9}{_fmt(r.torch_bf16_us):>10}{_fmt(r.torch_fp8_us):>9}{_fmt(r.loop_us):>10}"
            f"{r.floor_us:>9.1f}{100 * r.floor_us / r.ours_us:>7.0f}%{_fmt(speedup, '.2f'):>8}{r.tflops:>9.0f}"
            f"{r.hbm_gbps:>8.0f}{r.rel_err:>10.2e}{_fmt(r.rel_err_fp8mma, '.2e'):>10}")


def plot(rows: list[BenchRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r.shape, r.routing) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, (shape, routing) in zip(axes[0], keys):
        sel = sorted((r for r in rows if (r.shape, r.routing) == (shape, routing)), key=lambda r: r.tokens)
        t = [r.tokens for r in sel]
        for label, attr in (("megamoe", "ours_us"), ("torch bf16 grouped", "torch_bf16_us"),
                            ("torch fp8 grouped", "torch_fp8_us"), ("per-expert loop", "loop_us"),
                            ("floor", "floor_us")):
            pts = [(x, getattr(r, attr)) for x, r in zip(t, sel) if getattr(r, attr) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if label == "floor" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("us per call")
        ax.set_title(f"{shape} ({routing})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(shapes=DEFAULT_SHAPES, tokens=DEFAULT_TOKENS, routings=("uniform",), out_dir="bench_out", n_sets=4,
        loop=True, check=True) -> list[BenchRow]:
    if not torch.cuda.is_available():
        raise RuntimeError("megamoe bench needs a CUDA GPU")
    os.makedirs(out_dir, exist_ok=True)
    ceilings = measure_ceilings()
    print(f"device: {ceilings.name}; copy {ceilings.copy_gbps:.0f} GB/s, fp8 {ceilings.fp8_tflops:.0f} TFLOP/s, "
          f"bf16 {ceilings.bf16_tflops:.0f} TFLOP/s (measured now)", flush=True)
    print(TABLE_HEADER, flush=True)
    rows = []
    for name in shapes:
        try:
            rows += bench_shape(MODEL_SHAPES[name], tokens, routings, ceilings, n_sets, loop, check,
                                log=lambda s: print(s, flush=True))
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
    result = {
        "date": datetime.date.today().isoformat(),
        "device": asdict(ceilings),
        "torch": torch.__version__,
        "rows": [dict(asdict(r), floor_us=r.floor_us) for r in rows],
    }
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    if rows:
        try:
            plot(rows, os.path.join(out_dir, "bench.png"))
        except ImportError:
            print("matplotlib is not installed: no plot")
    print("\n" + TABLE_HEADER)
    for r in rows:
        print(format_row(r))
    return rows
