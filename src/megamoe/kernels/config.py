"""Tile configurations of the grouped GEMMs: a deterministic heuristic with an override.

The heuristic looks at the average rows per local expert. Decode batches give each expert a
handful of rows, so the token side of the tile is as small as the tensor cores allow (16)
and many programs stream weights in parallel; prefill batches get 64-row tiles so each
decoded weight tile is reused by many tokens (128-row tiles, 256 weight rows a tile, 4 stages
and 4 warps were each slower on an H200, docs/PERF.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .. import env


@dataclass(frozen=True)
class GemmConfig:
    block_m: int      # rows (tokens) per tile: the N side of the MMA
    block_n: int      # output columns per tile (L1: intermediate columns, so 2x weight rows)
    num_warps: int
    num_stages: int
    block_k: int = 64  # bf16xbf16: K per loop step (the fp8xfp4 loop steps 128 of K)

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {value}")



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


NARROW_ROWS = 32
"""Row tiles of at most this many rows are decode tiles (`expert_mma.expert_rows_dot`: four
MMAs issued ahead, a promotion per group of 32); wider ones are prefill tiles, which read rows
rebased to one scale per 128 of K and promote once per step (`kernels/rebase.py`)."""


def is_wide(cfg: GemmConfig) -> bool:
    return cfg.block_m > NARROW_ROWS


INTERPRETER_CONFIG = GemmConfig(16, 64, 4, 1)
"""Under TRITON_INTERPRET the fewest, widest programs run fastest on the CPU; the tests force
the GPU configs' shapes (narrow tiles, several row tiles per expert) explicitly
(test_every_tile_config_path)."""


def pick_config(which: str, num_rows: int, num_local_experts: int) -> GemmConfig:
    """Config for `which` ("l1" or "l2") given the total rows routed to the local experts."""
    if which in _forced:
        return _forced[which]
    if env.triton_interpret():
        return INTERPRETER_CONFIG
    rows_per_expert = num_rows / max(num_local_experts, 1)
    # Decode tiles are memory-bound: narrow weight tiles make more programs to stream weights in
    # parallel (measured on an H200, docs/PERF.md). Wider row tiles reuse each decoded weight
    # tile for more tokens; 64 is the widest that fits the registers without spilling.
    if rows_per_expert <= 16:
        block_m, warps, stages = 16, 4, 4
        block_n = 32 if which == "l1" else 64
    elif rows_per_expert <= 32:
        block_m, warps, stages = 32, 4, 4
        block_n = 32 if which == "l1" else 64
    else:
        block_m, warps, stages = 64, 8, 3
        block_n = 64 if which == "l1" else 128
    return GemmConfig(block_m, block_n, warps, stages)
