"""Tile configurations of the grouped GEMMs: a deterministic heuristic with an override.

The heuristic looks at the average rows per local expert. Up to half a row an expert (decode
at 1-16 tokens) the FP8 x MXFP4 GEMMs run one-row FMA tiles on the FP32 units (at one token with
their K steps split over two groups of warps); up to three rows
an expert they split each GEMM by the experts' row counts (MMA tiles for the experts with three
rows or more, FMA tiles for the others); more rows an expert get MMA tiles whose token side is
as small as the tensor cores allow (16), so many programs stream weights in parallel; prefill
batches get 64-row tiles so each decoded weight tile is reused by many tokens (128-row tiles, 256
weight rows a tile, 4 stages and 4 warps were each slower on an H200, docs/PERF.md). GEMMs on
exact products that can run the Gluon kernels take those from three rows an expert on
(EXACT_GLUON_FROM), and for the experts with three rows or more of a split GEMM from one row an
expert on (EXACT_GLUON_MIX_FROM).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .. import env


FMA_ROWS = 2
"""Row tiles of at most this many rows are FMA tiles (`expert_mma.mxfp4_rows_fma`, FP8 x MXFP4
only): the weights are decoded and multiplied on the FP32 units, with no MMA. At one or two
rows an expert, an MMA tile multiplies mostly padding, and each step waits for its MMAs."""

NARROW_ROWS = 32
"""Row tiles of at most this many rows are decode tiles (`expert_mma.expert_rows_dot`: four
MMAs issued ahead, a promotion per group of 32); wider ones are prefill tiles, which read rows
rebased to one scale per 128 of K and promote once per step (`kernels/rebase.py`)."""


@dataclass(frozen=True)
class GemmConfig:
    block_m: int      # rows (tokens) per tile: the N side of the MMA; 1-2 for FMA tiles
    block_n: int      # output columns per tile (L1: intermediate columns, so 2x weight rows)
    num_warps: int
    num_stages: int
    block_k: int = 64  # bf16xbf16: K per loop step (the fp8xfp4 loop steps 128 of K)
    fma_mix: int = 0   # MMA decode tiles: experts with at most this many rows get FMA tiles of their row count
    k_split: int = 1   # FMA tiles: K cut into this many ranges, each run by num_warps / k_split warps of the program

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {value}")
        if self.block_m < 1 or self.block_m & (self.block_m - 1) or FMA_ROWS < self.block_m < 16:
            raise ValueError(f"GemmConfig.block_m: expected a power of two >= 16 (MMA tiles) or 1 to {FMA_ROWS} "
                             f"(FMA tiles), got {self.block_m}")
        if not 0 <= self.fma_mix <= FMA_ROWS:
            raise ValueError(f"GemmConfig.fma_mix: expected 0 to {FMA_ROWS}, got {self.fma_mix}")
        if self.fma_mix and not FMA_ROWS < self.block_m <= NARROW_ROWS:
            raise ValueError(f"GemmConfig.fma_mix: splits MMA decode tiles (block_m 16 to "
                             f"{NARROW_ROWS}), got block_m {self.block_m}")
        if self.k_split < 1 or self.k_split & (self.k_split - 1):
            raise ValueError(f"GemmConfig.k_split: expected a power of two >= 1, got {self.k_split}")
        if self.k_split > 1 and not self.block_m <= FMA_ROWS:
            raise ValueError(f"GemmConfig.k_split: splits the K steps of FMA tiles (block_m 1 to {FMA_ROWS}), "
                             f"got block_m {self.block_m}")
        if self.num_warps % self.k_split:
            raise ValueError(f"GemmConfig.num_warps: expected a multiple of k_split ({self.k_split}), "
                             f"got {self.num_warps}")



_forced: dict[str, GemmConfig] = {}


@contextlib.contextmanager
def force_config(**configs: GemmConfig):
    """Use the given configs (keys "l1", "l2") instead of the heuristic, e.g. in tests."""
    unknown = set(configs) - {"l1", "l2"}
    if unknown:
        raise ValueError(f"force_config: unknown keys {sorted(unknown)}; expected l1, l2")
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def is_wide(cfg: GemmConfig) -> bool:
    return cfg.block_m > NARROW_ROWS


def is_fma(cfg: GemmConfig) -> bool:
    return cfg.block_m <= FMA_ROWS


def fma_ahead(cfg: GemmConfig) -> bool:
    """FMA tiles with num_stages = 2 load each step's weights a step ahead (`FMA_AHEAD`). The
    heuristic's one-token config did until split K was faster (`FMA_SPLIT_UP_TO`); it stays an
    option for forced configs and the stage breakdowns (`--variants fma1s2`)."""
    return is_fma(cfg) and cfg.num_stages == 2


INTERPRETER_CONFIG = GemmConfig(16, 64, 4, 1)
"""Under TRITON_INTERPRET the fewest, widest programs run fastest on the CPU; the tests force
the GPU configs' shapes (narrow tiles, several row tiles per expert) explicitly
(test_every_tile_config_path)."""


FMA_UP_TO = 0.5
"""Average rows per local expert up to which the FP8 x MXFP4 GEMMs use one-row FMA tiles only.
Same run on an H200 (2026-12-02, docs/PERF.md), call us of the MMA decode tiles -> FMA tiles at 2 /
8 / 32 / 64 tokens: v4-flash (0.05 / 0.19 / 0.75 / 1.5 rows an expert) 108 -> 81, 363 -> 246,
1046 -> 874, 1603 -> 1752; gpt-oss-120b (0.06 / 0.25 / 1 / 2) 99 -> 71, 266 -> 181, 689 -> 600,
924 -> 1143. Two-row tiles were slower than one-row ones from 1 to 32 tokens. Up to 16 tokens
(0.375 / 0.5 rows an expert) they also beat the split launches below (run 8)."""

FMA_SPLIT_UP_TO = 1 / 32
"""... and up to which (one token) each FMA tile's K steps are split over two groups of four
warps (`GemmConfig.k_split`): the grids are less than a wave there (384 programs for v4-flash's
L1 on 132 SMs), so more warps a program put more bytes in flight. Same run on an H200
(2026-12-02, run 13, docs/PERF.md), call us at one token, loading each step's weights a step
ahead (num_stages = 2, the config before) -> split K in two: v4-flash 53.9 -> 48.9, gpt-oss-120b
46.0 -> 43.9; both together 55.5 and 45.3, split in four 52.2 and 46.9. At two tokens split K
in two was 2% slower for v4-flash (77.7 -> 79.3) and 4% faster for gpt-oss-120b (65.0 -> 62.1)."""

MIX_UP_TO = 3.0
"""... and up to which (above FMA_UP_TO) each GEMM is split by the experts' row counts
(`GemmConfig.fma_mix` = 2): MMA tiles for the experts with three rows or more, two- and one-row
FMA tiles for the others. Same run on an H200 (2026-12-02, runs 7 and 9, docs/PERF.md), call us
of MMA tiles -> split at 32 / 64 / 128 tokens: v4-flash (0.75 / 1.5 / 3 rows an expert) 1077 ->
818 (FMA tiles 878), 1591 -> 1305, 2023 -> 1910; gpt-oss-120b (1 / 2 / 4) 672 -> 552 (FMA
tiles 597), 897 -> 813, 1053 -> 1083."""


EXACT_GLUON_FROM = 3.0
"""Average rows per local expert above which a GEMM on exact products (FP16 MMAs, the buffer's
`mma`) takes a wide config where the Gluon kernels run (`exact_gluon`: `prefill_wgmma.supported`):
rebased rows on exact `_gemm` (16-token tiles) or `_gemm_t` (64 and 128), which beat the Triton
FP16 row tiles from there on. Same runs on an H200 (2026-12-03, runs 60 and 64, docs/PERF.md
v20-v21), L1 us of the Triton FP16 tiles -> the Gluon kernels: v4-flash at 256 / 1024 / 2048
tokens (6 / 24 / 48 rows an expert) 2177 -> 1770 (exact `_gemm`, run 64; the Triton tiles from
run 60), 3371 -> 2211, 3341 -> 2270 (`_gemm_t`, run 60); gpt-oss-120b at 1024 / 2048 (32 / 64)
2661 -> 1154, 1769 -> 1699 (run 60)."""


EXACT_GLUON_MIX_FROM = 1.0
"""... and average rows per local expert above which, in a split GEMM (`GemmConfig.fma_mix`: up
to MIX_UP_TO rows an expert), the MMA launch of an exact GEMM (the experts with three rows or
more) runs the Gluon kernels on rebased rows (exact `_gemm`, `prefill_wgmma.launch_l1`'s
rows_above) instead of the Triton FP16 row tiles; the FMA launches stay. Same run on an H200
(2026-12-03, run 66, docs/PERF.md v22), whole call us, fp16-l1, Triton tiles -> Gluon: v4-flash
at 32 / 64 / 128 tokens (0.75 / 1.5 / 3 rows an expert) 832 -> 841, 1419 -> 1383, 2292 -> 2144;
gpt-oss-120b at 32 / 64 (1 / 2) 587 -> 595, 938 -> 889. At one row an expert or fewer the few
experts with three rows do not pay for the rebase and the extra launch."""


def mix_on_gluon_kernels(cfg: GemmConfig, num_rows: int, num_local_experts: int) -> bool:
    """Whether the MMA launch of a split GEMM (`cfg.fma_mix`) over `num_rows` rows, on exact
    products that can run the Gluon kernels (`exact_gluon`), runs them (EXACT_GLUON_MIX_FROM)."""
    return cfg.fma_mix > 0 and num_rows / max(num_local_experts, 1) > EXACT_GLUON_MIX_FROM


def pick_config(which: str, num_rows: int, num_local_experts: int, quantized: bool = True,
                exact_gluon: bool = False) -> GemmConfig:
    """Config for `which` ("l1" or "l2") given the total rows routed to the local experts;
    `quantized`: the FP8 x MXFP4 mode (FMA tiles exist in it only); `exact_gluon`: the GEMM
    multiplies exact products and its wide tiles would run the Gluon kernels (EXACT_GLUON_FROM)."""
    if which in _forced:
        return _forced[which]
    if env.triton_interpret():
        return INTERPRETER_CONFIG
    rows_per_expert = num_rows / max(num_local_experts, 1)
    if quantized and rows_per_expert <= FMA_SPLIT_UP_TO:
        return GemmConfig(1, 32 if which == "l1" else 64, 8, 1, k_split=2)
    if quantized and rows_per_expert <= FMA_UP_TO:
        return GemmConfig(1, 32 if which == "l1" else 64, 4, 1)
    if quantized and rows_per_expert <= MIX_UP_TO:
        return GemmConfig(16, 32 if which == "l1" else 64, 4, 4, fma_mix=2)
    # Decode tiles are memory-bound: narrow weight tiles make more programs to stream weights in
    # parallel (measured on an H200, docs/PERF.md). Wider row tiles reuse each decoded weight
    # tile for more tokens; 64 is the widest that fits the registers without spilling. Exact
    # products on the Gluon kernels take the wide tiles from EXACT_GLUON_FROM rows an expert on.
    if rows_per_expert > 32 or (exact_gluon and rows_per_expert > EXACT_GLUON_FROM):
        block_m, warps, stages = 64, 8, 3
        block_n = 64 if which == "l1" else 128
    elif rows_per_expert <= 16:
        block_m, warps, stages = 16, 4, 4
        block_n = 32 if which == "l1" else 64
    else:
        block_m, warps, stages = 32, 4, 4
        block_n = 32 if which == "l1" else 64
    return GemmConfig(block_m, block_n, warps, stages)
