"""Prefill tiles on Hopper's asynchronous tensor cores (Gluon): L1 + SwiGLU + requant, and L2.

The Triton prefill tiles (`expert_mma.mxfp4_rows_dot`, A_PER_STEP) feed each decoded weight
tile to the tensor cores from registers, wait for every MMA, and promote each group of 32 on
its own; they ran at 11-12% of an H200's FP8 rate (docs/PERF.md, v12). These kernels, written
in Gluon (`triton.experimental.gluon`, explicit layouts, shared memory and wgmma), take the
same inputs (rows rebased to one scale per 128 of K, `kernels/rebase.py`) and change three things:

* The weight scales are folded into the decoded FP8 values. In each 128-wide step of a weight
  row, with m the largest of its four group exponents, group g decodes to
  round_e4m3(value * 2^(6 - (m - e_g))): the row's step becomes one FP8 matrix with one scale
  2^(m - 133), so a step is four chained k32 MMAs into one partial tile and one promotion
  (acc += tile * weight scale * activation scale). Exact while a row's groups of a step span at
  most 14 binades (6 * 2^6 = 384 fits e4m3, 0.5 * 2^-8 is its smallest subnormal); past that a
  value rounds to the nearest e4m3, an error of at most 2^-10 of 2^m (the rebase's bound for
  the activations). The decode looks each code's e4m3 magnitude up in an 8-entry table of its
  (row, group) with one `prmt` per four codes (FOLD_PTX); the table words are computed up to
  11 binades down and loaded past that (`_table_words`).
* The program (one warpgroup: 64 weight rows x up to 128 tokens) copies the step's activation
  rows (gathered through the sorted-row index where needed), scales and packed weight bytes
  into shared-memory rings with cp.async, STAGES steps ahead, and decodes the weights into
  shared memory, so both wgmma operands come from shared memory.
* The MMAs of step k run asynchronously while the program decodes step k + 1; then it waits
  for them and promotes. Two programs an SM overlap one's promotion with the other's MMAs.

Measured alone (tools/wgmma_prefill.py, H200, 2026-12-02, v4-flash at 4096 tokens, same run):
L1's GEMM 2654 us against the Triton L1 stage's 5480, L2's 1548 against 2586. In the layer
(2026-12-03, same run): v4-flash 4096 tokens 5.1 ms, 1.22x the torch BF16 pipeline (docs/PERF.md
run 17). Two warpgroups a program (NUM_WARPS = 8) and the warp-specialized core (`_gemm_ws`,
WARP_SPECIALIZED) are correct for every shape and were slower (docs/PERF.md, "The versions");
they stay as switches for the next attempts. Folding each row over all of K instead of per step
(one promotion FMA an element) was slower too (v18, 2026-12-03; a patch in docs/bench). Any H
and I (multiples of 32): the last program's rows past them are clamped and masked.

Exact products (`exact_products(buf.mma, gemm)`: L1 with mma="fp16-l1", both GEMMs with "fp16")
run `_gemm_t`: the same rings and decode, but the weights decode to FP16 (F16_PTX: the e2m1 bits
placed in an FP16, then one f16x2 multiply by the group's 2^(15 - d): exact down to 24 binades
below the step's largest group) and the roles of the operands swap. The activation rows (16
WARPS tokens, the wgmma's M side) go from the FP8 ring into registers as FP16, the register
operand of FP16 wgmma; the decoded weights (128 rows, the N side) are the shared operand. The
accumulator is [tokens, weight rows]; transposed, the epilogues are the FP8 kernels'. Measured
(H200, 2026-12-03, same run, v4-flash at 4096 tokens, docs/PERF.md v19): the core's L1 3256 us
against FP8's 3233, L2 1750 against 1826; in the layer, fp16-l1 5214 us against fp8 5123. With
few rows an expert (EXACT_SMALL_UP_TO) they run `_gemm` with EXACT instead: the FP16 weights
keep the M side, and each step's activation rows are converted into FP16 tiles in shared memory
for 16-token tiles on the N side (v21).

Used for the prefill tiles (`config.is_wide`) of the FP8 x MXFP4 mode on sm_90 when the rows
are not gathered and the output is local (EP = 1 and the nccl backend): `supported`. Exact
products take them from `config.EXACT_GLUON_FROM` (3) rows an expert on, faster there than the
Triton FP16 row tiles: up to EXACT_SMALL_UP_TO rows an expert on `_gemm` with 16-token tiles
(v21: the weights the M side, each step's activation rows converted to FP16 tiles in shared
memory), then on `_gemm_t` with 64-token tiles up to EXACT_NARROW_UP_TO (v20), 128 past it;
and in a GEMM split by the experts' row counts (one to three rows an expert,
`config.EXACT_GLUON_MIX_FROM`) exact `_gemm` for the experts with three rows or more (ROWS_ABOVE,
v22). MEGAMOE_WGMMA=0 keeps the Triton tiles (A/B runs). Gluon kernels do not run under the Triton
interpreter: the CPU tests cover the Triton tiles, the GPU tests these (tests/test_gpu.py,
tests/test_prefill_wgmma.py).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .. import env
from ..formats import E2M1_VALUES
from ..reference import exact_products
from .common import after_predecessor, quantize_groups_fp32, quantize_groups_ue8m0, round_to_bf16, ue8m0_to_fp32

NUM_WARPS = 4
"""Warps a program: 16 NUM_WARPS weight rows, the wgmma's M side (one warpgroup: 64 rows, L1's
32 gate and 32 up rows). The launchers read NUM_WARPS, ROWS_T and NUM_STAGES when they launch,
so an A/B script may set them (tools/wgmma_prefill.py times the core alone)."""
ROWS_T = 128
"""Tokens a program, the wgmma's N side: at prefill an expert has about 100-200 rows, so most
experts' weights are decoded once or twice (64 tokens: 30% slower, tools/wgmma_prefill.py)."""
NUM_STAGES = 4
EXACT_WARPS = 8
EXACT_ROWS_W = 128
EXACT_STAGES = 3
"""The exact-products kernels (`_gemm_t`): warps a program (16 EXACT_WARPS tokens a row tile),
weight rows a program (the wgmma's N side) and ring stages (docs/PERF.md, v19)..."""
EXACT_NARROW_WARPS = 4
EXACT_NARROW_STAGES = 2
EXACT_NARROW_UP_TO = 64
"""... and from EXACT_SMALL_UP_TO up to EXACT_NARROW_UP_TO average rows an expert, one warpgroup
of 64 tokens and two ring stages. Same run on an H200 (2026-12-03, run 60, docs/PERF.md v20), L1
us of 4 warps x 2 stages -> 8 warps x 3 stages at 6 / 24 / 48 rows an expert (v4-flash): 2174 ->
3297, 2211 -> 3320, 2270 -> 3342; at 64 (gpt-oss-120b, 2048 tokens) 1699 -> 1770; at 96
(v4-flash, 4096 tokens; the core alone, run 50) 4186 -> 3256."""
EXACT_SMALL_UP_TO = 12
EXACT_SMALL_TOKENS = 16
EXACT_SMALL_STAGES = 4
"""... and up to EXACT_SMALL_UP_TO average rows an expert, `_gemm` on exact products instead
(v21: weights the M side, EXACT_SMALL_TOKENS tokens the N side, both operands FP16 in shared
memory, NUM_WARPS warps, EXACT_SMALL_STAGES ring stages: 3 ran as fast, 2 (four programs an SM
instead of three) 1-5% slower on the whole call at 32-512 tokens, run 66). Same run on an H200
(2026-12-03, run 64, docs/PERF.md v21), L1 us of `_gemm_t` -> exact `_gemm` at 4 / 6 / 8 / 12
rows an expert: 1120 -> 886 (gpt-oss-120b, 128 tokens), 2158 -> 1770 (v4-flash, 256), 1132 ->
910 (gpt-oss-120b, 256), 2178 -> 1948 (v4-flash, 512); at 16 and 24 `_gemm_t` is faster: 1134
against 1300 with 32-token tiles (gpt-oss-120b, 512), 2198 against 2584 (v4-flash, 1024)."""
WARP_SPECIALIZED = False
"""Run `_gemm_ws` (one MMA warpgroup, four copy/decode warps; NUM_WARPS must be 4) instead of
`_gemm` (FP8 MMAs only; the exact-products kernels always run `_gemm_t` or exact `_gemm`)."""
WS_MAXNREG = 128
"""Registers a thread of a warp-specialized program (8 warps): two programs an SM."""
TABLE_ROWS = 24
"""Fold tables: row d for a group d binades below its step's largest (clamped: from 19 on every
entry rounds to zero)."""
LUT_ROWS = gl.constexpr(TABLE_ROWS)

FOLD_PTX = gl.constexpr("""{
        .reg .b32 t, u, s;
        and.b32 t, $2, 0x07070707;
        shr.b32 u, t, 4;
        or.b32 t, t, u;
        prmt.b32 s, t, t, 0x20;
        prmt.b32 t, $3, $4, s;
        shl.b32 u, $2, 4;
        and.b32 u, u, 0x80808080;
        or.b32 $0, t, u;
        shr.b32 t, $2, 4;
        and.b32 t, t, 0x07070707;
        shr.b32 u, t, 4;
        or.b32 t, t, u;
        prmt.b32 s, t, t, 0x20;
        prmt.b32 t, $5, $6, s;
        and.b32 u, $2, 0x80808080;
        or.b32 $1, t, u;
        }""")
"""Four packed bytes ($2) -> the e4m3 bytes of their low ($0) and high ($1) nibbles. Each
magnitude (3 bits) is looked up in its group's table words (low nibbles: $3, $4; high: $5, $6):
t | t >> 4 puts magnitudes i and i + 1 in one byte, so bytes 0 and 2 of it are the four
selector nibbles of `prmt`; the sign (bit 3 or 7 of each code) is or-ed in."""

# One output word of F16_PTX: two codes of `src` (the nibble at bit `shift` of each half's low
# byte: 0 the low nibble, 4 the high) to two FP16 values times `multiplier`.
_F16_PAIR_PTX = """
        shl.b32 t, {src}, {magnitude_shift};
        and.b32 t, t, 0x0E000E00;
        shl.b32 u, {src}, {sign_shift};
        and.b32 u, u, 0x80008000;
        or.b32 t, t, u;
        mul.rn.f16x2 {out}, t, {multiplier};"""
F16_PTX = gl.constexpr("""{
        .reg .b32 x, y, t, u, z;
        mov.b32 z, 0;
        prmt.b32 x, $4, z, 0x4140;
        prmt.b32 y, $4, z, 0x4342;""" + "".join(
    _F16_PAIR_PTX.format(out=out, src=src, magnitude_shift=9 - shift, sign_shift=12 - shift, multiplier=mult)
    for out, src, shift, mult in (("$0", "x", 0, "$5"), ("$1", "y", 0, "$5"), ("$2", "x", 4, "$6"),
                                  ("$3", "y", 4, "$6"))) + """
        }""")
"""Four packed bytes ($4) -> FP16 pairs: the low nibbles of bytes 0-1 ($0) and 2-3 ($1), the
high nibbles of bytes 0-1 ($2) and 2-3 ($3). `prmt` spreads two bytes to the two halves of a
word; a code's magnitude bits go to FP16 bits 9-11 (the exponent's two low bits and the
mantissa's top bit: the e2m1 value times 2^-14, code 1 a subnormal) and its sign to bit 15;
then each pair is multiplied by its group's power of two ($5 low nibbles, $6 high: 2^(15 - d)
as FP16 pairs, `_f16_multipliers`), exact while the result is an FP16 value."""


@functools.cache
def fold_table(device: torch.device) -> torch.Tensor:
    """int32 [TABLE_ROWS, 2]: row d holds the e4m3 bytes of the eight e2m1 magnitudes times
    2^(6 - d), rounded to nearest even, little-endian (word 0: codes 0-3, word 1: codes 4-7)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    d = torch.arange(TABLE_ROWS, dtype=torch.float32)
    values = mags[None, :] * torch.exp2(6.0 - d)[:, None]
    return values.to(torch.float8_e4m3fn).view(torch.uint8).contiguous().view(torch.int32).to(device)


def supported(buf, *, gathered: bool, persistent: bool, remote: bool) -> bool:
    """Whether the prefill GEMMs of `buf` (wide tiles on rebased rows) run these kernels (module
    docstring): FP8 MMAs on `_gemm`, exact products on `_gemm_t`. Any H and I (multiples of 32):
    the last program's rows past them are masked."""
    return (env.wgmma() and buf.mode == "fp8xfp4" and buf.device.type == "cuda"
            and not env.triton_interpret() and not gathered and not persistent and not remote
            and _is_sm90(buf.device.index or 0))


@functools.cache
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@gluon.jit
def _fold_decode(raw, l0, l1, h0, h1):
    """int32 words of packed bytes -> int32 words of the e4m3 bytes of their low and high
    nibbles (FOLD_PTX), the table words given per element (broadcast along a row)."""
    return gl.inline_asm_elementwise(
        asm=FOLD_PTX, constraints="=r,=r,r,r,r,r,r", args=[raw, l0, l1, h0, h1], dtype=(gl.int32, gl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _table_words(lut_ptr, top, e, like):
    """Row d = top - e of the fold table, broadcast along a row of `like`. Up to 11 binades
    down every nonzero entry is a normal e4m3 (2^(5 - d) and up), so the row is row 0 with d
    taken off each nonzero byte's exponent field (8 d): arithmetic, where a table load sat on
    the decode's critical path (the kernel's main stall, Nsight Compute, run 25). Further down
    (subnormals, rounding) the rows come from the table."""
    d = gl.minimum(top - e, LUT_ROWS - 1)
    near = d <= 11
    w0 = gl.where(near, 0x6C686000 - d * 0x08080800, gl.load(lut_ptr + 2 * d, mask=~near, other=0))
    w1 = gl.where(near, 0x7C787470 - d * 0x08080808, gl.load(lut_ptr + 2 * d + 1, mask=~near, other=0))
    w0, _ = gl.broadcast(w0[:, None], like)
    w1, _ = gl.broadcast(w1[:, None], like)
    return w0, w1


@gluon.jit
def _f16_decode(raw, m_lo, m_hi):
    """int32 words of packed bytes -> four int32 words of FP16 pairs (F16_PTX): low nibbles of
    bytes 0-1 and 2-3, high nibbles of bytes 0-1 and 2-3."""
    return gl.inline_asm_elementwise(
        asm=F16_PTX, constraints="=r,=r,=r,=r,r,r,r", args=[raw, m_lo, m_hi],
        dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)


@gluon.jit
def _f16_multipliers(top, e, like):
    """The FP16 pair (2^(15 - d), 2^(15 - d)), d = top - e binades below the step's largest
    group, broadcast along a row of `like`: normal up to d = 29, subnormal to 39, zero past it
    (where every decoded value would round to zero anyway)."""
    d = top - e
    half = gl.where(d <= 29, (30 - d) << 10, gl.where(d < 40, 1 << gl.minimum(gl.maximum(39 - d, 0), 9), 0))
    m, _ = gl.broadcast((half * 0x10001)[:, None], like)
    return m


@gluon.jit
def _f16_group_words(lo, hi):
    """[BW, 8] words of a group's FP16 pairs for bytes 0-1 (lo) and 2-3 (hi) of each packed
    word -> the group's [BW, 16] words in K order."""
    return gl.reshape(gl.join(lo, hi), [lo.shape[0], 2 * lo.shape[1]])


@gluon.jit
def _decode_step(w_words, d0, d1, d2, d3, ws_slot, lut_ptr, step, k_groups, RAW: gl.constexpr,
                 EXACT: gl.constexpr):
    """Decode one step's packed bytes (int32 view [BW, 16] of a ring slot) into FP8 in shared
    memory (d0-d3: int32 views [BW, 8] of the four groups' [BW, 32] e4m3 tiles), each row's
    scales (ws_slot: the step's bf16 scales read as int32 [BW, 2]) folded in. Groups past K
    (k_groups of them are real) are left out of the step's largest exponent: their scales are
    padding and their codes zero. Returns each row's largest group exponent (SliceLayout(1, RAW)).
    EXACT: into FP16 tiles instead (d0-d3: int32 views [BW, 16] of [BW, 32] FP16 tiles), group
    g decoding to value * 2^(1 - d): exact down to d = 24 binades below the step's largest."""
    # Word j of a row's step holds the bf16 scales of groups 2j (low half) and 2j + 1.
    w = ws_slot.load(RAW)
    j = gl.arange(0, 2, layout=gl.SliceLayout(0, RAW))[None, :]
    e_even = (w >> 7) & 0xFF
    e_odd = (w >> 23) & 0xFF
    e0 = _real_group(gl.sum(gl.where(j == 0, e_even, 0), axis=1), 4 * step, k_groups)
    e1 = _real_group(gl.sum(gl.where(j == 0, e_odd, 0), axis=1), 4 * step + 1, k_groups)
    e2 = _real_group(gl.sum(gl.where(j == 1, e_even, 0), axis=1), 4 * step + 2, k_groups)
    e3 = _real_group(gl.sum(gl.where(j == 1, e_odd, 0), axis=1), 4 * step + 3, k_groups)
    top = gl.maximum(gl.maximum(e0, e1), gl.maximum(e2, e3))
    # Chunk c (words 8c .. 8c + 7 of a row's 64 bytes, weights.py): byte j's low nibble is
    # element j of group 2c, its high nibble element j of group 2c + 1. Both chunks are loaded
    # before any store and each group's tile is an allocation of its own, so the compiler's
    # shared-memory hazard analysis puts no barrier between the stores.
    raw0 = w_words.slice(0, 8, dim=1).load(RAW)
    raw1 = w_words.slice(8, 8, dim=1).load(RAW)
    if EXACT:
        a0, b0, a1, b1 = _f16_decode(raw0, _f16_multipliers(top, e0, raw0), _f16_multipliers(top, e1, raw0))
        a2, b2, a3, b3 = _f16_decode(raw1, _f16_multipliers(top, e2, raw1), _f16_multipliers(top, e3, raw1))
        d0.store(_f16_group_words(a0, b0))
        d1.store(_f16_group_words(a1, b1))
        d2.store(_f16_group_words(a2, b2))
        d3.store(_f16_group_words(a3, b3))
    else:
        l0, l1 = _table_words(lut_ptr, top, e0, raw0)
        h0, h1 = _table_words(lut_ptr, top, e1, raw0)
        lo0, hi0 = _fold_decode(raw0, l0, l1, h0, h1)
        l0, l1 = _table_words(lut_ptr, top, e2, raw1)
        h0, h1 = _table_words(lut_ptr, top, e3, raw1)
        lo1, hi1 = _fold_decode(raw1, l0, l1, h0, h1)
        d0.store(lo0)
        d1.store(hi0)
        d2.store(lo1)
        d3.store(hi1)
    return top


@gluon.jit
def _real_group(e, group, k_groups):
    return gl.where(group < k_groups, e, 0)


@gluon.jit
def _find_tile(expert_offsets_ptr, num_experts, tile_id, BLOCK_E: gl.constexpr, BLOCK_T: gl.constexpr,
               WARPS: gl.constexpr, ROWS_ABOVE: gl.constexpr):
    """`common.find_expert_tile` with Gluon's explicit layouts: (expert, first row, end row) of
    row tile `tile_id` of BLOCK_T rows; expert = num_experts past the last tile. ROWS_ABOVE > 0:
    only the experts with more rows than that have tiles (the MMA launch of a split GEMM,
    `GemmConfig.fma_mix`)."""
    L: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    e = gl.arange(0, BLOCK_E, layout=L)
    ok = e < num_experts
    lo = gl.load(expert_offsets_ptr + e, mask=ok, other=0)
    hi = gl.load(expert_offsets_ptr + e + 1, mask=ok, other=0)
    tiles = (hi - lo + BLOCK_T - 1) // BLOCK_T
    if ROWS_ABOVE > 0:
        tiles = gl.where(hi - lo > ROWS_ABOVE, tiles, 0)
    tile_end = gl.associative_scan(tiles, 0, _add)
    expert = gl.sum((tile_end <= tile_id).to(gl.int32), axis=0)
    this = e == expert
    begin = gl.sum(gl.where(this, tile_end - tiles, 0), axis=0)
    row_start = gl.sum(gl.where(this, lo, 0), axis=0) + (tile_id - begin) * BLOCK_T
    row_end = gl.sum(gl.where(this, hi, 0), axis=0)
    return expert, row_start, row_end


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _allocate_rings(BLOCK_W: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, EXACT: gl.constexpr):
    """The cp.async rings (activation rows, their step scales, packed weight bytes, weight
    scales as int32 pairs) and the decoded weights, double-buffered: one [BLOCK_W, 32] tile per
    group of a step (FP16 when EXACT, else FP8)."""
    FP8_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    PLAIN_2D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    PLAIN_1D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_T, 128], FP8_SMEM)
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_T], PLAIN_1D)
    w_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_W, 64], PLAIN_2D)
    ws_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_W, 2], PLAIN_2D)
    if EXACT:
        decs = _group_tiles(gl.float16, BLOCK_W, 64)
    else:
        decs = _group_tiles(gl.float8e4nv, BLOCK_W, 32)
    return a_ring, s_ring, w_ring, ws_ring, decs


@gluon.jit
def _group_tiles(dtype: gl.constexpr, ROWS: gl.constexpr, ROW_BYTES: gl.constexpr):
    """Four double-buffered [ROWS, 32] wgmma operand tiles of `dtype` (ROW_BYTES a row, so
    ROW_BYTES / 4 bits an element), one allocation per scale group of a step (so the compiler
    puts no barrier between stores to different groups)."""
    SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=ROW_BYTES, element_bitwidth=ROW_BYTES // 4)
    tile: gl.constexpr = [2, ROWS, 32]
    return (gl.allocate_shared_memory(dtype, tile, SMEM), gl.allocate_shared_memory(dtype, tile, SMEM),
            gl.allocate_shared_memory(dtype, tile, SMEM), gl.allocate_shared_memory(dtype, tile, SMEM))


@gluon.jit
def _sources(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows_a, a_rows_s, ok_a, w_ptr, stride_w_tile, ws_ptr,
             stride_ws_n, w_rows_w, w_rows_ws, CP_A: gl.constexpr, CP_W: gl.constexpr, CP_WS: gl.constexpr):
    """Step 0's global addresses of the cp.async copies (`_copy_step` adds the step) and their
    masks: activation rows a_rows_* (ok_a: real rows), weight rows w_rows_* (all real)."""
    ak = gl.arange(0, 128, layout=gl.SliceLayout(0, CP_A))
    a_src = a_ptr + a_rows_a.to(gl.int64)[:, None] * stride_a + ak[None, :]
    a_ok, _ = gl.broadcast(ok_a[:, None], a_src)
    s_src = a_scale_ptr + a_rows_s.to(gl.int64) * stride_as
    wb = gl.arange(0, 64, layout=gl.SliceLayout(0, CP_W))
    w_src = w_ptr + (w_rows_w // 32).to(gl.int64)[:, None] * stride_w_tile + (w_rows_w % 32)[:, None] * 64 + wb[None, :]
    w_all = gl.full(w_src.shape, 1, gl.int1, CP_W)
    wq = gl.arange(0, 2, layout=gl.SliceLayout(0, CP_WS))
    ws_src = ws_ptr + w_rows_ws[:, None] * stride_ws_n + wq[None, :]
    ws_all = gl.full(ws_src.shape, 1, gl.int1, CP_WS)
    return a_src, a_ok, ak, s_src, w_src, w_all, ws_src, ws_all


@gluon.jit
def _decode_into(w_ring, ws_ring, decs, slot, buf, lut_ptr, step, k_groups, RAW: gl.constexpr,
                 EXACT: gl.constexpr):
    """`_decode_step` of ring slot `slot` (step `step`) into decode buffer `buf` of the four
    group tiles `decs`; returns the rows' largest group exponents."""
    dec0, dec1, dec2, dec3 = decs
    BLOCK_W: gl.constexpr = w_ring.shape[1]
    PLAIN_2D: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    # The tiles' bytes as int32 words, their swizzle unchanged (32 bytes a row for FP8, 64 for FP16).
    ROW_BYTES: gl.constexpr = 64 if EXACT else 32
    WORDS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=ROW_BYTES, element_bitwidth=32, rank=2)
    return _decode_step(w_ring.index(slot)._reinterpret(gl.int32, [BLOCK_W, 16], PLAIN_2D),
                        dec0.index(buf)._reinterpret(gl.int32, [BLOCK_W, ROW_BYTES // 4], WORDS),
                        dec1.index(buf)._reinterpret(gl.int32, [BLOCK_W, ROW_BYTES // 4], WORDS),
                        dec2.index(buf)._reinterpret(gl.int32, [BLOCK_W, ROW_BYTES // 4], WORDS),
                        dec3.index(buf)._reinterpret(gl.int32, [BLOCK_W, ROW_BYTES // 4], WORDS), ws_ring.index(slot),
                        lut_ptr, step, k_groups, RAW, EXACT)


@gluon.jit
def _step_mmas(a, b, acc):
    """A step's four chained MMAs a[g] @ b[g] (one a scale group) into a fresh partial tile (acc
    gives its shape and layout), issued asynchronously."""
    part = warpgroup_mma(a[0], b[0], acc, use_acc=False, is_async=True)
    part = warpgroup_mma(a[1], b[1], part, is_async=True)
    part = warpgroup_mma(a[2], b[2], part, is_async=True)
    return warpgroup_mma(a[3], b[3], part, is_async=True)


@gluon.jit
def _tiles_at(tiles, buf):
    """Buffer `buf` of each of four double-buffered group tiles (`_group_tiles`)."""
    return tiles[0].index(buf), tiles[1].index(buf), tiles[2].index(buf), tiles[3].index(buf)


@gluon.jit
def _transposed(t):
    """Each of four [rows, 32] tiles as [32, rows]: the K-major shared operand of a wgmma."""
    return t[0].permute((1, 0)), t[1].permute((1, 0)), t[2].permute((1, 0)), t[3].permute((1, 0))


@gluon.jit
def _fp8_operands(decs, cur, b):
    """`_gemm`'s operands of a step: the decoded weight tiles of buffer `cur` and, transposed,
    the four [BLOCK_T, 32] column groups of activation ring slot `b`."""
    return (_tiles_at(decs, cur),
            _transposed((b.slice(0, 32, dim=1), b.slice(32, 32, dim=1), b.slice(64, 32, dim=1),
                         b.slice(96, 32, dim=1))))


@gluon.jit
def _convert_into(a_ring, a16s, slot, buf, WARPS: gl.constexpr):
    """The FP8 activation rows of ring slot `slot` as FP16 (exact: every e4m3 value is an FP16
    value) into buffer `buf` of the four [BLOCK_T, 32] group tiles `a16s`, exact `_gemm`'s
    shared operands."""
    CVT: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [WARPS, 1], [1, 0])
    a = a_ring.index(slot)
    for g in gl.static_range(4):
        a16s[g].index(buf).store(a.slice(32 * g, 32, dim=1).load(CVT).to(gl.float16))


@gluon.jit
def _start(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows_a, a_rows_s, ok_a, ok_s, w_ptr, stride_w_tile, ws_ptr,
           stride_ws_n, w_rows_w, w_rows_ws, lut_ptr, k_size, CP_A: gl.constexpr, CP_W: gl.constexpr,
           CP_WS: gl.constexpr, RAW: gl.constexpr, BLOCK_W: gl.constexpr, BLOCK_T: gl.constexpr,
           STAGES: gl.constexpr, EXACT: gl.constexpr):
    """A GEMM core's prologue: allocate the rings (`_allocate_rings`), issue the copies of steps
    0 .. STAGES - 2 and decode step 0 into decode buffer 0. Returns the rings, the copies'
    sources (`_next_step`'s) and step 0's largest group exponents."""
    rings = _allocate_rings(BLOCK_W, BLOCK_T, STAGES, EXACT)
    a_ring, s_ring, w_ring, ws_ring, decs = rings
    a_src, a_ok, ak, s_src, w_src, w_all, ws_src, ws_all = _sources(
        a_ptr, stride_a, a_scale_ptr, stride_as, a_rows_a, a_rows_s, ok_a, w_ptr, stride_w_tile, ws_ptr, stride_ws_n,
        w_rows_w, w_rows_ws, CP_A, CP_W, CP_WS)
    steps = gl.cdiv(k_size, 128)
    for s in gl.static_range(STAGES - 1):
        _copy_step(a_ring.index(s), s_ring.index(s), w_ring.index(s), ws_ring.index(s), a_src, a_ok, ak, s_src,
                   ok_s, w_src, w_all, ws_src, ws_all, s, k_size, s < steps)
    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()
    top = _decode_into(w_ring, ws_ring, decs, 0, 0, lut_ptr, 0, k_size // 32, RAW, EXACT)
    fence_async_shared()
    return rings, (a_src, a_ok, ak, s_src, ok_s, w_src, w_all, ws_src, ws_all), top


@gluon.jit
def _next_step(rings, sources, step, steps, k_size, lut_ptr, k_groups, RAW: gl.constexpr, STAGES: gl.constexpr,
               EXACT: gl.constexpr):
    """What a GEMM core does while step `step`'s MMAs run: refill the ring slot step - 1 used
    (its MMAs were waited for, and the compiler puts a CTA barrier before these copies, after
    this program's reads of the slot) with step + STAGES - 1, then decode step + 1 into the
    other decode buffer (after the last step: a slot that nothing reads). Returns step + 1's
    largest group exponents."""
    a_ring, s_ring, w_ring, ws_ring, decs = rings
    a_src, a_ok, ak, s_src, ok_s, w_src, w_all, ws_src, ws_all = sources
    nxt = step + STAGES - 1
    fill = (step % STAGES + STAGES - 1) % STAGES
    _copy_step(a_ring.index(fill), s_ring.index(fill), w_ring.index(fill), ws_ring.index(fill), a_src, a_ok, ak,
               s_src, ok_s, w_src, w_all, ws_src, ws_all, nxt, k_size, nxt < steps)
    async_copy.wait_group(STAGES - 2)
    gl.thread_barrier()
    ntop = _decode_into(w_ring, ws_ring, decs, (step + 1) % STAGES, 1 - step % 2, lut_ptr, step + 1, k_groups, RAW,
                        EXACT)
    fence_async_shared()
    return ntop


@gluon.jit
def _gemm(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows, row_ok, w_ptr, stride_w_tile, ws_ptr, stride_ws_n,
          w_rows, lut_ptr, k_size, C: gl.constexpr, CP_A: gl.constexpr, CP_S: gl.constexpr, CP_W: gl.constexpr,
          CP_WS: gl.constexpr, WARPS: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
          EXACT: gl.constexpr):
    """acc [BLOCK_W, BLOCK_T] (layout C) = sum over K of W[w_rows] A[a_rows]^T with their
    scales, W the expert's MXFP4 weights (kernel layout, weights.py; ws_ptr its bf16 scales
    read as int32 pairs, so that cp.async moves at least 4 bytes whatever the row stride), A
    FP8 rows with one scale per step (a_scale_ptr: [rows, G4] fp32, the step's scale in each of
    its four entries). a_rows / row_ok: [BLOCK_T] in SliceLayout(1,
    CP_A) and in CP_S (pairs); w_rows: [BLOCK_W] in SliceLayout(1, CP_W) and SliceLayout(1,
    CP_WS) (pairs). WARPS (one warpgroup, or two: 64 or 128 weight rows), BLOCK_T and
    STAGES are parameters for tools/wgmma_prefill.py's variants.
    EXACT: exact products on the FP16 tensor cores (for tiles of few tokens: `_gemm_t` puts 64
    on the M side): the weights decode to FP16 and each step's activation rows are converted
    into FP16 tiles (`_convert_into`) beside the decode; C's instruction shape is then k16."""
    BLOCK_W: gl.constexpr = 16 * WARPS
    a_rows_a, a_rows_s = a_rows
    ok_a, ok_s = row_ok
    w_rows_w, w_rows_ws = w_rows
    ROWS_C: gl.constexpr = gl.SliceLayout(1, C)
    COLS_C: gl.constexpr = gl.SliceLayout(0, C)
    RAW: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [WARPS, 1], [1, 0])
    steps = gl.cdiv(k_size, 128)
    k_groups = k_size // 32

    rings, sources, top = _start(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows_a, a_rows_s, ok_a, ok_s, w_ptr,
                                 stride_w_tile, ws_ptr, stride_ws_n, w_rows_w, w_rows_ws, lut_ptr, k_size, CP_A,
                                 CP_W, CP_WS, RAW, BLOCK_W, BLOCK_T, STAGES, EXACT)
    a_ring, s_ring, decs = rings[0], rings[1], rings[4]
    if EXACT:
        a16s = _group_tiles(gl.float16, BLOCK_T, 64)
        _convert_into(a_ring, a16s, 0, 0, WARPS)
        fence_async_shared()
    # A row's step scale is 2^(top - BIAS): the FP8 fold's 2^6, the FP16 decode's 2^1.
    BIAS: gl.constexpr = 128 if EXACT else 133
    acc = gl.zeros([BLOCK_W, BLOCK_T], gl.float32, C)
    for step in range(steps):
        slot = step % STAGES
        cur = step % 2
        if EXACT:
            w_ops = _tiles_at(decs, cur)
            a_ops = _transposed(_tiles_at(a16s, cur))
        else:
            w_ops, a_ops = _fp8_operands(decs, cur, a_ring.index(slot))
        part = _step_mmas(w_ops, a_ops, acc)
        ntop = _next_step(rings, sources, step, steps, k_size, lut_ptr, k_groups, RAW, STAGES, EXACT)
        if EXACT:
            # Buffer 1 - cur was last read by the previous step's MMAs, waited for.
            _convert_into(a_ring, a16s, (step + 1) % STAGES, 1 - cur, WARPS)
            fence_async_shared()
        part = warpgroup_mma_wait(0, deps=[part])
        # The step's weight scale and activation scale; both powers of two.
        sw = gl.convert_layout(((gl.maximum(top, BIAS - 126) - (BIAS - 127)) << 23).to(gl.float32, bitcast=True),
                               ROWS_C)
        sa = s_ring.index(slot).load(COLS_C)
        acc += part * (sw[:, None] * sa[None, :])
        top = ntop
    async_copy.wait_group(0)
    return acc


@gluon.jit
def _gemm_t(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows, row_ok, w_ptr, stride_w_tile, ws_ptr, stride_ws_n,
            w_rows, lut_ptr, k_size, C: gl.constexpr, CP_A: gl.constexpr, CP_S: gl.constexpr, CP_W: gl.constexpr,
            CP_WS: gl.constexpr, WARPS: gl.constexpr, BLOCK_W: gl.constexpr, STAGES: gl.constexpr):
    """`_gemm` with exact products and the operands' roles swapped: acc [BLOCK_T, BLOCK_W]
    (layout C, BLOCK_T = 16 WARPS tokens on the wgmma's M side, BLOCK_W weight rows on its N
    side) = A[a_rows] W[w_rows]^T. Each step's activation rows go from the FP8 ring straight
    into registers as FP16 (the wgmma's register operand), so only the decoded FP16 weights are
    written to shared memory and read by the MMAs. Arguments as `_gemm`'s."""
    BLOCK_T: gl.constexpr = 16 * WARPS
    a_rows_a, a_rows_s = a_rows
    ok_a, ok_s = row_ok
    w_rows_w, w_rows_ws = w_rows
    TOK_C: gl.constexpr = gl.SliceLayout(1, C)
    W_C: gl.constexpr = gl.SliceLayout(0, C)
    DA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=C, k_width=2)
    RAW: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [WARPS, 1], [1, 0])
    steps = gl.cdiv(k_size, 128)
    k_groups = k_size // 32

    rings, sources, top = _start(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows_a, a_rows_s, ok_a, ok_s, w_ptr,
                                 stride_w_tile, ws_ptr, stride_ws_n, w_rows_w, w_rows_ws, lut_ptr, k_size, CP_A,
                                 CP_W, CP_WS, RAW, BLOCK_W, BLOCK_T, STAGES, True)
    a_ring, s_ring, decs = rings[0], rings[1], rings[4]
    acc = gl.zeros([BLOCK_T, BLOCK_W], gl.float32, C)
    for step in range(steps):
        slot = step % STAGES
        cur = step % 2
        # The step's activation rows: FP8 -> FP16 is exact (every e4m3 value is an FP16 value).
        b = a_ring.index(slot)
        x0 = b.slice(0, 32, dim=1).load(DA).to(gl.float16)
        x1 = b.slice(32, 32, dim=1).load(DA).to(gl.float16)
        x2 = b.slice(64, 32, dim=1).load(DA).to(gl.float16)
        x3 = b.slice(96, 32, dim=1).load(DA).to(gl.float16)
        part = _step_mmas((x0, x1, x2, x3), _transposed(_tiles_at(decs, cur)), acc)
        ntop = _next_step(rings, sources, step, steps, k_size, lut_ptr, k_groups, RAW, STAGES, True)
        part = warpgroup_mma_wait(0, deps=[part])
        # The weight scale 2^(top - 128) (the FP16 decode's 2^1) and the activation scale.
        sw = gl.convert_layout(((gl.maximum(top, 2) - 1) << 23).to(gl.float32, bitcast=True), W_C)
        sa = s_ring.index(slot).load(TOK_C)
        acc += part * (sa[:, None] * sw[None, :])
        top = ntop
    async_copy.wait_group(0)
    return acc


@gluon.jit
def _gemm_core(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows, row_ok, w_ptr, stride_w_tile, ws_ptr, stride_ws_n,
               w_rows, lut_ptr, k_size, C: gl.constexpr, CP_A: gl.constexpr, CP_S: gl.constexpr, CP_W: gl.constexpr,
               CP_WS: gl.constexpr, WARPS: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_W: gl.constexpr,
               STAGES: gl.constexpr, EXACT: gl.constexpr, TOKENS_M: gl.constexpr):
    """The kernels' GEMM core, acc [BLOCK_W, BLOCK_T]: `_gemm_t`'s accumulator transposed
    (TOKENS_M), else `_gemm`'s (FP8 MMAs, or exact products with EXACT). Arguments as `_gemm`'s."""
    if TOKENS_M:
        acc = gl.permute(_gemm_t(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows, row_ok, w_ptr, stride_w_tile,
                                 ws_ptr, stride_ws_n, w_rows, lut_ptr, k_size, C, CP_A, CP_S, CP_W, CP_WS, WARPS,
                                 BLOCK_W, STAGES), (1, 0))
    else:
        acc = _gemm(a_ptr, stride_a, a_scale_ptr, stride_as, a_rows, row_ok, w_ptr, stride_w_tile, ws_ptr,
                    stride_ws_n, w_rows, lut_ptr, k_size, C, CP_A, CP_S, CP_W, CP_WS, WARPS, BLOCK_T, STAGES, EXACT)
    return acc


@gluon.jit
def _gemm_ws(a_ptr, stride_a, a_scale_ptr, stride_as, rows_ptr, row_div, r0, r1, w_ptr, stride_w_tile, ws_ptr,
             stride_ws_n, w_first, w_limit, lut_ptr, k_size, C: gl.constexpr, GATHER: gl.constexpr,
             L1_ROWS: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr):
    """`_gemm` with its work split between two warpgroups (warp specialization): this program's
    warps (one warpgroup) issue each step's MMAs and promote; four more warps copy the steps
    into the rings and decode the weights, synchronised through mbarriers, so that a step's
    decode no longer sits between the MMAs of one step and the next. Activation rows: r0 ...
    r1 - 1, or (GATHER) rows_ptr[i] // row_div. Weight rows: L1_ROWS: `_l1_weight_row` of
    columns from w_first (w_limit = I), else w_first + j clamped below w_limit (= N)."""
    BLOCK_W: gl.constexpr = 64
    a_ring, s_ring, w_ring, ws_ring, decs = _allocate_rings(BLOCK_W, BLOCK_T, STAGES, False)
    tops = gl.allocate_shared_memory(gl.int32, [2, BLOCK_W], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    # decoded[b]: step k's decoded tiles (buffer b = k % 2), its top exponents and its ring
    # slot's activations and scales are in shared memory. mma_done[s]: the MMAs of the step in
    # ring slot s completed (its slot and its decode buffer may be rewritten).
    decoded = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mma_done = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(2):
        mbarrier.init(decoded.index(b), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(mma_done.index(s), count=1)
    rings = (a_ring, s_ring, w_ring, ws_ring, decs, tops)
    bars = (decoded, mma_done)
    steps = gl.cdiv(k_size, 128)
    (acc,) = gl.warp_specialize([
        (_ws_mma, (rings, bars, steps, C, BLOCK_T, STAGES)),
        (_ws_decode, (rings, bars, a_ptr, stride_a, a_scale_ptr, stride_as, rows_ptr, row_div, r0, r1, w_ptr,
                      stride_w_tile, ws_ptr, stride_ws_n, w_first, w_limit, lut_ptr, k_size, GATHER, L1_ROWS,
                      BLOCK_T, STAGES)),
    ], [4], [WS_DECODE_REGS])
    return acc


WS_DECODE_REGS = gl.constexpr(96)
"""Registers a thread of the decode warps (setmaxnreg); the MMA warps get the rest of the
kernel's maxnreg budget."""


@gluon.jit
def _ws_mma(rings, bars, steps, C: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr):
    """`_gemm_ws`'s MMA warpgroup: wait for a decoded step, four chained MMAs, wait for them,
    release the step's buffers, promote."""
    a_ring, s_ring, w_ring, ws_ring, decs, tops = rings
    decoded, mma_done = bars
    ROWS_C: gl.constexpr = gl.SliceLayout(1, C)
    COLS_C: gl.constexpr = gl.SliceLayout(0, C)
    acc = gl.zeros([64, BLOCK_T], gl.float32, C)
    for step in range(steps):
        slot = step % STAGES
        cur = step % 2
        mbarrier.wait(decoded.index(cur), (step // 2) & 1)
        b = a_ring.index(slot)
        w_ops, a_ops = _fp8_operands(decs, cur, b)
        part = _step_mmas(w_ops, a_ops, acc)
        top = tops.index(cur).load(ROWS_C)
        sa = s_ring.index(slot).load(COLS_C)
        part = warpgroup_mma_wait(0, deps=[part])
        mbarrier.arrive(mma_done.index(slot), count=1)
        sw = ((gl.maximum(top, 7) - 6) << 23).to(gl.float32, bitcast=True)
        acc += part * (sw[:, None] * sa[None, :])
    return (acc,)


@gluon.jit
def _ws_decode(rings, bars, a_ptr, stride_a, a_scale_ptr, stride_as, rows_ptr, row_div, r0, r1, w_ptr,
               stride_w_tile, ws_ptr, stride_ws_n, w_first, w_limit, lut_ptr, k_size, GATHER: gl.constexpr,
               L1_ROWS: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr):
    """`_gemm_ws`'s copy/decode warps: cp.async of each step into the rings (refilling a slot
    once its step's MMAs are done), then the step's decode into the free decode buffer."""
    a_ring, s_ring, w_ring, ws_ring, decs, tops = rings
    decoded, mma_done = bars
    BLOCK_W: gl.constexpr = 64
    CP_A: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    CP_S: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    CP_W: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
    CP_WS: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [4, 1], [1, 0])
    RAW: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [4, 1], [1, 0])
    TOP: gl.constexpr = gl.SliceLayout(1, RAW)
    steps = gl.cdiv(k_size, 128)
    k_groups = k_size // 32
    ra = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, CP_A))
    rs = r0 + gl.arange(0, BLOCK_T, layout=CP_S)
    ok_a = ra < r1
    ok_s = rs < r1
    if GATHER:
        src_a = gl.load(rows_ptr + ra, mask=ok_a, other=0) // row_div
        src_s = gl.load(rows_ptr + rs, mask=ok_s, other=0) // row_div
    else:
        src_a = ra
        src_s = rs
    jw = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_W))
    jws = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_WS))
    if L1_ROWS:
        w_rows_w = _l1_weight_row(jw, w_first, w_limit)
        w_rows_ws = _l1_weight_row(jws, w_first, w_limit)
    else:
        w_rows_w = gl.minimum(w_first + jw, w_limit - 1)
        w_rows_ws = gl.minimum(w_first + jws, w_limit - 1)
    a_src, a_ok, ak, s_src, w_src, w_all, ws_src, ws_all = _sources(
        a_ptr, stride_a, a_scale_ptr, stride_as, src_a, src_s, ok_a, w_ptr, stride_w_tile, ws_ptr, stride_ws_n,
        w_rows_w, w_rows_ws, CP_A, CP_W, CP_WS)
    for s in gl.static_range(STAGES):
        _copy_step(a_ring.index(s), s_ring.index(s), w_ring.index(s), ws_ring.index(s), a_src, a_ok, ak, s_src,
                   ok_s, w_src, w_all, ws_src, ws_all, s, k_size, s < steps)
    for step in range(steps):
        if step >= 2:
            # Step - 2's MMAs are done: its decode buffer (this step's) and its ring slot are
            # free; the slot takes step - 2 + STAGES.
            old = step - 2
            mbarrier.wait(mma_done.index(old % STAGES), (old // STAGES) & 1)
            nxt = old + STAGES
            fill = old % STAGES
            _copy_step(a_ring.index(fill), s_ring.index(fill), w_ring.index(fill), ws_ring.index(fill), a_src, a_ok,
                       ak, s_src, ok_s, w_src, w_all, ws_src, ws_all, nxt, k_size, nxt < steps)
        # Groups committed: STAGES + max(0, step - 1); this step's is number step.
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        slot = step % STAGES
        cur = step % 2
        top = _decode_into(w_ring, ws_ring, decs, slot, cur, lut_ptr, step, k_groups, RAW, False)
        tops.index(cur).store(gl.convert_layout(top, TOP))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(decoded.index(cur), count=1)
    async_copy.wait_group(0)


@gluon.jit
def _copy_step(a_slot, s_slot, w_slot, ws_slot, a_src, a_ok, ak, s_src, ok_s, w_src, w_all, ws_src, ws_all, step,
               k_size, more):
    """cp.async of step `step`'s activation rows (columns past K as zeros), their scales, the
    weight bytes and the weight scales into ring slots; one commit group (empty when not `more`)."""
    async_copy.async_copy_global_to_shared(a_slot, a_src + step * 128, mask=a_ok & more & (step * 128 + ak < k_size)[None, :])
    async_copy.async_copy_global_to_shared(s_slot, s_src + 4 * step, mask=ok_s & more)
    async_copy.async_copy_global_to_shared(w_slot, w_src + step * (32 * 64), mask=w_all & more)
    async_copy.async_copy_global_to_shared(ws_slot, ws_src + 2 * step, mask=ws_all & more)
    async_copy.commit_group()


@gluon.constexpr_function
def _accumulator_layout(warps, block_t, block_w, exact, tokens_m):
    """The wgmma accumulator of `warps` warps: `_gemm`, [16 warps weight rows, block_t tokens]
    of k32 instructions (FP8) or k16 (exact); `_gemm_t` (tokens_m), [16 warps tokens, block_w
    weight rows] of k16 instructions."""
    if tokens_m:
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_w, 16])
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                     instr_shape=[16, block_t, 16 if exact else 32])


@gluon.jit
def _l1_kernel(a_ptr, stride_a, a_scale_ptr, stride_as, topk_weights_ptr, sorted_rows_ptr, expert_offsets_ptr,
               w_ptr, stride_w_e, stride_w_tile, ws_ptr, stride_ws_e, stride_ws_n, bias_ptr, lut_ptr,
               inter_ptr, inter_scale_ptr, stride_is_m, hidden, inter, num_experts, num_topk, clamp,
               HAS_CLAMP: gl.constexpr, INTER_SF_FP32: gl.constexpr, HAS_BIAS: gl.constexpr, GPT_OSS: gl.constexpr,
               BLOCK_E: gl.constexpr, PDL: gl.constexpr, WARPS: gl.constexpr, BLOCK_T: gl.constexpr,
               BLOCK_W: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, EXACT: gl.constexpr,
               TOKENS_M: gl.constexpr, ROWS_ABOVE: gl.constexpr):
    """Program (n, t): intermediate columns BLOCK_W / 2 n ... (BLOCK_W / 2 of them) of row tile t
    (BLOCK_T rows). Its BLOCK_W weight rows interleave gate and up rows in blocks of 8 (tile row 16 b + i: gate row
    8 b + i for i < 8, up row 8 b + i - 8 otherwise), so that in the wgmma accumulator each
    thread holds a column's gate and up (rows r and r + 8) and the SwiGLU needs no data movement.
    EXACT: exact products; TOKENS_M: on `_gemm_t` (BLOCK_T = 16 WARPS; its accumulator holds the
    weight rows on the N side, and there too a thread holds columns c and c + 8), else on `_gemm`
    (BLOCK_W = 16 WARPS, as with FP8 MMAs). ROWS_ABOVE: as `_find_tile`'s."""
    C: gl.constexpr = _accumulator_layout(WARPS, BLOCK_T, BLOCK_W, EXACT, TOKENS_M)
    CP_A: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [WARPS, 1], [1, 0])
    CP_S: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    CP_W: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    CP_WS: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [WARPS, 1], [1, 0])
    after_predecessor(PDL)
    expert, r0, r1 = _find_tile(expert_offsets_ptr, num_experts, gl.program_id(1), BLOCK_E, BLOCK_T, WARPS,
                                ROWS_ABOVE)
    if expert < num_experts:
        COLS: gl.constexpr = BLOCK_W // 2
        GROUPS: gl.constexpr = COLS // 32
        col0 = gl.program_id(0) * COLS
        e64 = expert.to(gl.int64)
        # Entry sorted_rows[i] reads token row entry // num_topk (rows past the tile: row 0, masked).
        if WS:
            acc = _gemm_ws(a_ptr, stride_a, a_scale_ptr, stride_as, sorted_rows_ptr, num_topk, r0, r1,
                           w_ptr + e64 * stride_w_e, stride_w_tile, ws_ptr + e64 * stride_ws_e, stride_ws_n, col0,
                           inter, lut_ptr, hidden, C, True, True, BLOCK_T, STAGES)
        else:
            ra = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, CP_A))
            rs = r0 + gl.arange(0, BLOCK_T, layout=CP_S)
            src_a = gl.load(sorted_rows_ptr + ra, mask=ra < r1, other=0) // num_topk
            src_s = gl.load(sorted_rows_ptr + rs, mask=rs < r1, other=0) // num_topk
            jw = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_W))
            jws = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_WS))
            w_rows = (_l1_weight_row(jw, col0, inter), _l1_weight_row(jws, col0, inter))
            acc = _gemm_core(a_ptr, stride_a, a_scale_ptr, stride_as, (src_a, src_s), (ra < r1, rs < r1),
                             w_ptr + e64 * stride_w_e, stride_w_tile, ws_ptr + e64 * stride_ws_e, stride_ws_n,
                             w_rows, lut_ptr, hidden, C, CP_A, CP_S, CP_W, CP_WS, WARPS, BLOCK_T, BLOCK_W, STAGES,
                             EXACT, TOKENS_M)
        if HAS_BIAS:
            ACC: gl.constexpr = gl.constexpr(acc.type.layout)
            jc = gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, ACC))
            acc += gl.load(bias_ptr + e64 * 2 * inter + _l1_weight_row(jc, col0, inter))[:, None]
        # [W, T] -> [W / 16 blocks, 2 (gate, up), 8, T] -> gate, up [W / 2, T] (column 8 block + i).
        gate, up = gl.split(gl.permute(gl.reshape(acc, [BLOCK_W // 16, 2, 8, BLOCK_T]), (0, 2, 3, 1)))
        gate = round_to_bf16(gl.reshape(gate, [COLS, BLOCK_T]))
        up = round_to_bf16(gl.reshape(up, [COLS, BLOCK_T]))
        if HAS_CLAMP:
            gate = gl.minimum(gate, clamp)
            up = gl.minimum(gl.maximum(up, -clamp), clamp)
        if GPT_OSS:
            act = gate / (1.0 + gl.exp(-1.702 * gate)) * (up + 1.0)
        else:
            act = gate / (1.0 + gl.exp(-gate)) * up
        ACT: gl.constexpr = gl.constexpr(act.type.layout)
        rows = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, ACT))
        row_ok = rows < r1
        entry = gl.load(sorted_rows_ptr + rows, mask=row_ok, other=0)
        act = act * gl.load(topk_weights_ptr + entry, mask=row_ok, other=0.0)[None, :]
        cols = col0 + gl.arange(0, COLS, layout=gl.SliceLayout(1, ACT))
        out_ptrs = inter_ptr + rows.to(gl.int64)[None, :] * inter + cols[:, None]
        out_ok = row_ok[None, :] & (cols < inter)[:, None]
        grouped = gl.reshape(act, [GROUPS, 32, BLOCK_T])
        if INTER_SF_FP32:
            q, scale = quantize_groups_fp32(grouped)
        else:
            q, exponent = quantize_groups_ue8m0(grouped)
            scale = ue8m0_to_fp32(exponent)
        SF: gl.constexpr = gl.constexpr(scale.type.layout)
        sf_rows = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, SF))
        sf_groups = gl.program_id(0) * GROUPS + gl.arange(0, GROUPS, layout=gl.SliceLayout(1, SF))
        sf_ptrs = inter_scale_ptr + sf_rows.to(gl.int64)[None, :] * stride_is_m + sf_groups[:, None]
        gl.store(sf_ptrs, scale, mask=(sf_rows < r1)[None, :] & (sf_groups < inter // 32)[:, None])
        gl.store(out_ptrs, gl.convert_layout(gl.reshape(q, [COLS, BLOCK_T]), ACT).to(gl.float8e4nv), mask=out_ok)


@gluon.jit
def _l1_weight_row(j, col0, inter):
    """L1 weight row of tile row j (see `_l1_kernel`); columns past I (when the program's
    columns run past it) read column I - 1, and their results are not stored."""
    within = j % 16
    return gl.minimum(col0 + (j // 16) * 8 + within % 8, inter - 1) + (within // 8) * inter


@gluon.jit
def _l2_kernel(inter_ptr, inter_scale_ptr, stride_is_m, sorted_rows_ptr, expert_offsets_ptr, topk_weights_ptr,
               w_ptr, stride_w_e, stride_w_tile, ws_ptr, stride_ws_e, stride_ws_n, bias_ptr, lut_ptr, out_ptr,
               hidden, inter, num_experts, HAS_BIAS: gl.constexpr, BLOCK_E: gl.constexpr, PDL: gl.constexpr,
               WARPS: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_W: gl.constexpr, STAGES: gl.constexpr,
               WS: gl.constexpr, EXACT: gl.constexpr, TOKENS_M: gl.constexpr, ROWS_ABOVE: gl.constexpr):
    """Program (n, t): hidden columns n BLOCK_W ... (BLOCK_W of them) of row tile t; row i of
    the sorted intermediate rows goes to combine row sorted_rows[i] (as `l2._l2_tile`). EXACT,
    TOKENS_M, ROWS_ABOVE: as `_l1_kernel`'s."""
    C: gl.constexpr = _accumulator_layout(WARPS, BLOCK_T, BLOCK_W, EXACT, TOKENS_M)
    CP_A: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [WARPS, 1], [1, 0])
    CP_S: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    CP_W: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [WARPS, 1], [1, 0])
    CP_WS: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [WARPS, 1], [1, 0])
    after_predecessor(PDL)
    expert, r0, r1 = _find_tile(expert_offsets_ptr, num_experts, gl.program_id(1), BLOCK_E, BLOCK_T, WARPS,
                                ROWS_ABOVE)
    if expert < num_experts:
        n0 = gl.program_id(0) * BLOCK_W
        e64 = expert.to(gl.int64)
        # Weight rows past H (the last program's, when H is not a multiple of BLOCK_W) read row
        # H - 1; their results are not stored.
        if WS:
            acc = _gemm_ws(inter_ptr, inter, inter_scale_ptr, stride_is_m, sorted_rows_ptr, 1, r0, r1,
                           w_ptr + e64 * stride_w_e, stride_w_tile, ws_ptr + e64 * stride_ws_e, stride_ws_n, n0,
                           hidden, lut_ptr, inter, C, False, False, BLOCK_T, STAGES)
        else:
            ra = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, CP_A))
            rs = r0 + gl.arange(0, BLOCK_T, layout=CP_S)
            w_rows = (gl.minimum(n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_W)), hidden - 1),
                      gl.minimum(n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, CP_WS)), hidden - 1))
            acc = _gemm_core(inter_ptr, inter, inter_scale_ptr, stride_is_m, (ra, rs), (ra < r1, rs < r1),
                             w_ptr + e64 * stride_w_e, stride_w_tile, ws_ptr + e64 * stride_ws_e, stride_ws_n,
                             w_rows, lut_ptr, inter, C, CP_A, CP_S, CP_W, CP_WS, WARPS, BLOCK_T, BLOCK_W, STAGES,
                             EXACT, TOKENS_M)
        ACC: gl.constexpr = gl.constexpr(acc.type.layout)
        rows = r0 + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, ACC))
        row_ok = rows < r1
        dst = gl.load(sorted_rows_ptr + rows, mask=row_ok, other=0).to(gl.int64)
        cols = n0 + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(1, ACC))
        if HAS_BIAS:
            # The routing weight was folded into L2's input, so the bias gets it here.
            route_w = gl.load(topk_weights_ptr + dst, mask=row_ok, other=0.0)
            acc += gl.load(bias_ptr + e64 * hidden + gl.minimum(cols, hidden - 1))[:, None] * route_w[None, :]
        out_ptrs = out_ptr + dst[None, :] * hidden + cols[:, None]
        gl.store(out_ptrs, round_to_bf16(acc).to(gl.bfloat16), mask=row_ok[None, :] & (cols < hidden)[:, None])


def _grid(num_entries: int, num_experts: int, columns: int, per_program: int, block_t: int,
          rows_above: int) -> tuple:
    # Each expert's last row tile may be partial: at most one more tile an expert with rows (with
    # more than rows_above rows: at most num_entries // (rows_above + 1) such experts).
    partial = min(num_experts, num_entries // (rows_above + 1))
    return (triton.cdiv(columns, per_program), triton.cdiv(num_entries, block_t) + partial)


def _shape_args(experts: int, exact: bool, num_entries: int) -> dict:
    """Launch parameters from the module's switches (read at each launch, for A/B scripts).
    The exact-products kernels run `_gemm_t` (no warp specialization) with the EXACT_* shape,
    or the EXACT_NARROW_* one up to EXACT_NARROW_UP_TO rows an expert, or up to
    EXACT_SMALL_UP_TO rows an expert `_gemm` with EXACT_SMALL_TOKENS tokens a tile."""
    ws = WARP_SPECIALIZED and not exact
    if ws and NUM_WARPS != 4:
        raise ValueError(f"prefill_wgmma: WARP_SPECIALIZED needs NUM_WARPS = 4, not {NUM_WARPS}")
    mean = num_entries / max(experts, 1)
    tokens_m = exact and mean > EXACT_SMALL_UP_TO
    if tokens_m:
        narrow = mean <= EXACT_NARROW_UP_TO
        warps, stages = (EXACT_NARROW_WARPS, EXACT_NARROW_STAGES) if narrow else (EXACT_WARPS, EXACT_STAGES)
        block_t, block_w = 16 * warps, EXACT_ROWS_W
    else:
        warps, stages = NUM_WARPS, (EXACT_SMALL_STAGES if exact else NUM_STAGES)
        block_t, block_w = (EXACT_SMALL_TOKENS if exact else ROWS_T), 16 * warps
    return dict(BLOCK_E=triton.next_power_of_2(max(experts, 32 * warps)), WARPS=warps, BLOCK_T=block_t,
                BLOCK_W=block_w, STAGES=stages, num_warps=warps, WS=ws, EXACT=exact, TOKENS_M=tokens_m,
                **(dict(maxnreg=WS_MAXNREG) if ws else {}))


def launch_l1(buf, num_entries, entries_per_row, a, a_scales, route_weights, l1, opts, pdl: dict,
              rows_above: int = 0) -> None:
    """`experts.launch_l1` for prefill on these kernels; `a`, `a_scales` already rebased.
    rows_above > 0: only the experts with more rows than that (`GemmConfig.fma_mix`)."""
    experts = buf.num_local_experts
    placeholder = l1.w
    shape = _shape_args(experts, exact_products(buf.mma, "l1"), num_entries)
    _l1_kernel[_grid(num_entries, experts, buf.intermediate, shape["BLOCK_W"] // 2, shape["BLOCK_T"], rows_above)](
        a, a.stride(0), a_scales, a_scales.stride(0), route_weights, buf.sorted_rows, buf.expert_offsets,
        l1.w, l1.w.stride(0), l1.w.stride(1), l1.w_sf.view(torch.int32), l1.w_sf.stride(0) // 2, l1.w_sf.stride(1) // 2,
        l1.bias if l1.bias is not None else placeholder, fold_table(buf.device),
        buf.inter, buf.inter_scales, buf.inter_scales.stride(0), buf.hidden, buf.intermediate, experts,
        entries_per_row, float(opts.activation_clamp) if opts.activation_clamp is not None else 0.0,
        HAS_CLAMP=opts.activation_clamp is not None, INTER_SF_FP32=buf.intermediate_sf == "fp32",
        HAS_BIAS=l1.bias is not None, GPT_OSS=opts.activation == "gpt_oss", ROWS_ABOVE=rows_above, **shape, **pdl)


def launch_l2(buf, num_entries, route_weights, out, l2, pdl: dict, rows_above: int = 0) -> None:
    """`experts.launch_l2` for prefill on these kernels; buf.inter already rebased. rows_above:
    as `launch_l1`'s."""
    experts = buf.num_local_experts
    shape = _shape_args(experts, exact_products(buf.mma, "l2"), num_entries)
    _l2_kernel[_grid(num_entries, experts, buf.hidden, shape["BLOCK_W"], shape["BLOCK_T"], rows_above)](
        buf.inter, buf.inter_scales, buf.inter_scales.stride(0), buf.sorted_rows, buf.expert_offsets, route_weights,
        l2.w, l2.w.stride(0), l2.w.stride(1), l2.w_sf.view(torch.int32), l2.w_sf.stride(0) // 2, l2.w_sf.stride(1) // 2,
        l2.bias if l2.bias is not None else l2.w, fold_table(buf.device), out, buf.hidden, buf.intermediate,
        experts, HAS_BIAS=l2.bias is not None, ROWS_ABOVE=rows_above, **shape, **pdl)
