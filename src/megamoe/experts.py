"""The expert side of a MegaMoE call, shared by every communication backend.

`run_experts` takes a routing table of `num_entries` entries (expert ids, -1 = none), the
activation rows the entries read (entry i reads row i // entries_per_row), and writes one
BF16 output row per entry (entry i writes row i of `out`). In between, on the device with no
host sync: plan (rows per local expert, expert-sorted order), L1 grouped GEMM + activation +
requant, L2 grouped GEMM (+ bias). At EP = 1 the entries are (token, slot) pairs of the
buffer's own tokens; the NCCL backend passes the rows it received (one entry per row).

`run_experts_torch` is the same computation in plain torch (CPU tensors without the Triton
interpreter), with the kernels' rounding steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from . import env
from .formats import ue8m0_to_float
from .kernels.config import GemmConfig, fma_ahead, is_fma, is_wide, mix_on_gluon_kernels, pick_config
from .kernels.l1_swiglu import _l1_swiglu_kernel
from .kernels.l2 import _l2_kernel
from .kernels.launch import pdl_options
from .kernels import prefill_wgmma
from .kernels.plan import plan
from .kernels.rebase import rebase_rows
from .reference import apply_activation, exact_products, requantize_intermediate
from .weights import ExpertWeights


@dataclass(frozen=True)
class ExpertOptions:
    activation: str = "swiglu"            # "swiglu" or "gpt_oss"
    activation_clamp: float | None = None


def _tiling(which: str, num_entries: int, num_experts: int, width: int, quantized: bool,
            rows_hint: int | None = None, exact_gluon: bool = False):
    """(config, column tiles, launches) of a grouped GEMM writing `width` output columns.

    launches: (tile config, ROWS_ABOVE, ROWS_UP_TO, grid) of each kernel launch, in order. One,
    or with `fma_mix` a launch of the config's MMA tiles for the experts with more than fma_mix
    rows and one of FMA tiles for each smaller count (the kernels' ROWS_ABOVE, ROWS_UP_TO). Each
    grid covers the most row tiles the entries can need when each expert's rows are tiled separately
    (known on the host without a sync); programs past the real tiles exit at once. rows_hint,
    when given, picks the tile config instead of num_entries. exact_gluon: see `pick_config`.
    """
    cfg = pick_config(which, num_entries if rows_hint is None else rows_hint, num_experts, quantized, exact_gluon)
    if not quantized and (is_fma(cfg) or cfg.fma_mix):
        raise ValueError(f"{which} config: one- and two-row FMA tiles (block_m {cfg.block_m}, fma_mix "
                         f"{cfg.fma_mix}) exist in the fp8xfp4 mode only")
    if is_fma(cfg) and cfg.num_stages not in (1, 2):
        raise ValueError(f"{which} config: FMA tiles load 0 or 1 step ahead (num_stages 1 or 2), "
                         f"got num_stages {cfg.num_stages}")
    col_tiles = triton.cdiv(width, cfg.block_n)
    if cfg.fma_mix:
        # Experts with more than fma_mix rows: the MMA tiles (at most entries // (fma_mix + 1) such
        # experts, each with a partial tile); with one row: one-row FMA tiles; with two (fma_mix 2):
        # two-row FMA tiles.
        mix = cfg.fma_mix
        mma_rows = triton.cdiv(num_entries, cfg.block_m) + min(num_experts, num_entries // (mix + 1))
        launches = [(cfg, mix, 0, (mma_rows * col_tiles,))]
        if mix == 2:
            launches.append((GemmConfig(2, cfg.block_n, cfg.num_warps, 1), 1, 2,
                             (max(1, min(num_experts, num_entries // 2)) * col_tiles,)))
        launches.append((GemmConfig(1, cfg.block_n, cfg.num_warps, 1), 0, 1,
                         (max(1, min(num_experts, num_entries)) * col_tiles,)))
        return cfg, col_tiles, launches
    # Each expert's last tile may be partial: one more tile an expert with rows, except for
    # one-row tiles, which are never partial.
    partial = min(num_experts, num_entries) if cfg.block_m > 1 else 0
    row_tiles = triton.cdiv(num_entries, cfg.block_m) + partial
    return cfg, col_tiles, [(cfg, 0, 0, (row_tiles * col_tiles,))]


# Persistent programs under the Triton interpreter (CPU tests): a few, so that each loops.
INTERPRETER_PROGRAMS = 8
_resident_cache: dict = {}


def _resident_programs(kernel, args: tuple, kwargs: dict) -> int:
    """How many programs of this compiled kernel the GPU holds at once (registers, shared
    memory, threads per SM x SMs).

    A persistent grid of exactly that size runs every program from the start, each looping
    over the tiles: a larger grid queues programs behind the resident ones, which then run
    their tiles in later waves, and empty programs wait for free slots (8 programs an SM
    instead: the symm L1 at 1 / 8 / 128 tokens per rank 11% / 7% / 5% slower, 2 x H200,
    docs/PERF.md).
    """
    if env.triton_interpret():
        return INTERPRETER_PROGRAMS
    device = args[0].device
    key = (kernel.fn.__name__, device.index, tuple(sorted(kwargs.items())))
    if key not in _resident_cache:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()   # loads the binary: n_regs is known from here on
        props = torch.cuda.get_device_properties(device)
        # Registers a block may use: 64K on every Hopper SM, which is also the SM's file.
        regs_per_sm = triton.runtime.driver.active.utils.get_device_properties(device.index)["max_num_regs"]
        per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                                 regs_per_sm, props.shared_memory_per_multiprocessor,
                                 props.max_threads_per_multi_processor)
        _resident_cache[key] = per_sm * props.multi_processor_count
    return _resident_cache[key]


MAX_BLOCKS_PER_SM = 32


def programs_per_sm(regs_per_thread: int, num_warps: int, shared_bytes: int, regs_per_sm: int,
                    shared_per_sm: int, threads_per_sm: int) -> int:
    """Programs of a kernel one SM holds at once (at least 1): the tightest of its registers
    (allocated per warp, 256 at a time), shared memory (+ 1 KB the system reserves per block),
    threads, and Hopper's 32 blocks per SM."""
    regs_per_warp = -(-regs_per_thread * 32 // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_smem = shared_per_sm // (shared_bytes + 1024)
    by_threads = threads_per_sm // (num_warps * 32)
    return max(1, min(by_regs, by_smem, by_threads, MAX_BLOCKS_PER_SM))


def _without_pdl(kwargs: dict) -> dict:
    kwargs = dict(kwargs, PDL=False)
    kwargs.pop("launch_pdl", None)
    return kwargs


def _launch(kernel, grid: tuple, persistent: bool, args: tuple, kwargs: dict) -> None:
    """Launch `kernel`; a persistent one with at most as many programs as the GPU holds at once."""
    kwargs = dict(kwargs, PERSISTENT=persistent)
    if persistent:
        # Launched after its predecessor has finished (no PDL): the symm backend's persistent L1
        # and L2 with PDL were 2-7% slower at 64-128 tokens per rank (2 and 4 x H200, 2026-11-28,
        # docs/EP.md), for 2 us at one token and 2-3% at 4096.
        kwargs = _without_pdl(kwargs)
        grid = (min(grid[0], _resident_programs(kernel, args, kwargs)),)
    elif kwargs.get("PDL") and grid[0] < _resident_programs(kernel, args, _without_pdl(kwargs)):
        # A grid of less than one wave goes without PDL: launched early, its programs take the
        # slots that the kernel before frees first, up to a full SM each, instead of being spread
        # over every SM (gpt-oss-120b's L2 at one token, 225 programs: 25.6 us without PDL, 30.5
        # with, H200, docs/PERF.md).
        kwargs = _without_pdl(kwargs)
    kernel[grid](*args, **kwargs)


def run_experts(buf, routing: torch.Tensor, num_entries: int, entries_per_row: int, a: torch.Tensor,
                a_scales: torch.Tensor | None, route_weights: torch.Tensor, out: torch.Tensor, l1: ExpertWeights,
                l2: ExpertWeights, opts: ExpertOptions, recv_stats: torch.Tensor | None,
                rebased: tuple | None = None) -> None:
    """Launch plan, L1 and L2 for `num_entries` entries (see the module docstring).

    routing:       int32 [>= num_entries] global expert ids; ids of other ranks are skipped.
    a:             [rows, H] float8_e4m3fn (bfloat16 in bf16xbf16 mode) activation rows.
    a_scales:      float32 [>= rows, G4(H)] scale of each group of 32 of each row (like
                   buf.x_scales; `expand_scales` makes it from UE8M0 bytes); fp8 modes.
    route_weights: float32 [>= num_entries] routing weight of each entry.
    out:           bfloat16 [>= num_entries, H]; rows of skipped entries are not written.
    rebased:       None, or (rows, scales) shaped like `a`, `a_scales`: where L1's prefill tiles
                   get the rows rebased per 128 (see `launch_l1`); None rebases them in place.
    """
    for _, step in expert_steps(buf, routing, num_entries, entries_per_row, a, a_scales, route_weights, out, l1,
                                l2, opts, recv_stats, rebased):
        step()


def expert_steps(buf, routing, num_entries, entries_per_row, a, a_scales, route_weights, out, l1, l2, opts,
                 recv_stats, rebased=None) -> list[tuple[str, Callable[[], None]]]:
    """`run_experts`' kernels in order, as (stage name, launch) pairs (the stage breakdowns time
    growing prefixes of them)."""
    return [
        ("plan", lambda: plan(routing, num_entries, buf, recv_stats)),
        ("l1", lambda: launch_l1(buf, num_entries, entries_per_row, a, a_scales, route_weights, l1, opts,
                                 rebased=rebased)),
        ("l2", lambda: launch_l2(buf, num_entries, route_weights, out, l2)),
    ]


def expand_scales(sf_bytes: torch.Tensor, rows: int, groups: int, out: torch.Tensor) -> torch.Tensor:
    """UE8M0 exponent bytes [>= rows, >= groups] -> out[:rows, :groups] = 2^(e-127), float32.

    For backends that receive rows with their packed scales; returns `out`. No host sync.
    """
    out[:rows, :groups] = ue8m0_to_float(sf_bytes[:rows, :groups])
    return out


# In Triton's interpreter bf16 tiles are multiplied in fp32 (its bf16 dot is broken) and MXFP4
# is decoded without inline PTX; the kernels' UPCAST flag carries both choices.
def _upcast() -> bool:
    return env.triton_interpret()


def launch_l1(buf, num_entries, entries_per_row, a, a_scales, route_weights, l1: ExpertWeights,
              opts: ExpertOptions, *, gathered: bool = False, persistent: bool = False,
              rows_hint: int | None = None, rebased: tuple | None = None) -> None:
    """L1 + activation + requant of the planned rows into buf.inter / buf.inter_scales.

    gathered: `a`, `a_scales` and `route_weights` hold the rows in expert-sorted order (row i is
    sorted position i), as the symm backend's gather leaves them; otherwise entry
    sorted_rows[i] reads row entry // entries_per_row and weight route_weights[entry].
    persistent: num_entries is only a bound (the symm backend's received rows are counted on
    the device): the grid holds what fits on the GPU and each program loops over tiles.
    rows_hint, when given, picks the tile config instead of num_entries.
    Prefill tiles (`config.is_wide`) of FP8 rows first rebase them to one scale per 128 of K
    (kernels/rebase.py; the x scales are powers of two): into `rebased` = (rows, scales) when
    given (the local backend: buf.x stays as pre_dispatch wrote it), else in place (received
    rows, which only this call reads). On Hopper they then run kernels/prefill_wgmma.py's
    kernels where `prefill_wgmma.supported` says so; so does the MMA launch of a split GEMM on
    exact products (`config.mix_on_gluon_kernels`), on the rebased rows, while its FMA launches
    read the rows as they were.
    """
    hidden, inter, experts = buf.hidden, buf.intermediate, buf.num_local_experts
    quantized = buf.mode == "fp8xfp4"
    # bf16xbf16 has no weight scales and a layer may have no bias: the kernel never reads
    # these placeholder pointers then.
    placeholder = l1.w
    gluon = quantized and prefill_wgmma.supported(buf, gathered=gathered, persistent=persistent, remote=False)
    exact_gluon = gluon and exact_products(buf.mma, "l1")
    cfg, col_tiles, launches = _tiling("l1", num_entries, experts, inter, quantized, rows_hint,
                                       exact_gluon=exact_gluon)
    w_sf = l1.w_sf if quantized else placeholder
    a_scales = a_scales if quantized else placeholder
    a_per_step = quantized and is_wide(cfg)
    mix_on_gluon = exact_gluon and mix_on_gluon_kernels(cfg, num_entries, experts)
    if a_per_step or mix_on_gluon:
        dst, dst_scales = rebased if rebased is not None else (a, a_scales)
        # Gathered rows are counted on the device (expert_offsets[-1]); otherwise every entry
        # reads row entry // entries_per_row.
        rebase_rows(a, a_scales, dst, dst_scales, num_entries if gathered else num_entries // entries_per_row,
                    hidden, count=buf.expert_offsets[experts:] if gathered else None)
        if gluon:
            prefill_wgmma.launch_l1(buf, num_entries, entries_per_row, dst, dst_scales, route_weights, l1, opts,
                                    pdl_options(buf.device), rows_above=cfg.fma_mix)
            if a_per_step:
                return
            launches = launches[1:]   # the FMA tiles of the experts with fma_mix rows or fewer
        else:
            a, a_scales = dst, dst_scales
    wide = max(a_scales.numel(), buf.inter_scales.numel(), l1.w_sf.numel() if quantized else 0) >= 2**31
    args = (
        a, a_scales, a.stride(0), a_scales.stride(0),
        route_weights, buf.sorted_rows, buf.expert_offsets,
        l1.w, w_sf, l1.w.stride(0), l1.w.stride(1), w_sf.stride(0), w_sf.stride(1),
        l1.bias if l1.bias is not None else placeholder,
        buf.inter, buf.inter_scales, buf.inter_scales.stride(0),
        hidden, inter, experts, entries_per_row, col_tiles,
        float(opts.activation_clamp) if opts.activation_clamp is not None else 0.0,
    )
    for part, rows_above, rows_up_to, grid in launches:
        kwargs = dict(
            QUANTIZED=quantized, HAS_CLAMP=opts.activation_clamp is not None,
            INTER_SF_FP32=buf.intermediate_sf == "fp32",
            HAS_BIAS=l1.bias is not None, GPT_OSS=opts.activation == "gpt_oss", GATHERED=gathered,
            BLOCK_M=part.block_m, BLOCK_N=part.block_n, BLOCK_E=triton.next_power_of_2(experts),
            BLOCK_K=part.block_k, UPCAST=_upcast(), WIDE_SCALES=wide, F16_MMA=exact_products(buf.mma, "l1"),
            A_PER_STEP=a_per_step, FMA_AHEAD=fma_ahead(part), FMA_SPLIT=part.k_split, ROWS_ABOVE=rows_above,
            ROWS_UP_TO=rows_up_to,
            num_warps=part.num_warps, num_stages=part.num_stages,
            **_register_cap("l1", persistent and quantized, part), **pdl_options(buf.device),
        )
        _launch(_l1_swiglu_kernel, grid, persistent, args, kwargs)


# The persistent FP8 x MXFP4 tiles (symm backend) at 16 rows compile to more registers than the
# one-tile ones of EP = 1 (L1: about 230 a thread against 134; L2: 169-172 against 133), which
# leaves 2 programs per SM instead of 3. Capped, both get the third program back with no spill
# inside the K loop (a few spill stores per tile outside it; tools/inspect_kernels.py --symm,
# sm_90a). Measured: the symm L1 at 1 / 8 / 128 tokens per rank 60 / 253 / 784 us capped at 168,
# 67 / 298 / 895 uncapped (2 x H200, 2026-11-28, before v7). The persistent L2 on the rows of an
# EP = 1 call at 1 / 8 tokens: 30.8 / 166.9 us uncapped (264 programs on 132 SMs), 21.5 / 147.0
# capped at 168, 21.1 / 138.5 at 160, against 20.2-20.3 / 136.2-136.9 for the one-tile L2 (H100,
# 2026-11-28, docs/PERF.md). At 32 rows a cap would spill.
PERSISTENT_MAXNREG = {"l1": 168, "l2": 160}


def _register_cap(which: str, persistent: bool, cfg) -> dict:
    """Launch options capping a persistent FP8 x MXFP4 tile's registers (`which`: "l1" or "l2")."""
    cap = PERSISTENT_MAXNREG.get(which)
    if persistent and cap is not None and cfg.block_m == 16 and not _upcast():
        return {"maxnreg": cap}
    return {}


def launch_l2(buf, num_entries, route_weights, out, l2: ExpertWeights, *, gathered: bool = False,
              remote: tuple | None = None, persistent: bool = False, rows_hint: int | None = None) -> None:
    """L2 (+ bias) of the planned rows from buf.inter into `out`, one BF16 row per entry.

    gathered: route_weights are in expert-sorted order (see launch_l1).
    remote: None, or (peer_ptrs, out_offset, entries_per_rank) for the symm backend: entry
    r * entries_per_rank + e is written to row e of the bfloat16 table at byte offset
    out_offset of rank r's buffer (peer_ptrs: int64 base address of each rank's buffer); `out`
    is then unused.
    Prefill tiles (`config.is_wide`) first rebase buf.inter in place to one scale per 128 of K
    (kernels/rebase.py), with UE8M0 requant only: FP32 scales are not powers of two. On Hopper
    they then run kernels/prefill_wgmma.py's kernel where `prefill_wgmma.supported` says so; so
    does the MMA launch of a split GEMM on exact products (as in `launch_l1`; its FMA launches
    read the rebased rows).
    """
    hidden, inter, experts = buf.hidden, buf.intermediate, buf.num_local_experts
    quantized = buf.mode == "fp8xfp4"
    placeholder = l2.w
    # L2's Gluon kernels take rebased rows, which need powers of two for scales (UE8M0).
    gluon = (quantized and buf.intermediate_sf == "ue8m0"
             and prefill_wgmma.supported(buf, gathered=gathered, persistent=persistent, remote=remote is not None))
    exact_gluon = gluon and exact_products(buf.mma, "l2")
    cfg, col_tiles, launches = _tiling("l2", num_entries, experts, hidden, quantized, rows_hint,
                                       exact_gluon=exact_gluon)
    a_per_step = quantized and is_wide(cfg) and buf.intermediate_sf == "ue8m0"
    mix_on_gluon = exact_gluon and mix_on_gluon_kernels(cfg, num_entries, experts)
    if a_per_step or mix_on_gluon:
        # In place: the FMA tiles of a split GEMM read the rebased rows too (their scale table
        # keeps its layout, each step's four entries equal).
        rebase_rows(buf.inter, buf.inter_scales, buf.inter, buf.inter_scales, num_entries, inter,
                    count=buf.expert_offsets[experts:])
        if gluon:
            prefill_wgmma.launch_l2(buf, num_entries, route_weights, out, l2, pdl_options(buf.device),
                                    rows_above=cfg.fma_mix)
            if a_per_step:
                return
            launches = launches[1:]
    w_sf = l2.w_sf if quantized else placeholder
    peer_ptrs, out_offset, entries_per_rank = remote if remote is not None else (placeholder, 0, 1)
    if out is None:
        out = placeholder
    wide = max(buf.inter_scales.numel(), w_sf.numel()) >= 2**31
    args = (
        buf.inter, buf.inter_scales, buf.inter_scales.stride(0), buf.sorted_rows, buf.expert_offsets, route_weights,
        l2.w, w_sf, l2.w.stride(0), l2.w.stride(1), w_sf.stride(0), w_sf.stride(1),
        l2.bias if l2.bias is not None else placeholder,
        out, hidden, inter, experts, col_tiles, peer_ptrs, out_offset, entries_per_rank,
    )
    for part, rows_above, rows_up_to, grid in launches:
        kwargs = dict(
            QUANTIZED=quantized, HAS_BIAS=l2.bias is not None, GATHERED=gathered, REMOTE_OUT=remote is not None,
            BLOCK_M=part.block_m, BLOCK_N=part.block_n, BLOCK_E=triton.next_power_of_2(experts),
            BLOCK_K=part.block_k, UPCAST=_upcast(), WIDE_SCALES=wide, F16_MMA=exact_products(buf.mma, "l2"),
            A_PER_STEP=a_per_step, FMA_AHEAD=fma_ahead(part), FMA_SPLIT=part.k_split, ROWS_ABOVE=rows_above,
            ROWS_UP_TO=rows_up_to,
            num_warps=part.num_warps, num_stages=part.num_stages,
            **_register_cap("l2", persistent and quantized, part), **pdl_options(buf.device),
        )
        _launch(_l2_kernel, grid, persistent, args, kwargs)


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def run_experts_torch(buf, routing, num_entries, entries_per_row, a, a_scales, route_weights, out, l1, l2,
                      opts: ExpertOptions, recv_stats) -> None:
    """`run_experts` in plain torch with FP32 arithmetic and the kernels' rounding steps."""
    inter = buf.intermediate
    first = buf.rank * buf.num_local_experts
    ids = routing[:num_entries].long()
    rows = num_entries // entries_per_row
    if buf.mode == "fp8xfp4":
        groups = buf.hidden // 32
        scale = a_scales[:rows, :groups].repeat_interleave(32, dim=1)
        x = a[:rows].float() * scale
    else:
        x = a[:rows].float()
    counts = torch.zeros(buf.num_local_experts, dtype=torch.int32, device=out.device)
    for expert in range(buf.num_local_experts):
        entry = (ids == first + expert).nonzero().flatten()
        counts[expert] = entry.numel()
        if entry.numel() == 0:
            continue
        h = x[entry // entries_per_row] @ l1.dequantize(expert).T
        if l1.bias is not None:
            h = h + l1.bias[expert]
        h = _round_bf16(h)
        route = route_weights[entry].float().unsqueeze(1)
        act = apply_activation(h[:, :inter], h[:, inter:], opts.activation, opts.activation_clamp) * route
        if buf.mode == "fp8xfp4":
            act = requantize_intermediate(act, buf.intermediate_sf)
        else:
            act = _round_bf16(act)
        o = act @ l2.dequantize(expert).T
        if l2.bias is not None:
            o = o + route * l2.bias[expert]
        out[entry] = o.to(torch.bfloat16)
    if recv_stats is not None:
        recv_stats += counts
