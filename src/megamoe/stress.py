"""Reliability drivers (issue 6): pressure test, fault injection, CUDA-graph soak, large sizes.

Used by `megamoe stress` and by tests/test_stress.py. Dimension letters: T tokens of a rank,
C = num_max_tokens_per_rank, E experts, E_l = E / R local experts, K top-k, H hidden,
I intermediate, R ranks.

Pressure test (`run_stress`, `run_stress_ranks`): iteration i of seed s is one random case,
drawn from (s, i) alone, so any iteration replays on its own (`--start i --iterations 1`).
Consecutive iterations share a geometry (E, K, H, I, C, mode) and so a buffer, in blocks of
`block_len`, so each buffer also sees calls of different sizes one after another. Per case:

    tokens per rank in {0, 1, C - 1, C}; K in 1..8; H and I multiples of 32 (2880 included);
    routing uniform, skewed, every token to one "hot" expert (plus K - 1 others), or to one
    expert alone (other slots -1); masked ratio 0, 0.5 or 1; fp8xfp4 or bf16xbf16, UE8M0 or
    FP32 intermediate scales, SwiGLU or gpt-oss activation, an optional clamp and routed
    scaling; int32 or int64 ids, float32 or bfloat16 weights; sometimes a NaN or +-Inf in one
    element of one token; sometimes one invalid argument to pre_dispatch or mega_moe first.

and per rank the checks (each failure is recorded with its iteration, nothing stops the run):

    contract       y within `tolerance` (relative Frobenius) of megamoe.reference, every row
                   written (y starts as NaN)
    recv_stats     rows per local expert added exactly, once per call, from the global routing
    masked_zero    tokens whose K slots are all -1 get exact +0.0
    tail           buffer rows past T hold topk_idx = -1
    rerun          the same inputs again (after other calls on the buffer) give bitwise the same y
    nan_confined   with one poisoned element, every other token's y is bitwise the clean one; the
                   poisoned token gets +0.0 if fully masked, a non-finite row if routed (no clamp)
    bad_input      an invalid argument raises TypeError / ValueError naming it, and neither the
                   buffer nor y changes

Fault injection (`run_faults`): R ranks of a process group (gloo on the CPU, NCCL on GPUs), the
buffers' backend nccl or symm (`ep_backend`), MEGAMOE_TIMEOUT_S = `timeout_s`. Each call is
followed by `check_errors`, which is where the symm backend's device-side timeouts surface:

    mismatched_capacity  the last rank builds its buffer with C + 1: every rank raises ValueError
                         naming max_tokens_per_rank and each rank's value
    late_half            the last rank calls mega_moe timeout/2 late: nobody raises, y is right
    late_double          the last rank calls 2 * timeout late: the others raise TimeoutError
                         within timeout + 5 s, and the late rank raises too when it arrives
    killed_counts / killed_dispatch / killed_combine
                         the last rank SIGKILLs itself mid-call, right before it would issue the
                         count all_gather, the dispatch or the return all_to_all_single (the
                         combine's input): every other rank raises TimeoutError or RuntimeError
                         naming the collective within timeout + 5 s. (Killed just after issuing,
                         its rows may already be delivered, and the others rightly finish.)
                         On the symm backend: before the dispatch barrier (counts, dispatch) or
                         the combine barrier (combine).
    killed_gather        symm backend only: the last rank dies right after its dispatch barrier,
                         while the others pull its rows from its (still mapped) memory; they
                         raise TimeoutError naming the combine barrier within timeout + 5 s

Every rank runs in its own spawned process (`spawn_ranks`): file-store rendezvous, one
faulthandler deadline per process, a parent that kills whatever is still alive at the deadline;
nothing can hang.

CUDA graphs (`graph_soak`, GPU): graphs of several batch sizes captured on one buffer, replayed
in turn; at every `check_every`-th replay new inputs are written, an eager call on the same
buffer gives the expected y, and the replay must match it bitwise (and the reference within
`tolerance`); recv_stats must count every replay exactly.

Large sizes (`run_large`, GPU): cases where x, the combine rows or y pass 2^31 elements,
checked against the reference token chunk by token chunk, plus pre_dispatch's last rows bitwise.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import env
from .buffer import MegaMoEBuffer
from .experts import ExpertOptions
from .formats import quantize_fp8
from .kernels.launch import use_triton
from .kernels.pre_dispatch import pre_dispatch
from .moe import mega_moe
from .reference import DEFAULT_MMA, MMAS, mega_moe_reference
from .testing import relative_error
from .weights import transform_weights

CONTRACT_RELATIVE_ERROR = 1e-2
"""DESIGN.md section 4: a whole layer against the float64 reference (the CLI's default)."""

TIMEOUT_SLACK_S = 5.0
"""Issue 6: after a fault, every other rank raises within MEGAMOE_TIMEOUT_S + this."""

MAX_FAILURES_KEPT = 50


# ------------------------------------------------------------------ cases

@dataclass(frozen=True)
class Profile:
    """The space the random geometries are drawn from."""

    name: str
    experts: tuple[int, ...]          # num_experts choices, rounded down to a multiple of R
    sizes: tuple[int, ...]            # hidden and intermediate choices (multiples of 32)
    capacities: tuple[int, ...]       # num_max_tokens_per_rank choices
    wide: float = 0.0                 # chance of hidden or intermediate = 2880 with few experts, tokens
    max_weight_bytes: int = 1 << 62   # cap on E * 3 * H * I bytes of bf16 weights: E is halved below it


GPT_OSS_SIZE = 2880
WIDE_MAX_EXPERTS = 4
WIDE_MAX_CAPACITY = 4

PROFILES = {p.name: p for p in (
    # The Triton interpreter on a CI core: a call costs about a second at these sizes.
    Profile("tiny", experts=(2, 4, 8), sizes=(32, 64, 96), capacities=(3, 5, 8, 12)),
    # The plain-torch CPU path, or the interpreter with patience.
    Profile("cpu", experts=(2, 4, 8, 12, 16), sizes=(32, 64, 96, 128, 160, 192, 256),
            capacities=(2, 5, 9, 16, 33, 64), wide=0.15),
    # GPUs: model-like sizes; few distinct sizes, since each new H or K compiles new kernels.
    Profile("gpu", experts=(8, 16, 32, 64, 128), sizes=(64, 96, 256, 768, 2048, 2880, 4096),
            capacities=(2, 9, 64, 257, 1024), max_weight_bytes=4 << 30),
    # GPU sanitizers on the prefill tiles (on Hopper the Gluon kernels): full batches put 64 to
    # 512 rows on an expert on average, more than config.NARROW_ROWS, at sizes compute-sanitizer
    # runs in seconds; K not a multiple of 128 (96, 160, 320) included.
    Profile("prefill", experts=(2, 4), sizes=(96, 160, 256, 320), capacities=(257, 512)),
)}

ROUTINGS = ("uniform", "skewed", "hot_expert", "one_expert")
MASKED_RATIOS = (0.0, 0.5, 1.0)
MASKED_WEIGHTS = (0.45, 0.35, 0.2)
POISONS = (float("nan"), float("inf"), float("-inf"))


@dataclass(frozen=True)
class Geometry:
    """Buffer arguments shared by a block of iterations."""

    num_experts: int
    num_topk: int
    hidden: int
    intermediate: int
    num_max_tokens_per_rank: int
    mode: str
    intermediate_sf: str
    weight_seed: int


@dataclass(frozen=True)
class Poison:
    rank: int
    token: int
    column: int
    value: float


@dataclass(frozen=True)
class StressCase:
    """One iteration: a geometry and everything random about the call."""

    seed: int
    iteration: int
    geometry: Geometry
    tokens: tuple[int, ...]           # T of each rank
    routing: str
    masked_ratio: float
    hot_expert: int
    activation: str
    activation_clamp: float | None
    routed_scaling_factor: float
    idx_dtype: torch.dtype
    weights_dtype: torch.dtype
    poison: Poison | None
    bad_input: str | None             # a name of BAD_INPUTS, or None
    data_seed: int

    def describe(self) -> str:
        g = self.geometry
        p = self.poison
        poison = "" if p is None else f" poison={p.value}@rank{p.rank}/t{p.token}"
        return (f"E={g.num_experts} K={g.num_topk} H={g.hidden} I={g.intermediate} C={g.num_max_tokens_per_rank} "
                f"{g.mode}/{g.intermediate_sf} T={list(self.tokens)} {self.routing} masked={self.masked_ratio} "
                f"{self.activation} clamp={self.activation_clamp} scale={self.routed_scaling_factor:g}{poison}"
                f"{' bad=' + self.bad_input if self.bad_input else ''}")


def _rng(seed: int, kind: str, index: int) -> random.Random:
    # A str seed is hashed with SHA-512: the same draw in every process (unlike hash()).
    return random.Random(f"megamoe-stress:{seed}:{kind}:{index}")


def draw_geometry(seed: int, block: int, profile: Profile, num_ranks: int = 1) -> Geometry:
    rng = _rng(seed, "geometry", block)
    experts = rng.choice(profile.experts)
    hidden, inter = rng.choice(profile.sizes), rng.choice(profile.sizes)
    capacity = rng.choice(profile.capacities)
    if rng.random() < profile.wide:
        if rng.random() < 0.5:
            hidden = GPT_OSS_SIZE
        else:
            inter = GPT_OSS_SIZE
        experts, capacity = min(experts, WIDE_MAX_EXPERTS), min(capacity, WIDE_MAX_CAPACITY)
    while experts > 1 and experts * 3 * hidden * inter * 2 > profile.max_weight_bytes:
        experts //= 2
    experts = max(num_ranks, experts - experts % num_ranks)
    topk = rng.randint(1, min(8, experts))
    mode = "bf16xbf16" if rng.random() < 0.25 else "fp8xfp4"
    inter_sf = "fp32" if mode == "fp8xfp4" and rng.random() < 0.2 else "ue8m0"
    return Geometry(experts, topk, hidden, inter, capacity, mode, inter_sf, rng.getrandbits(62))


def draw_case(seed: int, iteration: int, profile: Profile, num_ranks: int = 1, block_len: int = 4) -> StressCase:
    geometry = draw_geometry(seed, iteration // block_len, profile, num_ranks)
    rng = _rng(seed, "case", iteration)
    cap = geometry.num_max_tokens_per_rank
    tokens = tuple(rng.choice((0, 1, cap - 1, cap)) for _ in range(num_ranks))
    routing = rng.choice(ROUTINGS)
    masked = rng.choices(MASKED_RATIOS, MASKED_WEIGHTS)[0]
    activation = "gpt_oss" if rng.random() < 0.25 else "swiglu"
    clamp = round(rng.uniform(0.5, 8.0), 3) if rng.random() < 0.3 else None
    scaling = 1.0 if rng.random() < 0.6 else round(rng.uniform(0.25, 3.0), 3)
    poison = None
    holders = [r for r, t in enumerate(tokens) if t > 0]
    if holders and rng.random() < 0.4:
        rank = rng.choice(holders)
        poison = Poison(rank, rng.randrange(tokens[rank]), rng.randrange(geometry.hidden),
                        rng.choices(POISONS, (0.6, 0.2, 0.2))[0])
    bad = None
    if rng.random() < 0.5:
        names = [b.name for b in BAD_INPUTS if b.applies(geometry, tokens)]
        bad = rng.choice(names)
    return StressCase(seed, iteration, geometry, tokens, routing, masked, rng.randrange(geometry.num_experts),
                      activation, clamp, scaling, rng.choice((torch.int32, torch.int64)),
                      torch.bfloat16 if rng.random() < 0.3 else torch.float32, poison, bad, rng.getrandbits(62))


def random_expert_weights(num_experts: int, n: int, k: int, mode: str, generator: torch.Generator):
    """User-layout weights of one projection [E, N, K] on the generator's device.

    fp8xfp4: (uint8 [E, N, K/2] uniformly random codes, every e2m1 code including -0;
    uint8 [E, N, K/32] exponents around 1 / (2.93 sqrt(K)), 2.93 being the RMS of a random
    code, so that W's elements have RMS about 1/sqrt(K), each group one step up or down).
    bf16xbf16: bfloat16 [E, N, K] normal with std 1/sqrt(K).
    """
    device = generator.device
    if mode == "fp8xfp4":
        codes = torch.randint(0, 256, (num_experts, n, k // 2), generator=generator, device=device, dtype=torch.uint8)
        base = 127 + round(math.log2(1.0 / (2.93 * math.sqrt(k))))
        jitter = torch.randint(-1, 2, (num_experts, n, k // 32), generator=generator, device=device)
        return codes, (jitter + base).to(torch.uint8)
    return (torch.randn(num_experts, n, k, generator=generator, device=device) * k ** -0.5).bfloat16()


def _routing(tokens: int, case: StressCase, generator: torch.Generator):
    """topk_idx int64 [T, K] (distinct experts per token, -1 masked), topk_weights float32 [T, K]."""
    g = case.geometry
    scores = torch.rand(tokens, g.num_experts, generator=generator)
    if case.routing == "skewed":
        scores = scores / torch.arange(1, g.num_experts + 1, dtype=torch.float32) ** 1.2
    elif case.routing in ("hot_expert", "one_expert"):
        scores[:, case.hot_expert] = 2.0
    idx = scores.topk(g.num_topk, dim=1).indices
    if case.routing == "one_expert":
        idx[:, 1:] = -1
    # The hot expert sits in a random slot, not always slot 0.
    order = torch.rand(tokens, g.num_topk, generator=generator).argsort(dim=1)
    idx = idx.gather(1, order)
    weights = torch.rand(tokens, g.num_topk, generator=generator) + 0.05
    weights = weights / weights.sum(dim=1, keepdim=True)
    if case.masked_ratio > 0:
        idx = idx.masked_fill(torch.rand(tokens, g.num_topk, generator=generator) < case.masked_ratio, -1)
    return idx, weights


def make_inputs(case: StressCase) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x bfloat16 [T, H], topk_idx [T, K], topk_weights [T, K]) of every rank, on the CPU.

    x is normal times a power of two per token in [2^-6, 2^6] (never zero); ids and weights
    have the case's dtypes. Without the poison: `poisoned` adds it.
    """
    gen = torch.Generator().manual_seed(case.data_seed)
    inputs = []
    for tokens in case.tokens:
        magnitude = torch.exp2(torch.randint(-6, 7, (tokens, 1), generator=gen).float())
        x = (torch.randn(tokens, case.geometry.hidden, generator=gen) * magnitude).bfloat16()
        idx, weights = _routing(tokens, case, gen)
        inputs.append((x, idx.to(case.idx_dtype), weights.to(case.weights_dtype)))
    return inputs


def poisoned(x: torch.Tensor, poison: Poison) -> torch.Tensor:
    x = x.clone()
    x[poison.token, poison.column] = poison.value
    return x


# ------------------------------------------------------------------ bad inputs

@dataclass(frozen=True)
class BadInput:
    """One invalid argument: `make(ctx, rng)` returns the changed keyword arguments."""

    name: str
    target: str                       # "pre_dispatch" or "mega_moe"
    error: type
    match: str                        # the message must contain it (the argument's name)
    make: object
    needs_tokens: bool = False

    def applies(self, geometry: Geometry, tokens: tuple[int, ...]) -> bool:
        return not self.needs_tokens or min(tokens) > 0


def _set_one_id(idx: torch.Tensor, value: int, rng: random.Random) -> torch.Tensor:
    idx = idx.clone()
    idx.view(-1)[rng.randrange(idx.numel())] = value
    return idx


BAD_INPUTS = (
    BadInput("x_hidden", "pre_dispatch", ValueError, "x",
             lambda c, r: dict(x=torch.randn(c.tokens, c.hidden + 32, device=c.device).bfloat16())),
    BadInput("x_dtype", "pre_dispatch", TypeError, "x", lambda c, r: dict(x=c.x.to(torch.int32))),
    BadInput("x_over_capacity", "pre_dispatch", ValueError, "capacity",
             lambda c, r: dict(x=torch.randn(c.capacity + r.randint(1, 5), c.hidden, device=c.device).bfloat16())),
    BadInput("x_stride", "pre_dispatch", ValueError, "stride",
             lambda c, r: dict(x=torch.randn(c.tokens, 2 * c.hidden, device=c.device).bfloat16()[:, ::2])),
    BadInput("topk_idx_width", "pre_dispatch", ValueError, "topk_idx",
             lambda c, r: dict(topk_idx=torch.zeros(c.tokens, c.topk + 1, dtype=torch.int64, device=c.device))),
    BadInput("topk_idx_dtype", "pre_dispatch", TypeError, "topk_idx", lambda c, r: dict(topk_idx=c.idx.float())),
    BadInput("topk_idx_too_high", "pre_dispatch", ValueError, "topk_idx",
             lambda c, r: dict(topk_idx=_set_one_id(c.idx, c.experts + r.randrange(1000), r)), needs_tokens=True),
    BadInput("topk_idx_below_minus_one", "pre_dispatch", ValueError, "topk_idx",
             lambda c, r: dict(topk_idx=_set_one_id(c.idx, -2 - r.randrange(1000), r)), needs_tokens=True),
    BadInput("topk_weights_dtype", "pre_dispatch", TypeError, "topk_weights",
             lambda c, r: dict(topk_weights=c.weights.half())),
    BadInput("topk_weights_shape", "pre_dispatch", ValueError, "topk_weights",
             lambda c, r: dict(topk_weights=torch.rand(c.tokens, c.topk + 1, device=c.device))),
    BadInput("scaling_type", "pre_dispatch", TypeError, "routed_scaling_factor",
             lambda c, r: dict(routed_scaling_factor=str(r.random()))),
    BadInput("y_dtype", "mega_moe", TypeError, "y",
             lambda c, r: dict(y=torch.randn(c.tokens, c.hidden, device=c.device))),
    BadInput("y_hidden", "mega_moe", ValueError, "y",
             lambda c, r: dict(y=torch.randn(c.tokens, c.hidden + 32, device=c.device).bfloat16())),
    BadInput("y_over_capacity", "mega_moe", ValueError, "capacity",
             lambda c, r: dict(y=torch.randn(c.capacity + r.randint(1, 5), c.hidden, device=c.device).bfloat16())),
    BadInput("weights_swapped", "mega_moe", ValueError, "l1", lambda c, r: dict(l1=c.l2)),
    BadInput("weights_untransformed", "mega_moe", TypeError, "l1", lambda c, r: dict(l1=c.user_l1)),
    BadInput("clamp_negative", "mega_moe", ValueError, "activation_clamp",
             lambda c, r: dict(activation_clamp=-r.uniform(0.0, 10.0))),
    BadInput("clamp_not_finite", "mega_moe", ValueError, "activation_clamp",
             lambda c, r: dict(activation_clamp=r.choice((float("inf"), float("nan"))))),
    BadInput("recv_stats_dtype", "mega_moe", TypeError, "recv_stats",
             lambda c, r: dict(recv_stats=torch.zeros(c.local_experts, dtype=torch.int64, device=c.device))),
    BadInput("recv_stats_shape", "mega_moe", ValueError, "recv_stats",
             lambda c, r: dict(recv_stats=torch.zeros(c.local_experts + 1, dtype=torch.int32, device=c.device))),
    BadInput("activation_name", "mega_moe", ValueError, "activation", lambda c, r: dict(activation="relu")),
)
_BAD_BY_NAME = {b.name: b for b in BAD_INPUTS}


# ------------------------------------------------------------------ report

@dataclass
class StressReport:
    """What a pressure run did and found (one rank, or merged over ranks)."""

    iterations: int = 0
    calls: int = 0
    tokens: int = 0
    routed_rows: int = 0
    max_relative_error: float = 0.0
    checks: Counter = field(default_factory=Counter)       # check name -> times passed
    poisons: Counter = field(default_factory=Counter)      # "nan" / "inf" / "-inf" -> tokens poisoned
    bad_inputs: Counter = field(default_factory=Counter)   # BadInput name -> times tried
    num_failures: int = 0
    failures: list = field(default_factory=list)           # the first MAX_FAILURES_KEPT, as text
    seconds: float = 0.0

    def fail(self, text: str) -> None:
        self.num_failures += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(text)

    def merge(self, other: "StressReport") -> "StressReport":
        """Sum of two ranks' reports of one run (iterations and time are the run's)."""
        return StressReport(
            max(self.iterations, other.iterations), self.calls + other.calls, self.tokens + other.tokens,
            self.routed_rows + other.routed_rows, max(self.max_relative_error, other.max_relative_error),
            self.checks + other.checks, self.poisons + other.poisons, self.bad_inputs + other.bad_inputs,
            self.num_failures + other.num_failures, (self.failures + other.failures)[:MAX_FAILURES_KEPT],
            max(self.seconds, other.seconds))

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("checks", "poisons", "bad_inputs"):
            out[name] = dict(sorted(getattr(self, name).items()))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "StressReport":
        d = dict(d)
        for name in ("checks", "poisons", "bad_inputs"):
            d[name] = Counter(d[name])
        return cls(**d)

    def summary(self) -> str:
        lines = [f"iterations {self.iterations}, mega_moe calls {self.calls} (summed over ranks), tokens "
                 f"{self.tokens}, routed rows {self.routed_rows}, {self.seconds:.1f} s",
                 f"max relative error vs reference: {self.max_relative_error:.3e}",
                 "checks passed: " + ", ".join(f"{k} {v}" for k, v in sorted(self.checks.items())),
                 "poisoned tokens: " + (", ".join(f"{k} {v}" for k, v in sorted(self.poisons.items())) or "none"),
                 f"bad inputs tried: {sum(self.bad_inputs.values())} of {len(self.bad_inputs)} kinds",
                 f"failures: {self.num_failures}"]
        lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


# ------------------------------------------------------------------ pressure test

def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@dataclass
class _CallContext:
    """What the BadInput makers see: this rank's valid arguments and sizes."""

    x: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor
    l1: object
    l2: object
    user_l1: object
    tokens: int
    hidden: int
    topk: int
    experts: int
    local_experts: int
    capacity: int
    device: torch.device


class _Stress:
    """One rank's pressure run: the current geometry's buffer and weights, and the checks."""

    def __init__(self, group, device: torch.device, tolerance: float, report: StressReport,
                 ep_backend: str = "auto", mma: str = DEFAULT_MMA):
        self.group = group
        self.ep_backend = ep_backend
        self.mma = mma
        self.rank = dist.get_rank(group) if group is not None else 0
        self.device = device
        self.tolerance = tolerance
        self.report = report
        self.geometry = None
        self.buf = None
        self._local = None   # (geometry, EP = 1 buffer, l1, l2) of _local_copy

    def _setup(self, geo: Geometry) -> None:
        if geo == self.geometry:
            return
        if self.buf is not None:
            self.buf.destroy()
        gen = torch.Generator(device=self.device).manual_seed(geo.weight_seed)
        e, h, i = geo.num_experts, geo.hidden, geo.intermediate
        self.user_l1 = random_expert_weights(e, 2 * i, h, geo.mode, gen)
        self.user_l2 = random_expert_weights(e, h, i, geo.mode, gen)
        self.buf = MegaMoEBuffer(e, geo.num_max_tokens_per_rank, geo.num_topk, h, i, group=self.group, mode=geo.mode,
                                 intermediate_sf=geo.intermediate_sf, device=self.device,
                                 backend=self.ep_backend if self.group is not None else "auto",
                                 mma=self.mma if geo.mode == "fp8xfp4" else None)
        local = self.buf.num_local_experts
        first = self.rank * local

        def mine(w):
            return tuple(t[first:first + local] for t in w) if isinstance(w, tuple) else w[first:first + local]

        self.l1, self.l2 = transform_weights(mine(self.user_l1), mine(self.user_l2), mode=geo.mode)
        self.geometry = geo

    def close(self) -> None:
        if self.buf is not None:
            self.buf.destroy()
        if self._local is not None:
            self._local[1].destroy()

    def _fail(self, case: StressCase, check: str, detail: str) -> None:
        self.report.fail(f"iteration {case.iteration} (seed {case.seed}) rank {self.rank}: {check}: {detail} "
                         f"[{case.describe()}]")

    def _check(self, case: StressCase, name: str, ok: bool, detail: str = "") -> None:
        if ok:
            self.report.checks[name] += 1
        else:
            self._fail(case, name, detail)

    def _call(self, case: StressCase, x, idx, weights, stats) -> torch.Tensor:
        """pre_dispatch + mega_moe into a fresh all-NaN y; returns y [T, H] bfloat16."""
        pre_dispatch(x, idx, weights, self.buf, routed_scaling_factor=case.routed_scaling_factor)
        y = torch.full_like(x, float("nan"), dtype=torch.bfloat16)
        mega_moe(y, self.l1, self.l2, self.buf, activation_clamp=case.activation_clamp, recv_stats=stats,
                 activation=case.activation)
        self.report.calls += 1
        return y

    def _fp32_experts_note(self, case: StressCase, x, idx, weights, ref) -> str:
        """For a contract failure of the Triton kernels: the same tokens with the experts in
        plain-torch FP32 on the same device. Near 0 there, the kernels' own arithmetic is the
        difference: on Hopper the FP8 tensor cores' truncated accumulation (docs/RELIABILITY.md,
        finding 6). At EP > 1 this rank's tokens go through a local EP = 1 buffer that holds every
        expert, so no collective is involved and the other ranks need not take part (a failure
        is usually one rank's). The failure stands either way."""
        if not use_triton(self.device):
            return ""
        buf = self.buf
        if buf.backend.name != "local":
            buf, l1, l2 = self._local_copy(case.geometry)
        else:
            l1, l2 = self.l1, self.l2
        pre_dispatch(x, idx, weights, buf, routed_scaling_factor=case.routed_scaling_factor)
        y = torch.full_like(x, float("nan"), dtype=torch.bfloat16)
        opts = ExpertOptions(case.activation, case.activation_clamp)
        for _, step in buf.backend.steps(y, l1, l2, buf, opts, None, fp32_experts=True):
            step()
        err = relative_error(y, ref)
        # Only the FP8 MMAs truncate their sums; with mma="fp16" a near-exact FP32 run points elsewhere.
        fp8_mma = self.buf.mma == "fp8"
        cause = " (as finding 6: the FP8 tensor cores' accumulation)" if fp8_mma and err <= self.tolerance / 10 else ""
        return f"; the experts in plain-torch FP32 on this device: {err:.3e}{cause}"

    def _local_copy(self, geo: Geometry):
        """An EP = 1 buffer with every expert of `geo` and its transformed weights (built on first use
        per geometry, for `_fp32_experts_note` at EP > 1)."""
        if self._local is None or self._local[0] != geo:
            if self._local is not None:
                self._local[1].destroy()
            buf = MegaMoEBuffer(geo.num_experts, geo.num_max_tokens_per_rank, geo.num_topk, geo.hidden,
                                geo.intermediate, mode=geo.mode, intermediate_sf=geo.intermediate_sf,
                                device=self.device)
            self._local = (geo, buf, *transform_weights(self.user_l1, self.user_l2, mode=geo.mode))
        return self._local[1:]

    def _own_bytes(self) -> torch.Tensor:
        """Every byte of the buffer's one allocation that only this rank writes. Over symm a peer
        writes its barrier signals into this rank's `signals` whenever it reaches a barrier
        (found on 2 x H200: a peer signalled while this rank was trying a bad input)."""
        storage = self.buf._storage
        if self.buf.backend.name != "symm":
            return storage
        signals = next(r for r in self.buf.regions if r.name == "signals")
        return torch.cat([storage[:signals.offset], storage[signals.offset + signals.nbytes:]])

    def _try_bad_input(self, case: StressCase, bad: BadInput, ctx: _CallContext, valid: dict) -> None:
        rng = _rng(case.seed, "bad", case.iteration)
        args = dict(valid, **bad.make(ctx, rng))
        before = self._own_bytes().clone()
        y_before = args["y"].clone() if "y" in args else None
        self.report.bad_inputs[bad.name] += 1
        try:
            if bad.target == "pre_dispatch":
                pre_dispatch(**args)
            else:
                mega_moe(**args)
        except bad.error as err:
            named = bad.match in str(err)
            self._check(case, "bad_input", named, f"{bad.name}: the message does not name {bad.match!r}: {err}")
        except Exception as err:  # noqa: BLE001 - a wrong exception type is a finding, not a crash
            self._fail(case, "bad_input", f"{bad.name}: expected {bad.error.__name__}, got "
                                          f"{type(err).__name__}: {err}")
        else:
            self._fail(case, "bad_input", f"{bad.name}: accepted without an error")
        if not torch.equal(self._own_bytes(), before):
            self._fail(case, "bad_input", f"{bad.name}: the buffer changed before the error")
        if y_before is not None and not torch.equal(args["y"].view(torch.int16), y_before.view(torch.int16)):
            self._fail(case, "bad_input", f"{bad.name}: y changed before the error")

    def iteration(self, case: StressCase) -> None:
        geo = case.geometry
        self._setup(geo)
        inputs = make_inputs(case)
        x, idx, weights = (t.to(self.device) for t in inputs[self.rank])
        tokens = x.shape[0]
        local = self.buf.num_local_experts
        first = self.rank * local
        all_ids = torch.cat([i.reshape(-1).long() for _, i, _ in inputs])
        counts = torch.bincount(all_ids[all_ids >= 0], minlength=geo.num_experts)[first:first + local]
        stats = torch.randint(0, 1000, (local,), dtype=torch.int32).to(self.device)
        stats0 = stats.clone()
        calls = 0

        bad = _BAD_BY_NAME.get(case.bad_input)
        ctx = _CallContext(x, idx, weights, self.l1, self.l2, self.user_l1, tokens, geo.hidden, geo.num_topk,
                           geo.num_experts, local, geo.num_max_tokens_per_rank, self.device)
        if bad is not None and bad.target == "pre_dispatch":
            self._try_bad_input(case, bad, ctx, dict(x=x, topk_idx=idx, topk_weights=weights, buf=self.buf,
                                                     routed_scaling_factor=case.routed_scaling_factor))
        if bad is not None and bad.target == "mega_moe":
            pre_dispatch(x, idx, weights, self.buf, routed_scaling_factor=case.routed_scaling_factor)
            self._try_bad_input(case, bad, ctx, dict(
                y=torch.full_like(x, float("nan"), dtype=torch.bfloat16), l1=self.l1, l2=self.l2, buf=self.buf,
                activation_clamp=case.activation_clamp, recv_stats=None, activation=case.activation))

        y = self._call(case, x, idx, weights, stats)
        calls += 1
        ref = mega_moe_reference(x, idx, weights, self.user_l1, self.user_l2, mode=geo.mode,
                                 activation_clamp=case.activation_clamp,
                                 routed_scaling_factor=case.routed_scaling_factor,
                                 intermediate_sf=geo.intermediate_sf, activation=case.activation)
        err = relative_error(y, ref)
        self.report.max_relative_error = max(self.report.max_relative_error, err)
        ok = err <= self.tolerance
        self._check(case, "contract", ok, "" if ok else f"relative error {err:.3e} > {self.tolerance:g}"
                    + self._fp32_experts_note(case, x, idx, weights, ref))
        masked = (idx < 0).all(dim=1)
        self._check(case, "masked_zero", not bool(y[masked].view(torch.int16).any()),
                    f"{int(masked.sum())} fully masked tokens, not all +0.0")
        tail = self.buf.topk_idx[tokens:]
        self._check(case, "tail", bool((tail == -1).all()), "buffer rows past T hold expert ids")

        if case.poison is not None:
            p = case.poison
            x_bad = poisoned(x, p) if p.rank == self.rank else x
            y_bad = self._call(case, x_bad, idx, weights, stats)
            calls += 1
            keep = torch.ones(tokens, dtype=torch.bool, device=self.device)
            if p.rank == self.rank:
                keep[p.token] = False
                self.report.poisons[str(p.value)] += 1
                row = y_bad[p.token]
                if bool(masked[p.token]):
                    self._check(case, "nan_confined", not bool(row.view(torch.int16).any()),
                                "a fully masked poisoned token did not get +0.0")
                elif case.activation_clamp is None:
                    # With a clamp, min(NaN, c) may legitimately give c on the GPU.
                    self._check(case, "nan_confined", not bool(torch.isfinite(row.float()).all()),
                                "a routed poisoned token came out finite")
            self._check(case, "nan_confined", _bitwise_equal(y_bad[keep], y[keep]),
                        "another token's y changed when one token was poisoned")

        y_again = self._call(case, x, idx, weights, stats)
        calls += 1
        self._check(case, "rerun", _bitwise_equal(y_again, y), "a rerun of the same inputs differs")
        added = (stats - stats0).cpu()
        expected = (counts * calls).to(torch.int32).cpu()
        self._check(case, "recv_stats", torch.equal(added, expected),
                    f"added {added.tolist()}, expected {expected.tolist()}")
        self.report.tokens += tokens
        self.report.routed_rows += int((idx >= 0).sum())


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_stress(iterations: int, *, seed: int = 0, start: int = 0, profile: str = "cpu", group=None,
               device: str | torch.device | None = None, tolerance: float = CONTRACT_RELATIVE_ERROR,
               block_len: int = 4, progress=None, ep_backend: str = "auto", mma: str = DEFAULT_MMA) -> StressReport:
    """Iterations start .. start + iterations - 1 of `seed` on this process (module docstring).

    group: None for EP = 1; else every rank of the process group calls this with the same
    arguments (the calls are collective), and ep_backend is the buffers' backend.
    mma: the buffers' `mma` in the fp8xfp4 cases (MegaMoEBuffer).
    progress: None, or a function called with (iterations done, report) after each iteration.
    Returns this rank's StressReport; failures are recorded, never raised.
    """
    device = torch.device(device) if device is not None else default_device()
    prof = PROFILES[profile]
    num_ranks = dist.get_world_size(group) if group is not None else 1
    report = StressReport()
    runner = _Stress(group, device, tolerance, report, ep_backend, mma)
    begin = time.monotonic()
    try:
        for i in range(start, start + iterations):
            case = draw_case(seed, i, prof, num_ranks, block_len)
            try:
                runner.iteration(case)
            except Exception:  # noqa: BLE001 - recorded with its case; a group may be broken after it
                runner._fail(case, "exception", traceback.format_exc(limit=4))
                if group is not None:
                    break
            report.iterations += 1
            report.seconds = time.monotonic() - begin
            if progress is not None:
                progress(report.iterations, report)
    finally:
        runner.close()
    report.seconds = time.monotonic() - begin
    return report


def _stress_rank(rank, num_ranks, group, iterations, kwargs):
    share_gpu = kwargs.pop("share_gpu")
    if kwargs.pop("device_type") == "cuda":
        device = torch.device("cuda", 0 if share_gpu else rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return run_stress(iterations, group=group, device=device, **kwargs).to_dict()


def run_stress_ranks(iterations: int, num_ranks: int, *, seed: int = 0, start: int = 0, profile: str = "cpu",
                     backend: str = "gloo", tolerance: float = CONTRACT_RELATIVE_ERROR, block_len: int = 4,
                     workdir: str | Path | None = None, deadline_s: float = 3600.0,
                     env_vars: dict | None = None, ep_backend: str = "auto", mma: str = DEFAULT_MMA,
                     share_gpu: bool = False) -> StressReport:
    """`run_stress` on `num_ranks` spawned ranks (EP = R): gloo on the CPU, nccl on R GPUs.

    ep_backend: the buffers' backend ("auto", "nccl" or "symm"; on the CPU symm needs
    TRITON_INTERPRET=1 in env_vars).
    share_gpu: every rank on GPU 0 instead (one process each, the group over gloo, the buffers
    over symm: CUDA IPC mappings of one device stand in for NVLink). It runs the EP protocol and
    the same kernels on a one-GPU machine; NCCL refuses two ranks on one device, so the nccl
    buffer backend cannot run this way.

    Returns the merged report; a rank that died or hung is recorded as a failure.
    """
    if share_gpu:
        if ep_backend == "nccl":
            raise ValueError("ep_backend: 'nccl' cannot run with share_gpu=True (NCCL refuses two ranks on one "
                             "device); use 'symm' or 'auto'")
        if not torch.cuda.is_available():
            raise ValueError("share_gpu: True needs a CUDA device")
        backend = "gloo"
    kwargs = dict(seed=seed, start=start, profile=profile, tolerance=tolerance, block_len=block_len,
                  device_type="cuda" if backend == "nccl" or share_gpu else "cpu", ep_backend=ep_backend, mma=mma,
                  share_gpu=share_gpu)
    with _workdir(workdir) as wd:
        outcomes = spawn_ranks(_stress_rank, num_ranks, iterations, kwargs, workdir=wd, backend=backend,
                               env_vars=env_vars, deadline_s=deadline_s)
    report = StressReport()
    for o in outcomes:
        if o.status == "returned":
            report = report.merge(StressReport.from_dict(o.value))
        else:
            report.fail(f"rank {o.rank}: {o.status} {o.error}")
    return report


# ------------------------------------------------------------------ ranks in processes

@dataclass
class RankOutcome:
    rank: int
    status: str                  # "returned", "raised", "died" (no result, exited), "hung" (killed at deadline)
    value: object = None
    error: str = ""
    exitcode: int | None = None


@contextlib.contextmanager
def environ_override(values: dict | None):
    """Set environment variables for the duration of the block (children inherit them)."""
    values = values or {}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _workdir(path):
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="megamoe-stress-") as tmp:
        yield Path(tmp)


def spawn_ranks(fn, num_ranks: int, *args, workdir: Path, backend: str = "gloo", env_vars: dict | None = None,
                deadline_s: float = 300.0, pg_timeout_s: float | None = None) -> list[RankOutcome]:
    """fn(rank, num_ranks, group, *args) in one spawned process per rank; an outcome per rank.

    The ranks meet through a file in `workdir` (a fresh directory per call). Each process
    dumps its stacks and exits at `deadline_s`, or as soon as the parent is gone; the parent waits
    until every rank has a result
    or is gone, then lets the ranks exit together (so no rank's exit disturbs a peer still
    running) and kills any process still alive. A rank may die (fault injection): that is an
    outcome, not an error. env_vars: variables the ranks need at start (TRITON_INTERPRET).
    pg_timeout_s: the process group's own timeout (default max(60, 4 * MEGAMOE_TIMEOUT_S)),
    longer than MEGAMOE_TIMEOUT_S so that megamoe's bound is the one that acts.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    release = workdir / "release"
    results = [workdir / f"rank{r}.pt" for r in range(num_ranks)]
    with environ_override(env_vars):
        pg_timeout = pg_timeout_s if pg_timeout_s is not None else max(60.0, 4 * env.timeout_s())
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(fn, r, num_ranks, backend, str(workdir / "rendezvous"), str(release),
                                   str(results[r]), args, deadline_s, pg_timeout, os.getpid()))
                 for r in range(num_ranks)]
        for p in procs:
            p.start()
    end = time.monotonic() + deadline_s + 10
    while time.monotonic() < end:
        if all(out.exists() or not p.is_alive() for p, out in zip(procs, results)):
            break
        time.sleep(0.05)
    release.touch()
    for p in procs:
        p.join(max(0.0, min(10.0, end - time.monotonic())))
    outcomes = []
    for rank, (p, out) in enumerate(zip(procs, results)):
        hung = p.is_alive() and not out.exists()
        if p.is_alive():
            p.kill()
            p.join()
        if out.exists():
            result = torch.load(out)
            if "error" in result:
                outcomes.append(RankOutcome(rank, "raised", error=result["error"], exitcode=p.exitcode))
            else:
                outcomes.append(RankOutcome(rank, "returned", value=result["value"], exitcode=p.exitcode))
        elif hung:
            outcomes.append(RankOutcome(rank, "hung", error=f"still running after {deadline_s} s; killed"))
        else:
            # Exit code 1 without a result: most likely its own faulthandler deadline (it hung).
            outcomes.append(RankOutcome(rank, "died", error=f"exited with code {p.exitcode} and no result",
                                        exitcode=p.exitcode))
    return outcomes


def _exit_with_parent(parent_pid: int) -> None:
    # A parent killed from outside (a `timeout`, the device tool) must not leave ranks behind.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _rank_main(fn, rank, num_ranks, backend, init_file, release_file, result_file, args, deadline_s, pg_timeout_s,
               parent_pid):
    faulthandler.dump_traceback_later(deadline_s, exit=True)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    # The ranks may share few cores: one thread each keeps them from starving one another.
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=num_ranks,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = {"value": fn(rank, num_ranks, dist.group.WORLD, *args)}
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        result = {"error": traceback.format_exc()}
    torch.save(result, result_file + ".part")
    os.replace(result_file + ".part", result_file)
    sys.stdout.flush()
    sys.stderr.flush()
    give_up = time.monotonic() + deadline_s
    while not os.path.exists(release_file) and time.monotonic() < give_up:
        time.sleep(0.05)
    # No process-group teardown: after a failed collective it may block on a missing peer.
    os._exit(0)


# ------------------------------------------------------------------ fault injection

FAULTS = ("mismatched_capacity", "late_half", "late_double", "killed_counts", "killed_dispatch", "killed_combine",
          "killed_gather")
SYMM_ONLY_FAULTS = ("killed_gather",)
SHARED_GROUP_FAULTS = ("mismatched_capacity", "late_half", "late_double")
"""Faults that leave the other ranks' processes alive run one after another on one group, in
this order (late_double last: the group is unusable after a timed-out collective)."""
DEFAULT_FAULTS = ("mismatched_capacity", "late_half", "late_double", "killed_dispatch", "killed_combine")

# A tiny problem: faults are about the collectives, not the arithmetic.
_FAULT_LOCAL_EXPERTS, _FAULT_TOPK, _FAULT_HIDDEN, _FAULT_INTER, _FAULT_CAPACITY = 2, 3, 64, 32, 6


def _arm_kill(phase: str, ep_backend: str) -> None:
    """SIGKILL this process right before it issues the collective of `phase` in its next call.

    The nccl backend issues, in order: the count all_gather, the dispatch all_to_all_single,
    the return all_to_all_single (the combine's input). It calls them through the
    torch.distributed module, so replacing the module's function here reaches it.
    The symm backend's only meeting points are its two device barriers: "counts" and "dispatch"
    kill before launching the dispatch barrier, "combine" before the combine barrier (after
    this rank's L2 kernels were launched), "gather" right after the dispatch barrier has
    completed, so the other ranks pull rows from a dead rank's memory.
    """
    if ep_backend == "symm":
        from .comm.symm import SymmBackend

        target = 1 if phase == "combine" else 0
        original_barrier = SymmBackend._barrier

        def die_at_barrier(self, buf, barrier_phase):
            if barrier_phase == target and phase != "gather":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original_barrier(self, buf, barrier_phase)
            if barrier_phase == target and phase == "gather":
                if buf.device.type == "cuda":
                    torch.cuda.synchronize(buf.device)   # the barrier has signalled the others
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        SymmBackend._barrier = die_at_barrier
        return
    name = "all_gather" if phase == "counts" else "all_to_all_single"
    nth = 2 if phase == "combine" else 1
    original = getattr(dist, name)
    calls = iter(range(1, nth + 1))

    def die_at_nth(*args, **kwargs):
        if next(calls, None) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(dist, name, die_at_nth)


def _outcome(fn) -> dict:
    """Run fn(); {"outcome": "ok" or the exception's type, "message", "seconds", "value"}."""
    begin = time.monotonic()
    try:
        value = fn()
    except Exception as err:  # noqa: BLE001 - the outcome is what is judged
        return {"outcome": type(err).__name__, "message": str(err)[:500], "seconds": time.monotonic() - begin}
    return {"outcome": "ok", "message": "", "seconds": time.monotonic() - begin, "value": value}


def _fault_rank(rank, num_ranks, group, scenarios, timeout_s, device_type, tolerance, ep_backend="auto"):
    """Worker: the scenarios in order on this group; the last rank is the faulty one."""
    os.environ["MEGAMOE_TIMEOUT_S"] = repr(timeout_s)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    victim = num_ranks - 1
    geo = Geometry(_FAULT_LOCAL_EXPERTS * num_ranks, _FAULT_TOPK, _FAULT_HIDDEN, _FAULT_INTER, _FAULT_CAPACITY,
                   "fp8xfp4", "ue8m0", weight_seed=1)
    case = StressCase(0, 0, geo, (_FAULT_CAPACITY - 1,) * num_ranks, "uniform", 0.0, 0, "swiglu", None, 1.0,
                      torch.int64, torch.float32, None, None, data_seed=2)
    runner = _Stress(group, device, tolerance, StressReport(), ep_backend)
    runner._setup(geo)
    ep_backend = runner.buf.backend.name
    x, idx, weights = (t.to(device) for t in make_inputs(case)[rank])
    ref = mega_moe_reference(x, idx, weights, runner.user_l1, runner.user_l2)

    def call(delay_s: float = 0.0):
        pre_dispatch(x, idx, weights, runner.buf)
        if delay_s:
            time.sleep(delay_s)
        y = torch.full_like(x, float("nan"))
        mega_moe(y, runner.l1, runner.l2, runner.buf)
        # The symm backend's device waits report through the buffer: check_errors waits for the
        # call and raises what it recorded (TimeoutError); for nccl the call already raised.
        runner.buf.check_errors()
        return relative_error(y, ref)

    results = {}
    for scenario in scenarios:
        warm = _outcome(call)  # every rank finishes it at about the same time: a common start
        if warm["outcome"] != "ok":
            results[scenario] = dict(warm, outcome=f"warm-up call failed: {warm['outcome']}")
            break
        faulty = rank == victim
        if scenario == "mismatched_capacity":
            results[scenario] = _outcome(lambda: MegaMoEBuffer(
                geo.num_experts, _FAULT_CAPACITY + int(faulty), _FAULT_TOPK, _FAULT_HIDDEN, _FAULT_INTER,
                group=group, device=device, backend=runner.ep_backend).destroy())
        elif scenario in ("late_half", "late_double"):
            delay = timeout_s * (0.5 if scenario == "late_half" else 2.0)
            results[scenario] = _outcome(lambda: call(delay if faulty else 0.0))
            if faulty:   # its lateness is not part of how long it waited
                results[scenario]["seconds"] -= delay
        else:
            if faulty:
                _arm_kill(scenario.removeprefix("killed_"), ep_backend)
            results[scenario] = _outcome(call)
    return results


def judge_faults(scenario: str, outcomes: list[RankOutcome], timeout_s: float, tolerance: float) -> list[str]:
    """The problems with one scenario's per-rank outcomes; [] when it behaved as issue 6 asks."""
    victim = len(outcomes) - 1
    bound = timeout_s + TIMEOUT_SLACK_S
    problems = []
    for o in outcomes:
        killed = scenario.startswith("killed_") and o.rank == victim
        if killed:
            if o.status != "died":
                problems.append(f"rank {o.rank}: expected to be killed, got {o.status}")
            continue
        if o.status != "returned":
            problems.append(f"rank {o.rank}: {o.status}: {o.error.strip().splitlines()[-1] if o.error else ''}")
            continue
        r = o.value.get(scenario)
        if r is None:
            problems.append(f"rank {o.rank}: did not reach {scenario}")
            continue
        where = f"rank {o.rank}: {r['outcome']} after {r['seconds']:.2f} s: {r['message'][:200]}"
        if r["seconds"] > bound:
            problems.append(f"{where} (later than timeout + {TIMEOUT_SLACK_S:g} s = {bound:g} s)")
        if scenario == "mismatched_capacity":
            if r["outcome"] != "ValueError" or "max_tokens_per_rank (rank 0:" not in r["message"]:
                problems.append(f"{where} (expected ValueError naming max_tokens_per_rank per rank)")
        elif scenario == "late_half":
            if r["outcome"] != "ok":
                problems.append(f"{where} (a rank late by half the timeout must not make anyone raise)")
            elif not r["value"] <= tolerance:
                problems.append(f"rank {o.rank}: relative error {r['value']:.3e} > {tolerance:g}")
        elif scenario == "late_double" and o.rank != victim:
            # Over symm the first rank to time out marks the call ABORTED on every peer, so a
            # survivor may raise "rank p aborted the call" (naming that rank) at the same moment.
            if r["outcome"] != "TimeoutError" or not ("MEGAMOE_TIMEOUT_S" in r["message"]
                                                      or "aborted the call" in r["message"]):
                problems.append(f"{where} (expected TimeoutError naming MEGAMOE_TIMEOUT_S or the aborting rank)")
        else:   # the late rank itself, and the survivors of a kill
            if r["outcome"] not in ("TimeoutError", "RuntimeError") or "mega_moe (rank" not in r["message"]:
                problems.append(f"{where} (expected TimeoutError or RuntimeError naming the collective)")
    if scenario == "late_double" and not problems and not any(
            "MEGAMOE_TIMEOUT_S" in o.value[scenario]["message"] for o in outcomes[:victim]):
        problems.append("no rank raised the timeout itself (only aborts)")
    return problems


@dataclass
class FaultReport:
    timeout_s: float
    num_ranks: int
    backend: str
    ep_backend: str = "auto"
    results: dict = field(default_factory=dict)   # scenario -> {"problems": [...], "ranks": [per-rank text]}
    seconds: float = 0.0

    @property
    def num_failures(self) -> int:
        return sum(1 for r in self.results.values() if r["problems"])

    def summary(self) -> str:
        lines = [f"fault injection: {self.num_ranks} ranks, {self.backend} group, buffer backend {self.ep_backend}, "
                 f"MEGAMOE_TIMEOUT_S "
                 f"{self.timeout_s:g}, {self.seconds:.1f} s"]
        for scenario, r in self.results.items():
            lines.append(f"  {scenario}: {'FAIL' if r['problems'] else 'ok'}")
            lines += [f"    {line}" for line in r["ranks"]]
            lines += [f"    problem: {p}" for p in r["problems"]]
        return "\n".join(lines)


def _describe_outcome(scenario: str, o: RankOutcome) -> str:
    if o.status != "returned":
        return f"rank {o.rank}: {o.status} (exit code {o.exitcode})"
    r = o.value.get(scenario)
    if r is None:
        return f"rank {o.rank}: did not reach it"
    first_line = r["message"].splitlines()[0][:160] if r["message"] else ""
    return f"rank {o.rank}: {r['outcome']} after {r['seconds']:.2f} s {first_line}"


def run_faults(num_ranks: int = 2, scenarios=DEFAULT_FAULTS, *, backend: str = "gloo", timeout_s: float = 3.0,
               tolerance: float = CONTRACT_RELATIVE_ERROR, workdir: str | Path | None = None,
               env_vars: dict | None = None, ep_backend: str = "auto") -> FaultReport:
    """The fault scenarios (module docstring), each judged by `judge_faults`.

    Scenarios of SHARED_GROUP_FAULTS run on one spawned group; every kill gets its own.
    backend "gloo" runs on the CPU, "nccl" on `num_ranks` GPUs; ep_backend is the buffers'
    backend ("auto": symm on GPUs of one node, nccl on the CPU).
    """
    unknown = set(scenarios) - set(FAULTS)
    if unknown:
        raise ValueError(f"scenarios: unknown {sorted(unknown)}; expected some of {FAULTS}")
    symm_only = set(scenarios) & set(SYMM_ONLY_FAULTS)
    if symm_only and ep_backend != "symm":
        raise ValueError(f"scenarios: {sorted(symm_only)} apply to ep_backend='symm' only, got {ep_backend!r}")
    if num_ranks < 2:
        raise ValueError(f"num_ranks: fault injection needs at least 2 ranks, got {num_ranks}")
    runs = [[s for s in SHARED_GROUP_FAULTS if s in scenarios]] + [[s] for s in scenarios if s.startswith("killed_")]
    report = FaultReport(timeout_s, num_ranks, backend, ep_backend)
    device_type = "cuda" if backend == "nccl" else "cpu"
    # Each process's own deadline: the scenarios' waits plus start-up, far from the timeouts judged.
    deadline = 120.0 + 6 * timeout_s * len(scenarios)
    begin = time.monotonic()
    with _workdir(workdir) as wd:
        for n, run in enumerate(r for r in runs if r):
            outcomes = spawn_ranks(_fault_rank, num_ranks, run, timeout_s, device_type, tolerance, ep_backend,
                                   workdir=wd / f"run{n}", backend=backend, env_vars=env_vars,
                                   deadline_s=deadline)
            for scenario in run:
                report.results[scenario] = {
                    "problems": judge_faults(scenario, outcomes, timeout_s, tolerance),
                    "ranks": [_describe_outcome(scenario, o) for o in outcomes]}
    report.seconds = time.monotonic() - begin
    return report


# ------------------------------------------------------------------ CUDA graphs

class _EagerReplay:
    """Stands in for a CUDA graph on the CPU (tests of the soak's bookkeeping): replays eagerly."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


GRAPH_BATCH_SIZES = (1, 7, 64, 256)
GRAPH_EXPERTS = 128


def graph_soak(replays: int = 10000, check_every: int = 100, batch_sizes=GRAPH_BATCH_SIZES, *,
               num_experts: int = GRAPH_EXPERTS,
               num_topk: int = 8, hidden: int = 2048, intermediate: int = 768, seed: int = 0,
               device: str | torch.device | None = None, tolerance: float = CONTRACT_RELATIVE_ERROR,
               mma: str = DEFAULT_MMA, progress=None) -> dict:
    """Capture pre_dispatch + mega_moe for each batch size on one buffer; replay them in turn.

    Replay j runs batch_sizes[j % len]. Every `check_every`-th replay first writes new random
    inputs into that graph's static tensors, runs the same call eagerly on the same buffer into
    another y, then replays: y must equal the eager y bitwise, and the reference within
    `tolerance`. recv_stats (captured) must equal the routed rows of every replay's inputs.
    Default shape: qwen3-30b-a3b; mma is the buffer's (MegaMoEBuffer). On a CPU device the
    "graphs" replay eagerly (harness tests).
    Returns {"replays", "checks", "failures" [text], "max_relative_error", "seconds"}.
    """
    device = torch.device(device) if device is not None else default_device()
    capture = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(seed)
    user_l1 = random_expert_weights(num_experts, 2 * intermediate, hidden, "fp8xfp4", gen)
    user_l2 = random_expert_weights(num_experts, hidden, intermediate, "fp8xfp4", gen)
    l1, l2 = transform_weights(user_l1, user_l2)
    buf = MegaMoEBuffer(num_experts, max(batch_sizes), num_topk, hidden, intermediate, device=device, mma=mma)
    geo = Geometry(num_experts, num_topk, hidden, intermediate, max(batch_sizes), "fp8xfp4", "ue8m0", 0)

    def fresh_inputs(tokens: int, version: int):
        case = StressCase(seed, version, geo, (tokens,), ("uniform", "skewed", "hot_expert")[version % 3],
                          (0.0, 0.5)[version % 2], version % num_experts, "swiglu", None, 1.0, torch.int32,
                          torch.float32, None, None, data_seed=seed * 1_000_003 + version)
        return [t.to(device) for t in make_inputs(case)[0]]

    graphs = []
    for n, tokens in enumerate(batch_sizes):
        x, idx, weights = fresh_inputs(tokens, n)
        y = torch.empty_like(x)
        stats = torch.zeros(num_experts, dtype=torch.int32, device=device)

        def run(x=x, idx=idx, weights=weights, y=y, stats=stats):
            pre_dispatch(x, idx, weights, buf)
            mega_moe(y, l1, l2, buf, recv_stats=stats)

        if capture:
            pre_dispatch(x, idx, weights, buf)           # compile outside capture
            mega_moe(y, l1, l2, buf)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
        else:
            graph = _EagerReplay(run)
        graphs.append({"graph": graph, "x": x, "idx": idx, "weights": weights, "y": y, "stats": stats,
                       "expected_stats": torch.zeros_like(stats), "tokens": tokens, "since_refresh": 0})

    def settle_stats(g):
        """Add the rows of the replays since the last refresh (counted once per input version:
        bincount synchronises with the host)."""
        ids = g["idx"].reshape(-1).long()
        g["expected_stats"] += torch.bincount(ids[ids >= 0], minlength=num_experts).int() * g["since_refresh"]
        g["since_refresh"] = 0

    failures, checks, max_err = [], 0, 0.0
    begin = time.monotonic()
    for j in range(replays):
        g = graphs[j % len(graphs)]
        if (j + 1) % check_every == 0:
            settle_stats(g)
            x, idx, weights = fresh_inputs(g["tokens"], len(graphs) + j)
            g["x"].copy_(x)
            g["idx"].copy_(idx)
            g["weights"].copy_(weights)
            eager = torch.full_like(x, float("nan"))
            pre_dispatch(g["x"], g["idx"], g["weights"], buf)
            mega_moe(eager, l1, l2, buf)
            g["y"].fill_(float("nan"))
            g["graph"].replay()
            ref = mega_moe_reference(x, idx, weights, user_l1, user_l2)
            err = relative_error(g["y"], ref)
            max_err = max(max_err, err)
            checks += 1
            if not _bitwise_equal(g["y"], eager):
                failures.append(f"replay {j} (T={g['tokens']}): differs from the eager call")
            if not err <= tolerance:
                failures.append(f"replay {j} (T={g['tokens']}): relative error {err:.3e} > {tolerance:g}")
        else:
            g["graph"].replay()
        g["since_refresh"] += 1
        if progress is not None and (j + 1) % 1000 == 0:
            progress(j + 1)
    if capture:
        torch.cuda.synchronize(device)
    for g in graphs:
        settle_stats(g)
        if not torch.equal(g["stats"], g["expected_stats"]):
            failures.append(f"T={g['tokens']}: recv_stats counted {g['stats'].sum().item()} rows, expected "
                            f"{g['expected_stats'].sum().item()}")
    buf.destroy()
    return {"replays": replays, "checks": checks, "failures": failures, "max_relative_error": max_err,
            "seconds": time.monotonic() - begin, "captured": capture}


# ------------------------------------------------------------------ large sizes

@dataclass(frozen=True)
class LargeCase:
    """One large problem; `why` names the intermediate that passes 2^31 elements."""

    name: str
    num_experts: int
    num_topk: int
    hidden: int
    intermediate: int
    tokens: int
    why: str


LARGE_CASES = (
    LargeCase("x-131072x16384", 8, 2, 16384, 256, 131072,
              "x and y are 2^31 elements, the combine rows [T*K, H] 2^32"),
    LargeCase("combine-v4-flash-65536", 256, 8, 4096, 2048, 65536,
              "the combine rows [T*K, H] are 2^31 elements; 524288 expert rows"),
)


def run_large(case: LargeCase, *, device: str | torch.device | None = None, chunk_tokens: int = 8192,
              tolerance: float = CONTRACT_RELATIVE_ERROR, seed: int = 0, mma: str = DEFAULT_MMA) -> dict:
    """One LargeCase at EP = 1: y against the reference chunk by chunk of tokens (so the float64
    oracle fits), the relative error of the whole and of the last chunk (where a 32-bit offset
    would wrap first), and pre_dispatch's last rows bitwise against quantize_fp8. mma is the
    buffer's (MegaMoEBuffer).
    """
    device = torch.device(device) if device is not None else default_device()
    gen = torch.Generator(device=device).manual_seed(seed)
    e, k, h, i, t = case.num_experts, case.num_topk, case.hidden, case.intermediate, case.tokens
    user_l1 = random_expert_weights(e, 2 * i, h, "fp8xfp4", gen)
    user_l2 = random_expert_weights(e, h, i, "fp8xfp4", gen)
    l1, l2 = transform_weights(user_l1, user_l2)
    x = torch.randn(t, h, generator=gen, device=device).bfloat16()
    scores = torch.rand(t, e, generator=gen, device=device)
    idx = scores.topk(k, dim=1).indices
    weights = torch.rand(t, k, generator=gen, device=device) + 0.05
    buf = MegaMoEBuffer(e, t, k, h, i, device=device, mma=mma)
    begin = time.monotonic()
    pre_dispatch(x, idx, weights, buf)
    y = torch.full_like(x, float("nan"))
    mega_moe(y, l1, l2, buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - begin
    tail = slice(t - 64, t)
    q, sf = quantize_fp8(x[tail])
    pre_dispatch_exact = bool(torch.equal(buf.x[tail].view(torch.uint8), q.view(torch.uint8))
                              and torch.equal(buf.x_sf[tail], sf))
    diff2 = ref2 = 0.0
    last_err = 0.0
    for lo in range(0, t, chunk_tokens):
        rows = slice(lo, min(t, lo + chunk_tokens))
        ref = mega_moe_reference(x[rows], idx[rows], weights[rows], user_l1, user_l2)
        got = y[rows].double()
        if not bool(torch.isfinite(got).all()):
            diff2 = float("inf")
        diff2 += float((got - ref).pow(2).sum())
        ref2 += float(ref.pow(2).sum())
        last_err = relative_error(y[rows], ref)
    buf.destroy()
    err = math.sqrt(diff2 / ref2) if ref2 > 0 else math.sqrt(diff2)
    return {"case": case.name, "why": case.why, "relative_error": err, "last_chunk_relative_error": last_err,
            "pre_dispatch_last_rows_exact": pre_dispatch_exact, "call_seconds": seconds,
            "ok": err <= tolerance and last_err <= tolerance and pre_dispatch_exact}


# ------------------------------------------------------------------ command line

def add_cli_arguments(p) -> None:
    """The options of `megamoe stress` (cli.py adds the subcommand)."""
    p.add_argument("--iterations", type=int, default=100, help="pressure-test iterations (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first iteration; replay one with --start I --iterations 1")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="size space of the random cases (default: gpu on a GPU, else cpu)")
    p.add_argument("--ranks", type=int, default=1, help="EP ranks, one spawned process each (gloo on the CPU, "
                                                          "nccl on GPUs)")
    p.add_argument("--ep-backend", choices=("auto", "symm", "nccl"), default="auto",
                   help="buffer backend with --ranks > 1 (default auto: symm on GPUs of one node, nccl on the CPU; "
                        "symm on the CPU needs TRITON_INTERPRET=1)")
    p.add_argument("--share-gpu", action="store_true",
                   help="with --ranks > 1 on a CUDA machine: every rank on GPU 0 (gloo group, symm buffers over "
                        "CUDA IPC), for one-GPU machines")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--mma", choices=MMAS, default=DEFAULT_MMA,
                   help=f"MegaMoEBuffer(mma=...) of the fp8xfp4 cases, also of --graphs and --large (default "
                        f"{DEFAULT_MMA}; fp8: FP8 MMAs in both GEMMs, fp16: exact products in both)")
    p.add_argument("--tolerance", type=float, default=CONTRACT_RELATIVE_ERROR,
                   help=f"relative error allowed against the reference (default {CONTRACT_RELATIVE_ERROR:g}, "
                        "the precision contract)")
    p.add_argument("--block-len", type=int, default=4, help="iterations that share one geometry and buffer")
    p.add_argument("--deadline", type=float, default=3600.0,
                   help="seconds each spawned rank may run before it dumps its stacks and exits (--ranks > 1)")
    p.add_argument("--faults", action="store_true", help="run the fault-injection scenarios instead")
    p.add_argument("--scenarios", default=",".join(DEFAULT_FAULTS), help=f"comma list of {', '.join(FAULTS)}")
    p.add_argument("--timeout", type=float, default=3.0, help="MEGAMOE_TIMEOUT_S for --faults (default 3)")
    p.add_argument("--graphs", action="store_true", help="CUDA-graph soak instead (GPU)")
    p.add_argument("--replays", type=int, default=10000)
    p.add_argument("--check-every", type=int, default=100)
    p.add_argument("--batch-sizes", type=_positive_ints, default=GRAPH_BATCH_SIZES,
                   help=f"--graphs: the captured batch sizes (default {','.join(map(str, GRAPH_BATCH_SIZES))})")
    p.add_argument("--experts", type=_positive_int, default=GRAPH_EXPERTS,
                   help=f"--graphs: experts of the soak's layer (default {GRAPH_EXPERTS}; 32 with batches of "
                        "1024 and up puts more than 32 rows on an expert: the prefill tiles)")
    p.add_argument("--large", action="store_true", help=f"large-size cases instead (GPU): "
                                                        f"{', '.join(c.name for c in LARGE_CASES)}")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None


def run_cli(args) -> int:
    """`megamoe stress`: exit status 0 when nothing failed."""
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    # DESIGN.md section 8: NVLink multicast stays off.
    nccl_env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"} if use_cuda else None
    if args.share_gpu and (args.ranks < 2 or not use_cuda or args.faults or args.graphs or args.large):
        raise ValueError("--share-gpu: only for the pressure test with --ranks > 1 on a CUDA device")
    if args.faults:
        report = run_faults(max(args.ranks, 2), [s for s in args.scenarios.split(",") if s], backend=backend,
                            timeout_s=args.timeout, tolerance=args.tolerance, env_vars=nccl_env,
                            ep_backend=args.ep_backend)
        print(report.summary())
        out, failed = asdict(report), report.num_failures
    elif args.graphs:
        result = graph_soak(args.replays, args.check_every, args.batch_sizes, num_experts=args.experts,
                            device=args.device, seed=args.seed, tolerance=args.tolerance, mma=args.mma,
                            progress=lambda n: print(f"  {n} replays", flush=True))
        how = "captured" if result["captured"] else "NOT captured: no CUDA device, replays run eagerly"
        print(f"CUDA-graph soak ({how}, mma {args.mma}): {result['replays']} replays, {result['checks']} compared "
              f"with eager, max relative error {result['max_relative_error']:.3e}, {result['seconds']:.1f} s, failures "
              f"{len(result['failures'])}")
        for f in result["failures"][:MAX_FAILURES_KEPT]:
            print(f"  {f}")
        out, failed = result, len(result["failures"])
    elif args.large:
        out = [run_large(case, device=args.device, tolerance=args.tolerance, mma=args.mma) for case in LARGE_CASES]
        for r in out:
            print(f"{r['case']} ({r['why']}): relative error {r['relative_error']:.3e}, last chunk "
                  f"{r['last_chunk_relative_error']:.3e}, pre_dispatch tail exact {r['pre_dispatch_last_rows_exact']}, "
                  f"call {r['call_seconds']:.2f} s: {'ok' if r['ok'] else 'FAIL'}")
        failed = sum(not r["ok"] for r in out)
    else:
        profile = args.profile or ("gpu" if use_cuda else "cpu")
        print(f"megamoe stress: {args.iterations} iterations from {args.start}, seed {args.seed}, profile {profile}, "
              f"{args.ranks} rank(s){f' ({args.ep_backend} backend)' if args.ranks > 1 else ''}"
              f"{' sharing GPU 0' if args.share_gpu else ''}, mma {args.mma}, "
              f"{'CUDA' if use_cuda else 'CPU'} "
              f"({'Triton interpreter' if env.triton_interpret() else 'kernels' if use_cuda else 'plain torch'})")
        every = max(1, args.iterations // 20)

        def progress(done, report):
            if done % every == 0:
                print(f"  {done} iterations, {report.num_failures} failures, {report.seconds:.0f} s", flush=True)

        if args.ranks > 1:
            report = run_stress_ranks(args.iterations, args.ranks, seed=args.seed, start=args.start, profile=profile,
                                      backend=backend, tolerance=args.tolerance, block_len=args.block_len,
                                      env_vars=nccl_env, deadline_s=args.deadline, ep_backend=args.ep_backend,
                                      mma=args.mma, share_gpu=args.share_gpu)
        else:
            report = run_stress(args.iterations, seed=args.seed, start=args.start, profile=profile,
                                device=args.device, tolerance=args.tolerance, block_len=args.block_len,
                                progress=progress, mma=args.mma)
        print(report.summary())
        out, failed = report.to_dict(), report.num_failures
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0 if failed == 0 else 1
