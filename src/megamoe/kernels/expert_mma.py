"""The main loop shared by the L1 and L2 grouped GEMMs: one expert's weight rows times a tile
of activation rows, accumulated in FP32.

Operands are swapped against the usual MoE GEMM: the weight tile W [BLOCK_W, K] is the left
operand and the activation rows enter transposed, acc[n, m] = sum_k W[n, k] * A[m, k]. MXFP4
weights are decoded to FP8 in registers (never a dequantized copy in memory) and feed the
tensor cores from registers (wgmma with A in registers); a tile of a few tokens (decode) fills
the narrow N side of the MMA instead of wasting a 64-row M side.

fp8xfp4: each 64-wide K chunk of packed bytes decodes into two FP8 tiles of 32 (low and high
nibbles, see `weights.py`), multiplied with the matching 32 columns of the FP8 activations.
Every group of 32 has its own weight scale (per row n) and activation scale (per row m), so
the partial product of each group is promoted into the accumulator with scale
2^(ew - 127) * 2^(ea - 127); the decode's 2^-6 (see `decode_e2m1_pair`) is undone at the end.
Prefill tiles (more than NARROW_ROWS rows) read rows rebased to one activation scale per 128
of K (kernels/rebase.py): their four partial products of a step are summed with the weight
scales alone and promoted once with the row's scale (A_PER_STEP), a quarter of the promotion
work, which was a quarter of prefill's time (docs/PERF.md, v12).

FMA tiles (one or two activation rows, `mxfp4_rows_fma`: decode batches of up to half a row an
expert, and the experts with one or two rows of batches up to three rows an expert,
`config.GemmConfig.fma_mix`): no MMA at all. The same decoded weights are converted to FP32 and
multiplied with the rows' FP8 activations on the FP32 units, exact products with FP32 sums; at
such sizes an MMA tile's 16-row side is mostly padding and each step waits for its MMAs
(docs/PERF.md, v14).

Which tensor cores multiply in the MMA tiles (the buffer's `mma`): FP8 MMAs by default. On Hopper their sums
inside one MMA are truncated (a k = 32 MMA is off the exact sum by 2.8e-5 of sum |a_k b_k| at
the median, H200; DeepSeek-V3's report describes the same on H800), and the requantization
after L1 turns a few of those differences into whole FP8 steps: that is the 2-3e-3 layer error
of the benchmark shapes (docs/RELIABILITY.md, finding 6). F16_MMA converts the same FP8
operands to FP16 (exact: every e4m3 value is an FP16 value; one cvt per pair) and multiplies on
the FP16 tensor cores: exact products, FP32 sums, every other step unchanged.
"""

import triton
import triton.language as tl

from ..weights import TILE_ROWS as _TILE_ROWS
from .config import FMA_ROWS as _FMA_ROWS
from .config import NARROW_ROWS as _NARROW_ROWS
from .common import decode_e2m1_pair

TILE_ROWS = tl.constexpr(_TILE_ROWS)
TILE_STEP_BYTES = tl.constexpr(_TILE_ROWS * 64)   # one 128-wide step of a row tile, 4 bits a weight
NARROW_ROWS = tl.constexpr(_NARROW_ROWS)
FMA_ROWS = tl.constexpr(_FMA_ROWS)


DECODE_E2M1_PAIR_PTX = tl.constexpr("""{
        .reg .b32 t0, t1;
        shl.b32 t0, $2, 4;
        shl.b32 t1, $2, 2;
        and.b32 t0, t0, 0x80808080;
        and.b32 t1, t1, 0x1C1C1C1C;
        or.b32 $0, t0, t1;
        shr.b32 t1, $2, 2;
        and.b32 t0, $2, 0x80808080;
        and.b32 t1, t1, 0x1C1C1C1C;
        or.b32 $1, t0, t1;
        }""")
"""`decode_e2m1_pair`'s bits on a 32-bit register of four packed bytes ($2) into the low ($0)
and high ($1) nibbles' e4m3 bytes: low = (p << 4 & 0x80) | (p << 2 & 0x1C), high = (p & 0x80) |
(p >> 2 & 0x1C). Also used by tools/mma_row_stream.py's Gluon kernel."""


@triton.jit
def decode_e2m1_pair_packed(packed):
    """`decode_e2m1_pair` on four bytes per instruction (GPU only: inline PTX,
    DECODE_E2M1_PAIR_PTX)."""
    low, high = tl.inline_asm_elementwise(
        asm=DECODE_E2M1_PAIR_PTX, constraints="=r,=r,r", args=[packed], dtype=(tl.uint8, tl.uint8), is_pure=True,
        pack=4)
    return low.to(tl.float8e4nv, bitcast=True), high.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _split4(s):
    """[rows, 4] -> four [rows] vectors (groups (0, 2) and (1, 3) by the first split)."""
    s02, s13 = tl.split(tl.reshape(s, (s.shape[0], 2, 2)))
    s0, s2 = tl.split(s02)
    s1, s3 = tl.split(s13)
    return s0, s1, s2, s3


@triton.jit
def _weight_scales(w_scale_ptr, w_rows, stride_ws_n, g, WIDE: tl.constexpr):
    """Weight scales [BLOCK_W] of groups g .. g+3 as fp32 (see `_group_scales`)."""
    q = g + tl.arange(0, 4)
    if WIDE:
        w_rows = w_rows.to(tl.int64)
    return _split4(tl.load(w_scale_ptr + w_rows[:, None] * stride_ws_n + q[None, :]).to(tl.float32))


@triton.jit
def _group_scales(w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m, g, WIDE: tl.constexpr):
    """Weight scales [BLOCK_W] and activation scales [BLOCK_M] of groups g .. g+3, as fp32.

    Both tables hold each row's groups contiguously (row stride stride_ws_n / stride_as_m), so
    a row's four scales of a step are one vector load: 8 bytes of bf16, 16 of fp32. (One load
    per group and row instead, from tables transposed to [groups, rows], took 24 scalar loads
    and their 64-bit address arithmetic per step: 363 SASS instructions a step against 262,
    tools/inspect_kernels.py.) The split of [rows, 4] into four vectors in the accumulator's
    layout goes through shared memory (two CTA barriers a step on sm_90a); four loads per row
    straight into that layout instead (v8) took fewer barriers and was twice as slow at decode
    on an H100 (docs/PERF.md). Unmasked: both tables have a multiple of 4 groups (padding
    holds 1.0), the rows are valid indices and callers never ask for groups past the last step
    (see `mxfp4_rows_dot`): the tables end right after it, the last one of an allocation
    included. WIDE: 64-bit row offsets, for scale tables of 2^31 entries or more.
    """
    sw0, sw1, sw2, sw3 = _weight_scales(w_scale_ptr, w_rows, stride_ws_n, g, WIDE)
    q = g + tl.arange(0, 4)
    sa0, sa1, sa2, sa3 = _split4(tl.load(a_scale_ptr + a_rows[:, None] * stride_as_m + q[None, :]))
    return sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3


@triton.jit
def _wide_step_scales(w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m, g, WIDE: tl.constexpr,
                      A_PER_STEP: tl.constexpr):
    """`_group_scales`; with A_PER_STEP the activation side is one scalar load a row (the
    step's scale, repeated in its four entries), returned as sa0 (sa1-sa3 are unused)."""
    if A_PER_STEP:
        sw0, sw1, sw2, sw3 = _weight_scales(w_scale_ptr, w_rows, stride_ws_n, g, WIDE)
        sa0 = tl.load(a_scale_ptr + a_rows * stride_as_m + g)
        sa1, sa2, sa3 = sa0, sa0, sa0
    else:
        sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3 = _group_scales(
            w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m, g, WIDE)
    return sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3


@triton.jit
def _chunk_operands(w_base, a_base, step, HALF: tl.constexpr, k_size, MASKED: tl.constexpr,
                    PTX_DECODE: tl.constexpr):
    """The two FP8 weight tiles [BLOCK_W, 32] and activation tiles [32, BLOCK_M] of chunk
    2 * step + HALF (K columns 128 step + 64 HALF ..., see weights.py for the tiled layout).

    MASKED only for the last, partial step: columns past k_size read as zeros.
    """
    g = 4 * step + 2 * HALF
    w_ptrs = w_base + step * TILE_STEP_BYTES + HALF * 32
    if MASKED:
        packed = tl.load(w_ptrs, mask=g * 32 < k_size, other=0)
        a_lo = tl.load(a_base + g * 32, mask=g * 32 < k_size, other=0.0)
        a_hi = tl.load(a_base + (g + 1) * 32, mask=(g + 1) * 32 < k_size, other=0.0)
    else:
        packed = tl.load(w_ptrs)
        a_lo = tl.load(a_base + g * 32)
        a_hi = tl.load(a_base + (g + 1) * 32)
    if PTX_DECODE:
        w_lo, w_hi = decode_e2m1_pair_packed(packed)
    else:
        w_lo, w_hi = decode_e2m1_pair(packed)
    return w_lo, w_hi, a_lo, a_hi


@triton.jit
def _exact_operands(w0, w1, w2, w3, a0, a1, a2, a3, UPCAST: tl.constexpr):
    """The FP8 operands as FP16 for the FP16 tensor cores (F16_MMA); as FP32 under the
    interpreter (UPCAST), whose FP16 dot would round its sums to FP16."""
    if UPCAST:
        w0, w1, w2, w3 = w0.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32), w3.to(tl.float32)
        a0, a1, a2, a3 = a0.to(tl.float32), a1.to(tl.float32), a2.to(tl.float32), a3.to(tl.float32)
    else:
        w0, w1, w2, w3 = w0.to(tl.float16), w1.to(tl.float16), w2.to(tl.float16), w3.to(tl.float16)
        a0, a1, a2, a3 = a0.to(tl.float16), a1.to(tl.float16), a2.to(tl.float16), a3.to(tl.float16)
    return w0, w1, w2, w3, a0, a1, a2, a3


@triton.jit
def _step_dot(acc, w_base, a_base, step, k_size, sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3,
              MASKED: tl.constexpr, PTX_DECODE: tl.constexpr, ISSUE_AHEAD: tl.constexpr, F16_MMA: tl.constexpr,
              A_PER_STEP: tl.constexpr):
    """acc + one step of 128 of K (two chunks, four scale groups), each group promoted.

    ISSUE_AHEAD issues the four MMAs before the first promotion needs a result, so they run
    back to back instead of each waiting for the previous one's promotion; it holds four
    partial tiles in registers, affordable for the few-token tiles of decode only.
    A_PER_STEP: the activation rows have one scale per step (sa0; kernels/rebase.py), so the
    four partial products are summed with their weight scales and promoted once.
    F16_MMA: exact products (see the module docstring).
    """
    w0, w1, a0, a1 = _chunk_operands(w_base, a_base, step, 0, k_size, MASKED, PTX_DECODE)
    w2, w3, a2, a3 = _chunk_operands(w_base, a_base, step, 1, k_size, MASKED, PTX_DECODE)
    if F16_MMA:
        w0, w1, w2, w3, a0, a1, a2, a3 = _exact_operands(w0, w1, w2, w3, a0, a1, a2, a3, not PTX_DECODE)
    if ISSUE_AHEAD:
        t0 = tl.dot(w0, a0)
        t1 = tl.dot(w1, a1)
        t2 = tl.dot(w2, a2)
        t3 = tl.dot(w3, a3)
        acc += t0 * (sw0[:, None] * sa0[None, :])
        acc += t1 * (sw1[:, None] * sa1[None, :])
        acc += t2 * (sw2[:, None] * sa2[None, :])
        acc += t3 * (sw3[:, None] * sa3[None, :])
    elif A_PER_STEP:
        t = tl.dot(w0, a0) * sw0[:, None]
        t += tl.dot(w1, a1) * sw1[:, None]
        t += tl.dot(w2, a2) * sw2[:, None]
        t += tl.dot(w3, a3) * sw3[:, None]
        acc += t * sa0[None, :]
    else:
        acc += tl.dot(w0, a0) * (sw0[:, None] * sa0[None, :])
        acc += tl.dot(w1, a1) * (sw1[:, None] * sa1[None, :])
        acc += tl.dot(w2, a2) * (sw2[:, None] * sa2[None, :])
        acc += tl.dot(w3, a3) * (sw3[:, None] * sa3[None, :])
    return acc


@triton.jit
def mxfp4_rows_dot(w_ptr, w_scale_ptr, w_rows, stride_w_tile, stride_ws_n,
                   a_ptr, a_rows, stride_a_m, a_scale_ptr, stride_as_m, k_size,
                   PTX_DECODE: tl.constexpr, ISSUE_AHEAD: tl.constexpr, WIDE_SCALES: tl.constexpr,
                   F16_MMA: tl.constexpr, A_PER_STEP: tl.constexpr):
    """W[w_rows, :k_size] @ A[a_rows, :k_size].T as fp32 [BLOCK_W, BLOCK_M]; MXFP4 W, FP8 A.

    w_ptr:       uint8, the expert's packed weights, tiled (weights.py): each 128-wide step of
                 TILE_ROWS rows is one contiguous block of TILE_STEP_BYTES, the blocks of a
                 row tile stride_w_tile bytes apart from the next row tile's. w_rows [BLOCK_W]
                 int, valid row indices (callers clamp the rows past the edge of a tile: their
                 results are computed and never stored, which is cheaper than masking every load).
    w_scale_ptr: bfloat16 [N, G4] group scales of the expert (stride_ws_n between rows).
    a_ptr:       float8e4nv rows; a_rows [BLOCK_M] int64, valid row indices as for w_rows.
    a_scale_ptr: float32 [*, G4] group scales of the rows (stride_as_m between rows).
                 G4 = ceil(k_size / 128) * 4: both scale arrays are padded to whole steps.
    PTX_DECODE:  decode four bytes per instruction with inline PTX (not in the interpreter).
    WIDE_SCALES: 64-bit offsets into the scale tables (see `_group_scales`).
    F16_MMA:     multiply on the FP16 tensor cores, exact products (module docstring).
    ISSUE_AHEAD: narrow row tiles (decode): the step's four MMAs go out back to back (see
                 `_step_dot`) and each step loads the next step's scales.
    A_PER_STEP:  wide row tiles only: the four activation scales of each step are equal
                 (rebased rows, kernels/rebase.py); one promotion per step.

    One step covers 128 of K: two packed chunks, four scale groups; only a last partial step
    masks its loads. The compiler pipelines the tile loads (they feed the tensor cores) but not
    the small scale vectors; loading them a step ahead hides their latency behind a step of work.
    """
    acc = tl.zeros((w_rows.shape[0], a_rows.shape[0]), dtype=tl.float32)
    offs = tl.arange(0, 32)
    # Row n of the expert starts at byte (n // TILE_ROWS) * stride_w_tile + (n % TILE_ROWS) * 64
    # of its first step (weights.py); step s adds s * TILE_STEP_BYTES.
    w_base = (w_ptr + (w_rows // TILE_ROWS)[:, None] * stride_w_tile + (w_rows % TILE_ROWS)[:, None] * 64
              + offs[None, :])
    a_base = a_ptr + a_rows[None, :] * stride_a_m + offs[:, None]
    full_steps = k_size // 128
    # First group of the last step (the partial one if K is not a multiple of 128). Loads of a
    # "next" step clamp to it: past it the scale tables end (with K = 4096 the last expert's
    # weight scales and the last buffer region end exactly there), and reading on would fault
    # where nothing is mapped after them (seen on H100, 2026-11-28).
    last_group = 4 * (tl.cdiv(k_size, 128) - 1)
    if ISSUE_AHEAD:
        sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3 = _group_scales(
            w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m, 0, WIDE_SCALES)
        for step in range(0, full_steps):
            nw0, nw1, nw2, nw3, na0, na1, na2, na3 = _group_scales(
                w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m,
                tl.minimum(4 * step + 4, last_group), WIDE_SCALES)
            acc = _step_dot(acc, w_base, a_base, step, k_size, sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3,
                            False, PTX_DECODE, ISSUE_AHEAD, F16_MMA, False)
            sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3 = nw0, nw1, nw2, nw3, na0, na1, na2, na3
    else:
        # Wide row tiles: every thread holds many columns of the accumulator, so the activation
        # scales of two steps would not fit in registers; load each step's own.
        for step in range(0, full_steps):
            sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3 = _wide_step_scales(
                w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m, 4 * step, WIDE_SCALES, A_PER_STEP)
            acc = _step_dot(acc, w_base, a_base, step, k_size, sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3,
                            False, PTX_DECODE, ISSUE_AHEAD, F16_MMA, A_PER_STEP)
        sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3 = _wide_step_scales(
            w_scale_ptr, w_rows, stride_ws_n, a_scale_ptr, a_rows, stride_as_m, last_group, WIDE_SCALES, A_PER_STEP)
    if k_size % 128 != 0:
        acc = _step_dot(acc, w_base, a_base, full_steps, k_size, sw0, sw1, sw2, sw3, sa0, sa1, sa2, sa3,
                        True, PTX_DECODE, ISSUE_AHEAD, F16_MMA, A_PER_STEP)
    # The decode yields value * 2^-6 (see decode_e2m1_pair); undo it once, not per group.
    return acc * 64.0


@triton.jit
def _load_scales(ptrs, PTX: tl.constexpr):
    """The bf16 or fp32 scales at `ptrs` as fp32, in the layout of the tensors they multiply.

    A tl.load gets a layout of its own from the compiler (one suited to coalescing), and the
    FMA tiles' K loop then converted the scales through shared memory, with barriers, every
    step; an inline-PTX load is an elementwise op and takes its consumers' layout (GPU only).
    """
    if PTX:
        if ptrs.dtype.element_ty == tl.bfloat16:
            return tl.inline_asm_elementwise(
                asm="{ .reg .b16 h, z; ld.global.nc.b16 h, [$1]; mov.b16 z, 0; mov.b32 $0, {z, h}; }",
                constraints="=r,l", args=[ptrs], dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(asm="ld.global.nc.f32 $0, [$1];", constraints="=r,l", args=[ptrs],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _fma_row(lo, hi, a_ptr, a_scale_ptr, row, stride_a_m, stride_as_m, step, k_lo, g_lo, k_size,
             MASKED: tl.constexpr, PTX: tl.constexpr):
    """Partial sums [SPLIT, BLOCK_W, 4, 1] of one activation row against a step's decoded
    weights: entry (s, n, q) is weight row n's 16-byte piece q in K range s's step (`step`
    [SPLIT, 1, 1, 1], or a scalar without split K), its low nibbles (group g_lo[q]) and high
    nibbles (group g_lo[q] + 1) each multiplied by the row's activations and group scale."""
    k = 128 * step + k_lo
    base = a_ptr + row * stride_a_m + k
    if MASKED:
        x_lo = tl.load(base, mask=k < k_size, other=0.0).to(tl.float32)
        x_hi = tl.load(base + 32, mask=k + 32 < k_size, other=0.0).to(tl.float32)
    else:
        x_lo = tl.load(base).to(tl.float32)
        x_hi = tl.load(base + 32).to(tl.float32)
    s_ptrs = a_scale_ptr + row * stride_as_m + 4 * step + g_lo
    s_lo = _load_scales(s_ptrs, PTX)
    s_hi = _load_scales(s_ptrs + 1, PTX)
    return tl.sum(lo * x_lo, axis=3, keep_dims=True) * s_lo, tl.sum(hi * x_hi, axis=3, keep_dims=True) * s_hi


@triton.jit
def _fma_step(raw, step, acc0, acc1, ws_ptrs, a_ptr, a_scale_ptr, row0, row1, stride_a_m, stride_as_m, k_lo,
              g_lo, k_size, R: tl.constexpr, MASKED: tl.constexpr, PTX: tl.constexpr):
    """acc0, acc1 (rows row0, row1) + one 128-wide step of K in each K range from its bytes `raw`
    [SPLIT, BLOCK_W, 64], `step` the ranges' steps ([SPLIT, 1, 1], or a scalar without split K).
    A range with nothing to add passes code-0 bytes: its products are zeros."""
    SPLIT: tl.constexpr = raw.shape[0]
    packed = tl.reshape(raw, (SPLIT, raw.shape[1], 4, 16))
    if PTX:
        lo, hi = decode_e2m1_pair_packed(packed)
    else:
        lo, hi = decode_e2m1_pair(packed)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    if SPLIT > 1:
        step = step[:, :, :, None]
    sw_lo = _load_scales(ws_ptrs + 4 * step, PTX)
    sw_hi = _load_scales(ws_ptrs + 4 * step + 1, PTX)
    p_lo, p_hi = _fma_row(lo, hi, a_ptr, a_scale_ptr, row0, stride_a_m, stride_as_m, step, k_lo, g_lo, k_size,
                          MASKED, PTX)
    acc0 += p_lo * sw_lo + p_hi * sw_hi
    if R > 1:
        p_lo, p_hi = _fma_row(lo, hi, a_ptr, a_scale_ptr, row1, stride_a_m, stride_as_m, step, k_lo, g_lo, k_size,
                              MASKED, PTX)
        acc1 += p_lo * sw_lo + p_hi * sw_hi
    return acc0, acc1


@triton.jit
def mxfp4_rows_fma(w_ptr, w_scale_ptr, w_rows, stride_w_tile, stride_ws_n, a_ptr, a_rows, stride_a_m, a_scale_ptr,
                   stride_as_m, k_size, PTX: tl.constexpr, WIDE_SCALES: tl.constexpr, AHEAD: tl.constexpr,
                   SPLIT: tl.constexpr):
    """`mxfp4_rows_dot` for one or two activation rows (FMA tiles), on the FP32 units.

    Each thread loads 16 bytes of a weight row a step (32 weights: 16 of one scale group in
    the low nibbles, 16 of the next in the high ones, weights.py), decodes them as the MMA tiles
    do, converts them to FP32 and multiplies them with the row's FP8 activations: exact products
    and FP32 sums, like `mma="fp16"`. Each (row, piece) keeps a partial sum per step, promoted
    with the group's weight and activation scales; the pieces are summed once at the end.
    No shared memory and no MMA wait, so a step costs its loads and about five instructions a
    weight; at decode the MMA tiles' 16-row side is mostly padding (docs/PERF.md).
    a_rows [R] valid row indices (R = 1 or 2). Returns fp32 [BLOCK_W, R].
    AHEAD: load each step's weights a step before it is used (num_stages = 2 in the tile config):
    grids of less than a wave, where too few bytes are in flight. (Three steps ahead, unrolled
    by four, was slower at one and two tokens, docs/PERF.md.)
    SPLIT: the K steps are cut into SPLIT contiguous ranges, each run by its own warps of the
    program (the tile config's k_split; num_warps grows with it), summed once at the end in a
    fixed order: more warps a program stream the same rows, for grids of less than a wave.
    """
    BLOCK_W: tl.constexpr = w_rows.shape[0]
    R: tl.constexpr = a_rows.shape[0]
    r = tl.arange(0, R)
    row0 = tl.sum(tl.where(r == 0, a_rows, 0), axis=0)
    row1 = tl.sum(tl.where(r == R - 1, a_rows, 0), axis=0)
    # A row's 64 bytes of a step as one contiguous axis, so a thread loads 16 of them at once and
    # a warp's threads take consecutive pieces; `_fma_step` reshapes them to [range, row, piece, byte].
    w_ptrs = (w_ptr + (w_rows // TILE_ROWS)[None, :, None] * stride_w_tile
              + (w_rows % TILE_ROWS)[None, :, None] * 64 + tl.arange(0, 64)[None, None, :])
    q = tl.arange(0, 4)
    # Byte j of chunk c holds element 64c + j (low nibble) and 64c + 32 + j (high nibble).
    k_lo = (64 * (q // 2) + 16 * (q % 2))[None, None, :, None] + tl.arange(0, 16)[None, None, None, :]
    # Scales and partial sums are [SPLIT, BLOCK_W, 4, 1]: the layout of the pieces' sums.
    g_lo = 2 * (q // 2)[None, None, :, None]
    if WIDE_SCALES:
        w_rows = w_rows.to(tl.int64)
    ws_ptrs = w_scale_ptr + w_rows[None, :, None, None] * stride_ws_n + g_lo
    acc0 = tl.zeros((SPLIT, BLOCK_W, 4, 1), dtype=tl.float32)
    acc1 = tl.zeros((SPLIT, BLOCK_W, 4, 1), dtype=tl.float32)
    full_steps = k_size // 128
    # Range s runs whole steps first[s] .. first[s] + per - 1, and with split K one of the last
    # full_steps % SPLIT ones after the loop. Every address in the loop is affine in its
    # counter: with a clamp on each step (a range running past the last one) loading a step
    # ahead compiled to 64 registers a thread instead of 113 and one token took 6 us longer.
    per = full_steps // SPLIT
    if SPLIT == 1:
        first = 0
    else:
        first = tl.arange(0, SPLIT)[:, None, None] * per
    if AHEAD:
        # Two steps an iteration, each step's bytes loaded a step before they are used, into a
        # register set of its own (the compiler does not pipeline loads that feed no tl.dot, and
        # rotating one set of loaded registers waits for the load at the loop's back edge).
        # A load past the last whole step (the partial one, or beyond) is clamped: it re-reads.
        last = tl.cdiv(k_size, 128) - 1
        a_raw = tl.load(w_ptrs + first * TILE_STEP_BYTES)
        for i in range(0, per - 1, 2):
            b_raw = tl.load(w_ptrs + (first + i + 1) * TILE_STEP_BYTES)
            acc0, acc1 = _fma_step(a_raw, first + i, acc0, acc1, ws_ptrs, a_ptr, a_scale_ptr, row0, row1,
                                   stride_a_m, stride_as_m, k_lo, g_lo, k_size, R, False, PTX)
            a_raw = tl.load(w_ptrs + tl.minimum(first + i + 2, last) * TILE_STEP_BYTES)
            acc0, acc1 = _fma_step(b_raw, first + i + 1, acc0, acc1, ws_ptrs, a_ptr, a_scale_ptr, row0, row1,
                                   stride_a_m, stride_as_m, k_lo, g_lo, k_size, R, False, PTX)
        if per % 2 == 1:
            acc0, acc1 = _fma_step(a_raw, first + per - 1, acc0, acc1, ws_ptrs, a_ptr, a_scale_ptr, row0,
                                   row1, stride_a_m, stride_as_m, k_lo, g_lo, k_size, R, False, PTX)
    else:
        for i in range(0, per):
            acc0, acc1 = _fma_step(tl.load(w_ptrs + (first + i) * TILE_STEP_BYTES), first + i, acc0, acc1,
                                   ws_ptrs, a_ptr, a_scale_ptr, row0, row1, stride_a_m, stride_as_m, k_lo, g_lo,
                                   k_size, R, False, PTX)
    if SPLIT > 1:
        if full_steps % SPLIT != 0:
            # The last whole steps, one a range; the other ranges load no bytes (code 0: they
            # add zeros) and take the last step's scales and activations, in bounds.
            tail = SPLIT * per + tl.arange(0, SPLIT)[:, None, None]
            live = tail < full_steps
            tail = tl.minimum(tail, full_steps - 1)
            acc0, acc1 = _fma_step(tl.load(w_ptrs + tail * TILE_STEP_BYTES, mask=live, other=0), tail, acc0,
                                   acc1, ws_ptrs, a_ptr, a_scale_ptr, row0, row1, stride_a_m, stride_as_m, k_lo, g_lo,
                                   k_size, R, False, PTX)
    if k_size % 128 != 0:
        # Weights past K are code 0 in the tiled layout; the activations past K are masked (they
        # are the next row's, or past the end of the buffer). With split K range 0 takes the
        # step; the others load no bytes (code 0).
        if SPLIT == 1:
            acc0, acc1 = _fma_step(tl.load(w_ptrs + full_steps * TILE_STEP_BYTES), full_steps, acc0, acc1,
                                   ws_ptrs, a_ptr, a_scale_ptr, row0, row1, stride_a_m, stride_as_m, k_lo, g_lo,
                                   k_size, R, True, PTX)
        else:
            split = tl.arange(0, SPLIT)[:, None, None]
            step = full_steps + 0 * split
            raw = tl.load(w_ptrs + step * TILE_STEP_BYTES, mask=split == 0, other=0)
            acc0, acc1 = _fma_step(raw, step, acc0, acc1, ws_ptrs, a_ptr, a_scale_ptr,
                                   row0, row1, stride_a_m, stride_as_m, k_lo, g_lo, k_size, R, True, PTX)
    # The decode yields value * 2^-6 (see decode_e2m1_pair); undone once.
    out0 = tl.sum(tl.sum(tl.sum(acc0, axis=3), axis=2), axis=0) * 64.0
    if R == 1:
        out = out0[:, None]
    else:
        out = tl.join(out0, tl.sum(tl.sum(tl.sum(acc1, axis=3), axis=2), axis=0) * 64.0)
    return out


@triton.jit
def expert_rows_dot(w_ptr, w_scale_ptr, w_rows, w_mask, stride_w_n, stride_ws_n, a_ptr, a_rows, a_mask, stride_a_m,
                    a_scale_ptr, stride_as_m, k_size, QUANTIZED: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, WIDE_SCALES: tl.constexpr, F16_MMA: tl.constexpr,
                    A_PER_STEP: tl.constexpr, FMA_AHEAD: tl.constexpr, FMA_SPLIT: tl.constexpr):
    """One expert's W[w_rows, :k_size] @ A[a_rows, :k_size].T, fp32 [BLOCK_W, BLOCK_M], in the
    layer's mode (L1 and L2 share it). fp8xfp4: `mxfp4_rows_dot`, with the rows outside the
    masks clamped to row 0 (computed, never stored), stride_w_n the stride between row tiles
    (`ExpertWeights.w.stride(1)`); bf16xbf16: `bf16_rows_dot`, masked loads, stride_w_n the
    stride between rows."""
    if QUANTIZED and a_rows.shape[0] <= FMA_ROWS:
        acc = mxfp4_rows_fma(w_ptr, w_scale_ptr, tl.where(w_mask, w_rows, 0), stride_w_n, stride_ws_n, a_ptr,
                             tl.where(a_mask, a_rows, 0), stride_a_m, a_scale_ptr, stride_as_m, k_size,
                             PTX=not UPCAST, WIDE_SCALES=WIDE_SCALES, AHEAD=FMA_AHEAD, SPLIT=FMA_SPLIT)
    elif QUANTIZED:
        acc = mxfp4_rows_dot(w_ptr, w_scale_ptr, tl.where(w_mask, w_rows, 0), stride_w_n, stride_ws_n, a_ptr,
                             tl.where(a_mask, a_rows, 0), stride_a_m, a_scale_ptr, stride_as_m, k_size,
                             PTX_DECODE=not UPCAST, ISSUE_AHEAD=a_rows.shape[0] <= NARROW_ROWS, WIDE_SCALES=WIDE_SCALES,
                             F16_MMA=F16_MMA, A_PER_STEP=A_PER_STEP)
    else:
        acc = bf16_rows_dot(w_ptr, w_rows, w_mask, stride_w_n, a_ptr, a_rows, a_mask, stride_a_m, k_size,
                            BLOCK_K=BLOCK_K, UPCAST=UPCAST)
    return acc


@triton.jit
def bf16_rows_dot(w_ptr, w_rows, w_mask, stride_w_n, a_ptr, a_rows, a_mask, stride_a_m, k_size,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """W[w_rows, :k_size] @ A[a_rows, :k_size].T as fp32 [BLOCK_W, BLOCK_M], both bfloat16.

    UPCAST multiplies in fp32 instead: Triton 3.6's interpreter multiplies bfloat16 tiles as
    raw integers, so the CPU tests pass UPCAST=True (exact: bf16 products fit in fp32).
    """
    acc = tl.zeros((w_rows.shape[0], a_rows.shape[0]), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_size, BLOCK_K):
        k_ok = k0 + offs < k_size
        w = tl.load(w_ptr + w_rows[:, None] * stride_w_n + (k0 + offs)[None, :],
                    mask=w_mask[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + a_rows[None, :] * stride_a_m + (k0 + offs)[:, None],
                    mask=a_mask[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            acc += tl.dot(w.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, a)
    return acc
