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
2^(ew - 127) * 2^(ea - 127) * 2^6 (the 2^6 undoes the decode's 2^-6, see `decode_e2m1_pair`).
KSTEP chunks are unrolled per loop iteration so that several weight loads are in flight and
the loop overhead is paid once per KSTEP * 64 columns.
"""

import triton
import triton.language as tl

from .common import decode_e2m1_pair, ue8m0_to_fp32


@triton.jit
def decode_e2m1_pair_packed(packed):
    """`decode_e2m1_pair` on four bytes per instruction (GPU only: inline PTX).

    Same bits: low = (p << 4 & 0x80) | (p << 2 & 0x1C), high = (p & 0x80) | (p >> 2 & 0x1C),
    done on 32-bit registers holding four packed bytes.
    """
    low, high = tl.inline_asm_elementwise(
        asm="""{
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
        }""",
        constraints="=r,=r,r", args=[packed], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    return low.to(tl.float8e4nv, bitcast=True), high.to(tl.float8e4nv, bitcast=True)


@triton.jit
def mxfp4_rows_dot(acc, w_ptr, w_sf_ptr, w_rows, w_mask, stride_w_n, stride_wsf_g,
                   a_ptr, a_rows, a_mask, stride_a_m, a_sf_ptr, stride_asf_m, k_size,
                   A_SF_FP32: tl.constexpr, KSTEP: tl.constexpr, PTX_DECODE: tl.constexpr):
    """acc [BLOCK_W, BLOCK_M] += W[w_rows, :k_size] @ A[a_rows, :k_size].T with MXFP4 W, FP8 A.

    w_ptr:    uint8, packed chunks of the expert (weights.py layout); w_rows [BLOCK_W] int.
    w_sf_ptr: uint8 exponents of the expert, [KP/32, N] (stride_wsf_g between groups).
    a_ptr:    float8e4nv rows; a_rows [BLOCK_M] int64 row indices.
    a_sf_ptr: uint8 exponents [*, stride_asf_m] (or fp32 scales when A_SF_FP32).
    PTX_DECODE: decode four bytes per instruction with inline PTX (not in the interpreter).
    """
    num_groups = k_size // 32
    num_chunks = tl.cdiv(k_size, 64)
    offs = tl.arange(0, 32)
    w_base = w_ptr + w_rows[:, None] * stride_w_n + offs[None, :]
    a_base = a_ptr + a_rows[None, :] * stride_a_m + offs[:, None]
    asf_base = a_sf_ptr + a_rows * stride_asf_m
    for it in range(0, tl.cdiv(num_chunks, KSTEP)):
        for j in tl.static_range(KSTEP):
            chunk = it * KSTEP + j
            g = 2 * chunk
            lo_ok = chunk < num_chunks
            hi_ok = g + 1 < num_groups
            packed = tl.load(w_base + chunk * 32, mask=w_mask[:, None] & lo_ok, other=0)
            if PTX_DECODE:
                w_lo, w_hi = decode_e2m1_pair_packed(packed)
            else:
                w_lo, w_hi = decode_e2m1_pair(packed)
            a_lo = tl.load(a_base + g * 32, mask=a_mask[None, :] & lo_ok, other=0.0)
            a_hi = tl.load(a_base + (g + 1) * 32, mask=a_mask[None, :] & hi_ok, other=0.0)
            sw_lo = ue8m0_to_fp32(tl.load(w_sf_ptr + g * stride_wsf_g + w_rows, mask=w_mask & lo_ok, other=127))
            sw_hi = ue8m0_to_fp32(tl.load(w_sf_ptr + (g + 1) * stride_wsf_g + w_rows, mask=w_mask & lo_ok,
                                          other=127))
            if A_SF_FP32:
                sa_lo = tl.load(asf_base + g, mask=a_mask & lo_ok, other=1.0)
                sa_hi = tl.load(asf_base + g + 1, mask=a_mask & hi_ok, other=1.0)
            else:
                sa_lo = ue8m0_to_fp32(tl.load(asf_base + g, mask=a_mask & lo_ok, other=127))
                sa_hi = ue8m0_to_fp32(tl.load(asf_base + g + 1, mask=a_mask & hi_ok, other=127))
            acc += tl.dot(w_lo, a_lo) * (sw_lo[:, None] * (sa_lo * 64.0)[None, :])
            acc += tl.dot(w_hi, a_hi) * (sw_hi[:, None] * (sa_hi * 64.0)[None, :])
    return acc


@triton.jit
def mx_rows_dot(acc, w_ptr, w_sf_ptr, w_rows, w_mask, stride_w_n, stride_wsf_n,
                a_ptr, a_rows, a_mask, stride_a_m, a_sf_ptr, stride_asf_m, k_size,
                BLOCK_K: tl.constexpr, A_SF_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BLOCK_W, BLOCK_M] += W[w_rows, :k_size] @ A[a_rows, :k_size].T as OCP-MX operands.

    w_ptr:    uint8 [N, K/2] of the expert, e2m1 codes in the standard MX packing (element 2i in
              the low nibble); w_sf_ptr: uint8 [N, K/32] exponents (stride_wsf_n per row).
    a_ptr:    float8e4nv rows; a_rows [BLOCK_M] int64; a_sf_ptr: uint8 exponents per 32 of a
              row (stride_asf_m per row), or fp32 scales when A_SF_FP32.

    With UE8M0 activation scales this is `tl.dot_scaled`: Triton applies both operands' scales
    while upcasting to BF16 (exact: e2m1 and e4m3 values times a power of two fit BF16) and
    chains BF16 tensor-core MMAs over the whole K with no per-group promotion. FP32 activation
    scales are no MX format: each group of 32 is then a separate product promoted with its
    scale. UPCAST runs the same arithmetic with explicit FP32 decoding (Triton's interpreter has
    no dot_scaled).
    """
    if A_SF_FP32 and not UPCAST:
        offs_b = tl.arange(0, 16)
        offs_k = tl.arange(0, 32)
        one = tl.arange(0, 1)
        for g in range(0, k_size // 32):
            w = tl.load(w_ptr + w_rows[:, None] * stride_w_n + (g * 16 + offs_b)[None, :], mask=w_mask[:, None],
                        other=0)
            w_sf = tl.load(w_sf_ptr + w_rows[:, None] * stride_wsf_n + (g + one)[None, :], mask=w_mask[:, None],
                           other=127)
            a = tl.load(a_ptr + a_rows[None, :] * stride_a_m + (g * 32 + offs_k)[:, None], mask=a_mask[None, :],
                        other=0.0)
            a_sf = tl.load(a_sf_ptr + a_rows * stride_asf_m + g, mask=a_mask, other=1.0)
            acc += tl.dot_scaled(w, w_sf, "e2m1", a, None, "e4m3", fast_math=True) * a_sf[None, :]
    else:
        GROUPS: tl.constexpr = BLOCK_K // 32
        offs_b = tl.arange(0, BLOCK_K // 2)
        offs_k = tl.arange(0, BLOCK_K)
        offs_g = tl.arange(0, GROUPS)
        for k0 in range(0, k_size, BLOCK_K):
            k_ok = k0 + offs_k < k_size
            g_ok = k0 // 32 + offs_g < k_size // 32
            w = tl.load(w_ptr + w_rows[:, None] * stride_w_n + (k0 // 2 + offs_b)[None, :],
                        mask=w_mask[:, None] & (k0 + 2 * offs_b < k_size)[None, :], other=0)
            w_sf = tl.load(w_sf_ptr + w_rows[:, None] * stride_wsf_n + (k0 // 32 + offs_g)[None, :],
                           mask=w_mask[:, None] & g_ok[None, :], other=127)
            a = tl.load(a_ptr + a_rows[None, :] * stride_a_m + (k0 + offs_k)[:, None],
                        mask=a_mask[None, :] & k_ok[:, None], other=0.0)
            sf_ptrs = a_sf_ptr + a_rows[:, None] * stride_asf_m + (k0 // 32 + offs_g)[None, :]
            if A_SF_FP32:
                a_sf = tl.load(sf_ptrs, mask=a_mask[:, None] & g_ok[None, :], other=1.0)
            else:
                a_sf = tl.load(sf_ptrs, mask=a_mask[:, None] & g_ok[None, :], other=127)
            if UPCAST:
                acc += tl.dot(_mx_weights_fp32(w, w_sf, GROUPS), _activations_fp32(a, a_sf, GROUPS, A_SF_FP32),
                              input_precision="ieee")
            else:
                acc = tl.dot_scaled(w, w_sf, "e2m1", a, a_sf, "e4m3", acc, fast_math=True)
    return acc


@triton.jit
def _mx_weights_fp32(w, w_sf, GROUPS: tl.constexpr):
    """uint8 [R, BK/2] packed e2m1 + uint8 [R, BK/32] exponents -> fp32 [R, BK] values."""
    codes = tl.reshape(tl.join(w & 0xF, w >> 4), (w.shape[0], 2 * w.shape[1]))
    magnitude = codes & 7
    exponent = magnitude >> 1
    # e2m1: 0.5 * m for exponent 0, else 2^(e-1) * (1 + m/2)
    value = tl.where(exponent == 0, 0.5 * (magnitude & 1).to(tl.float32),
                     tl.exp2((exponent - 1).to(tl.float32)) * (1.0 + 0.5 * (magnitude & 1).to(tl.float32)))
    value = tl.where((codes & 8) != 0, -value, value)
    scale = ue8m0_to_fp32(w_sf.to(tl.int32))
    value = tl.reshape(value, (w.shape[0], GROUPS, 32)) * scale[:, :, None]
    return tl.reshape(value, (w.shape[0], GROUPS * 32))


@triton.jit
def _activations_fp32(a, a_sf, GROUPS: tl.constexpr, A_SF_FP32: tl.constexpr):
    """float8e4nv [BK, M] + per-32 scales [M, BK/32] -> fp32 [BK, M] values."""
    scale = a_sf if A_SF_FP32 else ue8m0_to_fp32(a_sf.to(tl.int32))
    value = tl.reshape(a.to(tl.float32), (GROUPS, 32, a.shape[1])) * tl.trans(scale)[:, None, :]
    return tl.reshape(value, (GROUPS * 32, a.shape[1]))


@triton.jit
def bf16_rows_dot(acc, w_ptr, w_rows, w_mask, stride_w_n, a_ptr, a_rows, a_mask, stride_a_m, k_size,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BLOCK_W, BLOCK_M] += W[w_rows, :k_size] @ A[a_rows, :k_size].T, both bfloat16.

    UPCAST multiplies in fp32 instead: Triton 3.6's interpreter multiplies bfloat16 tiles as
    raw integers, so the CPU tests pass UPCAST=True (exact: bf16 products fit in fp32).
    """
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
