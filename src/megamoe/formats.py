"""The exact number formats of megamoe, in plain torch (CPU or CUDA).

These four functions are the contract the Triton kernels are tested against bit for bit.

FP8 activations: e4m3fn values, one UE8M0 (power-of-two) scale per 32 consecutive hidden
elements of a row. UE8M0 stores a scale 2^(e-127) as its biased exponent e in one byte.

    amax = max(|x_group|, 1e-4)
    e    = ceil_exponent(amax / 448)      # on the FP32 bits: exponent, +1 if any mantissa bit
    q    = e4m3(x / 2^(e-127))            # round to nearest even; |q| <= 448 by construction

Four exponents are packed little-endian into one int32 (byte j of word i = group 4i+j), so a
row of H elements has ceil(H/128) words; bytes past the last group hold 127 (a scale of 1.0).
This is DeepGEMM's `per_token_cast_to_fp8(use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)`.

MXFP4 weights (OCP MX): e2m1 codes (+-{0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 = sign), two per
byte (element 2i in the low nibble), one UE8M0 scale byte per 32 elements along K.

    e = ceil_exponent(max(amax, 1e-4) / 6)
    code = round_to_nearest_even_e2m1(w / 2^(e-127))    # ties go to the even code; -0 -> +0

The byte layout equals the `*_blocks` / `*_scales` tensors of Hugging Face's gpt-oss
checkpoints (blocks flattened over their last two dims).
"""

from __future__ import annotations

import torch

SCALE_GROUP = 32
"""Elements that share one UE8M0 scale, for activations and weights."""
FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4
"""A group's amax is raised to this before its scale is taken, so all-zero groups get a finite scale."""
UE8M0_PAD = 127
"""Exponent byte written past the last group of a row: a scale of 1.0."""
GROUPS_PER_WORD = 4

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of the e2m1 codes 0..7; codes 8..15 are their negatives."""

# Ties of round-to-nearest-even on the e2m1 grid: a magnitude exactly on a midpoint goes to the
# even code. (midpoint, code below, code above): 0.25 -> 0, 0.75 -> 2, 1.25 -> 2, 1.75 -> 4,
# 2.5 -> 4, 3.5 -> 6, 5 -> 6. So "code above" is reached with `>` after an even code and with
# `>=` after an odd one.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def ceil_ue8m0_exponent(value: torch.Tensor) -> torch.Tensor:
    """Biased exponent e of the smallest power of two >= `value`, clamped to [1, 254].

    value: float32, positive (or NaN/Inf, which give 254). Computed on the FP32 bit pattern:
    the exponent field, plus one if any mantissa bit is set. Returns int32 of the same shape.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"value: expected float32, got {value.dtype}")
    bits = value.contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return exponent.clamp(1, 254)


def ue8m0_to_float(exponent: torch.Tensor) -> torch.Tensor:
    """2^(e-127) as float32 for biased exponents e (any integer dtype); e = 255 is NaN."""
    e = exponent.to(torch.int32)
    value = (e.clamp(1, 254) << 23).view(torch.float32)
    value = torch.where(e == 0, torch.full_like(value, 2.0**-127), value)
    return torch.where(e == 255, torch.full_like(value, float("nan")), value)


def _check_float_tensor(name: str, t: torch.Tensor, min_dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"{name}: expected bfloat16, float16 or float32, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(t.shape)}")
    if t.shape[-1] % SCALE_GROUP != 0:
        raise ValueError(
            f"{name}: last dim must be a multiple of {SCALE_GROUP}, got shape {tuple(t.shape)}"
        )


def num_sf_words(hidden: int) -> int:
    """int32 words of packed UE8M0 scales for a row of `hidden` elements: ceil(hidden / 128)."""
    return -(-hidden // (SCALE_GROUP * GROUPS_PER_WORD))


def pack_ue8m0(exponents: torch.Tensor) -> torch.Tensor:
    """[..., G] integer exponents -> [..., ceil(G/4)] int32, byte j of word i = group 4i+j.

    Missing groups of the last word are padded with 127.
    """
    groups = exponents.shape[-1]
    words = -(-groups // GROUPS_PER_WORD)
    padded = torch.full(
        (*exponents.shape[:-1], words * GROUPS_PER_WORD), UE8M0_PAD, dtype=torch.uint8,
        device=exponents.device,
    )
    padded[..., :groups] = exponents.to(torch.uint8)
    # Little-endian reinterpretation: every platform torch and CUDA run on is little-endian.
    return padded.view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., W] int32 packed exponents -> [..., groups] uint8 (inverse of `pack_ue8m0`)."""
    return packed.contiguous().view(torch.uint8)[..., :groups]


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 e4m3 with one UE8M0 scale per 32 elements.

    x: [T, H] bfloat16 / float16 / float32, H a multiple of 32, T may be 0.
    Returns (x_fp8 [T, H] float8_e4m3fn, x_sf [T, ceil(H/128)] int32 packed exponents).
    """
    _check_float_tensor("x", x, 2)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [T, H], got {tuple(x.shape)}")
    tokens, hidden = x.shape
    groups = x.float().reshape(tokens, hidden // SCALE_GROUP, SCALE_GROUP)
    amax = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    exponent = ceil_ue8m0_exponent(amax / FP8_MAX)
    scaled = groups / ue8m0_to_float(exponent).unsqueeze(-1)
    x_fp8 = scaled.to(torch.float8_e4m3fn).reshape(tokens, hidden)
    return x_fp8, pack_ue8m0(exponent)


def dequantize_fp8(x_fp8: torch.Tensor, x_sf: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_fp8`: [T, H] float8_e4m3fn + [T, ceil(H/128)] int32 -> float32 [T, H]."""
    if not isinstance(x_fp8, torch.Tensor) or x_fp8.dtype != torch.float8_e4m3fn:
        raise TypeError(f"x_fp8: expected a float8_e4m3fn tensor, got {getattr(x_fp8, 'dtype', type(x_fp8))}")
    if x_fp8.dim() != 2 or x_fp8.shape[1] % SCALE_GROUP != 0:
        raise ValueError(f"x_fp8: expected shape [T, H] with H a multiple of 32, got {tuple(x_fp8.shape)}")
    tokens, hidden = x_fp8.shape
    if not isinstance(x_sf, torch.Tensor) or x_sf.dtype != torch.int32:
        raise TypeError(f"x_sf: expected an int32 tensor, got {getattr(x_sf, 'dtype', type(x_sf))}")
    if tuple(x_sf.shape) != (tokens, num_sf_words(hidden)):
        raise ValueError(
            f"x_sf: expected shape {(tokens, num_sf_words(hidden))} for x_fp8 of shape "
            f"{tuple(x_fp8.shape)}, got {tuple(x_sf.shape)}"
        )
    if x_sf.device != x_fp8.device:
        raise ValueError(f"x_sf: expected device {x_fp8.device}, got {x_sf.device}")
    exponent = unpack_ue8m0(x_sf, hidden // SCALE_GROUP)
    scale = ue8m0_to_float(exponent).unsqueeze(-1)
    groups = x_fp8.float().reshape(tokens, hidden // SCALE_GROUP, SCALE_GROUP)
    return (groups * scale).reshape(tokens, hidden)


def _e2m1_codes(magnitude: torch.Tensor) -> torch.Tensor:
    code = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for midpoint, inclusive in _E2M1_STEPS:
        above = magnitude >= midpoint if inclusive else magnitude > midpoint
        code += above.to(torch.uint8)
    return code


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights to MXFP4 along their last dim (K).

    w: [..., N, K] bfloat16 / float16 / float32, finite, K a multiple of 32.
    Returns (w_q [..., N, K/2] uint8, element 2i in the low nibble; w_sf [..., N, K/32] uint8
    biased exponents).
    """
    _check_float_tensor("w", w, 2)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w: expected finite values, found NaN or Inf")
    *lead, n, k = w.shape
    groups = w.float().reshape(*lead, n, k // SCALE_GROUP, SCALE_GROUP)
    amax = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    exponent = ceil_ue8m0_exponent(amax / FP4_MAX)
    scaled = groups / ue8m0_to_float(exponent).unsqueeze(-1)
    code = _e2m1_codes(scaled.abs())
    code |= ((scaled < 0) & (code != 0)).to(torch.uint8) << 3
    code = code.reshape(*lead, n, k)
    w_q = code[..., 0::2] | (code[..., 1::2] << 4)
    return w_q, exponent.to(torch.uint8)


def e2m1_lut(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [16]: the value of each e2m1 code."""
    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, -magnitudes])


def check_mxfp4(name: str, w_q: torch.Tensor, w_sf: torch.Tensor) -> None:
    """Raise unless (w_q, w_sf) is an MXFP4 pair: uint8 [..., N, K/2] and uint8 [..., N, K/32]."""
    for part, t in (("w_q", w_q), ("w_sf", w_sf)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError(f"{name} {part}: expected a uint8 tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() < 2:
            raise ValueError(f"{name} {part}: expected at least 2 dims, got {tuple(t.shape)}")
    if w_q.shape[-1] % (SCALE_GROUP // 2) != 0:
        raise ValueError(
            f"{name} w_q: last dim (K/2) must be a multiple of 16, got shape {tuple(w_q.shape)}"
        )
    expected_sf = (*w_q.shape[:-1], w_q.shape[-1] * 2 // SCALE_GROUP)
    if tuple(w_sf.shape) != expected_sf:
        raise ValueError(
            f"{name} w_sf: expected shape {expected_sf} for w_q of shape {tuple(w_q.shape)}, "
            f"got {tuple(w_sf.shape)}"
        )
    if w_sf.device != w_q.device:
        raise ValueError(f"{name} w_sf: expected device {w_q.device}, got {w_sf.device}")


def dequantize_mxfp4(w_q: torch.Tensor, w_sf: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_mxfp4`: uint8 [..., N, K/2] + uint8 [..., N, K/32] -> float32 [..., N, K]."""
    check_mxfp4("weights", w_q, w_sf)
    *lead, n, half_k = w_q.shape
    k = half_k * 2
    lut = e2m1_lut(w_q.device)
    codes = torch.stack([w_q & 0xF, w_q >> 4], dim=-1).reshape(*lead, n, k)
    values = lut[codes.long()].reshape(*lead, n, k // SCALE_GROUP, SCALE_GROUP)
    scale = ue8m0_to_float(w_sf).unsqueeze(-1)
    return (values * scale).reshape(*lead, n, k)


def rebase_fp8_steps(q: torch.Tensor, scales: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 rows with one power-of-two scale per 32 columns, re-expressed with one scale per 128
    (the reference of `kernels/rebase.py`, which the prefill GEMM tiles read).

    q: [R, >= k] float8_e4m3fn; scales: [R, 4 * ceil(k / 128)] float32 (a GEMM step's 4 groups
    per 128 columns, padding past k / 32 ignored). In each step of 128 columns every group is
    multiplied by its scale over the step's largest (groups past k left out) and rounded to
    e4m3; the step's 4 scale entries all become that largest scale. Returns (q', scales').
    """
    rows = q.shape[0]
    groups = -(-k // SCALE_GROUP)
    per_step = 128 // SCALE_GROUP
    out_q, out_s = q.clone(), scales.clone()
    for first in range(0, groups, per_step):
        step = range(first, min(first + per_step, groups))
        top = scales[:, list(step)].amax(dim=1)
        for g in step:
            cols = slice(g * SCALE_GROUP, min((g + 1) * SCALE_GROUP, k))
            out_q[:, cols] = (q[:, cols].float() * (scales[:, g] / top).unsqueeze(1)).to(torch.float8_e4m3fn)
        out_s[:, first:first + per_step] = top.reshape(rows, 1)
    return out_q, out_s
