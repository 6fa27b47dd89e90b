"""Triton helpers shared by the fused kernels: exact FP8/UE8M0 quantization, MXFP4 decode,
and the mapping from a program id to an expert's tile of rows.

Every helper here is exact: the kernels that use them are tested bit for bit against
`megamoe.formats` on the CPU (Triton interpreter) and on the GPU.
"""

import triton
import triton.language as tl


@triton.jit
def ceil_ue8m0(value):
    """Biased exponent of the smallest power of two >= value (fp32 > 0), clamped to [1, 254].

    NaN and Inf give 254, as in `formats.ceil_ue8m0_exponent`.
    """
    bits = value.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.minimum(tl.maximum(exponent, 1), 254)


@triton.jit
def ue8m0_to_fp32(exponent):
    """2^(e - 127) as fp32 for biased exponents e in [1, 254]."""
    return (exponent.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(y):
    """Round fp32 `y` (|y| <= 448 or non-finite) to the nearest e4m3 value, ties to even.

    Adding and subtracting 1.5 * 2^(q + 23), where 2^q is the e4m3 spacing at y's binade,
    leaves y rounded to a multiple of 2^q by the FP32 adder itself. The result is exactly
    representable, so the final cast is exact on the GPU (cvt.rn.satfinite) and in the
    Triton interpreter (which truncates). The sign survives zero (-tiny -> -0.0), and
    non-finite inputs become NaN, matching torch's float8_e4m3fn cast.
    """
    bits = y.to(tl.int32, bitcast=True)
    binade = ((bits >> 23) & 0xFF) - 127
    quantum = tl.maximum(binade, -6) - 3
    magic = ((tl.minimum(quantum, 100) + 150) << 23).to(tl.float32, bitcast=True) * 1.5
    rounded = (tl.abs(y) + magic) - magic
    sign = (bits >> 31) << 31
    signed = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(binade == 128, float("nan"), signed)


@triton.jit
def round_to_bf16(x):
    """Round fp32 `x` to the nearest bfloat16 value (ties to even), returned as fp32.

    Integer rounding of the bit pattern, so the result is the same on the GPU and in the
    Triton interpreter (whose own fp32 -> bf16 cast truncates); the cast that follows is exact.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def quantize_groups_ue8m0(grouped):
    """Quantize fp32 `grouped` [A, G, B] to e4m3 with one UE8M0 scale per group along axis 1.

    Returns (e4m3 values as fp32 [A, G, B], biased exponents int32 [A, B]); exactly
    `formats.quantize_fp8`. A group holding a NaN gets exponent 254, as torch's
    NaN-propagating amax gives.
    """
    amax = tl.maximum(tl.max(tl.abs(grouped), axis=1), 1e-4)
    has_nan = tl.max((grouped != grouped).to(tl.int32), axis=1) > 0
    exponent = ceil_ue8m0(tl.math.div_rn(amax, 448.0))
    exponent = tl.where(has_nan, 254, exponent)
    inv_scale = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
    return round_to_e4m3(grouped * tl.expand_dims(inv_scale, 1)), exponent


@triton.jit
def quantize_groups_fp32(grouped):
    """Like `quantize_groups_ue8m0` with an fp32 scale max(amax, 1e-4) / 448 per group.

    Returns (e4m3 values as fp32 [A, G, B], scales fp32 [A, B]).
    """
    amax = tl.maximum(tl.max(tl.abs(grouped), axis=1), 1e-4)
    has_nan = tl.max((grouped != grouped).to(tl.int32), axis=1) > 0
    scale = tl.where(has_nan, float("nan"), tl.math.div_rn(amax, 448.0))
    return round_to_e4m3(tl.math.div_rn(grouped, tl.expand_dims(scale, 1))), scale


@triton.jit
def decode_e2m1_pair(packed):
    """uint8 bytes holding two e2m1 codes -> (low, high) float8e4nv tensors of the same shape.

    An e2m1 code [s e1 e0 m] placed at e4m3 bits [s . . e1 e0 m . .] reads as exactly
    value * 2^-6, subnormals included, so decoding is two masks and a shift per nibble and
    the 2^6 goes into the scale.
    """
    low = ((packed & 0x08) << 4) | ((packed & 0x07) << 2)
    high = (packed & 0x80) | ((packed & 0x70) >> 2)
    return low.to(tl.float8e4nv, bitcast=True), high.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _expert_row_ranges(expert_offsets_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                       ROWS_ABOVE: tl.constexpr, ROWS_UP_TO: tl.constexpr):
    """(e, lo, hi, tiles) [BLOCK_E]: expert e owns sorted rows [lo, hi), cut into `tiles` tiles;
    experts with ROWS_ABOVE rows or fewer, or (ROWS_UP_TO > 0) more than ROWS_UP_TO, get none."""
    e = tl.arange(0, BLOCK_E)
    in_range = e < num_experts
    lo = tl.load(expert_offsets_ptr + e, mask=in_range, other=0)
    hi = tl.load(expert_offsets_ptr + e + 1, mask=in_range, other=0)
    count = hi - lo
    tiles = tl.cdiv(count, BLOCK_M)
    if ROWS_ABOVE > 0:
        tiles = tl.where(count > ROWS_ABOVE, tiles, 0)
    if ROWS_UP_TO > 0:
        tiles = tl.where(count <= ROWS_UP_TO, tiles, 0)
    return e, lo, hi, tiles


@triton.jit
def count_expert_tiles(expert_offsets_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                       ROWS_ABOVE: tl.constexpr, ROWS_UP_TO: tl.constexpr):
    """Row tiles of BLOCK_M over the experts selected by ROWS_ABOVE and ROWS_UP_TO (see
    find_expert_tile)."""
    _, _, _, tiles = _expert_row_ranges(expert_offsets_ptr, num_experts, BLOCK_M, BLOCK_E, ROWS_ABOVE, ROWS_UP_TO)
    return tl.sum(tiles, axis=0)


@triton.jit
def find_expert_tile(expert_offsets_ptr, num_experts, tile_id, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                     ROWS_ABOVE: tl.constexpr, ROWS_UP_TO: tl.constexpr):
    """Map `tile_id` to (expert, first row, end row) over experts' rows cut into BLOCK_M tiles.

    expert_offsets_ptr: int32 [num_experts + 1], expert e owns sorted rows
    [offsets[e], offsets[e+1]). Expert e has ceil(count / BLOCK_M) tiles, in expert order; with
    ROWS_ABOVE > 0 only experts with more rows than that have tiles, with ROWS_UP_TO > 0 only
    experts with at most that many (the launches of a split GEMM, `GemmConfig.fma_mix`).
    Returns expert = num_experts when `tile_id` is past the last tile.
    """
    e, lo, hi, tiles = _expert_row_ranges(expert_offsets_ptr, num_experts, BLOCK_M, BLOCK_E, ROWS_ABOVE, ROWS_UP_TO)
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= tile_id).to(tl.int32), axis=0)
    this = e == expert
    tile_begin = tl.sum(tl.where(this, tile_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(this, lo, 0), axis=0) + (tile_id - tile_begin) * BLOCK_M
    row_end = tl.sum(tl.where(this, hi, 0), axis=0)
    return expert, row_start, row_end


@triton.jit
def after_predecessor(PDL: tl.constexpr):
    """First thing in every program of a kernel launched with `launch.pdl_options`: wait until
    the kernel before it on the stream has finished and its writes are visible, then allow the
    next kernel's launch. Every program waits, also those with no work: a kernel's completion
    then implies its predecessor's, so the stream's order holds across a chain of such kernels."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
