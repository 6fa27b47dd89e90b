"""The four format functions against independent formulas written here in numpy.

The oracle below never calls megamoe: scales come from frexp, FP8 rounding from an enumerated
e4m3 grid with ties to the even code, MXFP4 rounding from the enumerated e2m1 grid.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import megamoe

# ---------------------------------------------------------------- independent oracle

def _e4m3_table():
    """All finite e4m3fn values by code (0..126 positive), built from the bit layout."""
    values = []
    for code in range(127):
        exp, man = code >> 3, code & 7
        values.append(man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return np.array(values)


E4M3 = _e4m3_table()
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_to_grid(magnitude, grid):
    """Index of the nearest grid value; exact ties go to the even index (= even code)."""
    hi = np.clip(np.searchsorted(grid, magnitude, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = magnitude - grid[lo], grid[hi] - magnitude
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo)


def ceil_pow2_exponent(value):
    """Biased exponent of the smallest power of two >= value (value > 0, float32)."""
    mantissa, exp = np.frexp(np.float64(value))  # value = mantissa * 2^exp, mantissa in [0.5, 1)
    unbiased = exp - 1 if mantissa == 0.5 else exp
    return int(min(max(unbiased + 127, 1), 254))


def oracle_fp8(x):
    """x: float32 [T, H] -> (uint8 codes [T, H], exponents [T, H/32])."""
    t, h = x.shape
    codes = np.zeros((t, h), np.uint8)
    exps = np.zeros((t, h // 32), np.int64)
    for r in range(t):
        for g in range(h // 32):
            grp = x[r, 32 * g:32 * g + 32].astype(np.float32)
            amax = max(float(np.abs(grp).max()), np.float32(1e-4))
            e = ceil_pow2_exponent(np.float32(np.float32(amax) / np.float32(448.0)))
            exps[r, g] = e
            scaled = grp.astype(np.float64) / 2.0 ** (e - 127)
            idx = round_to_grid(np.abs(scaled), E4M3)
            codes[r, 32 * g:32 * g + 32] = idx | np.where(np.signbit(scaled), 0x80, 0)
    return codes, exps


def oracle_mxfp4(w):
    """w: float32 [N, K] -> (codes [N, K] 0..15, exponents [N, K/32])."""
    n, k = w.shape
    codes = np.zeros((n, k), np.uint8)
    exps = np.zeros((n, k // 32), np.int64)
    for r in range(n):
        for g in range(k // 32):
            grp = w[r, 32 * g:32 * g + 32].astype(np.float32)
            amax = max(float(np.abs(grp).max()), np.float32(1e-4))
            e = ceil_pow2_exponent(np.float32(np.float32(amax) / np.float32(6.0)))
            exps[r, g] = e
            scaled = grp.astype(np.float64) / 2.0 ** (e - 127)
            idx = round_to_grid(np.abs(scaled), E2M1)
            codes[r, 32 * g:32 * g + 32] = idx | np.where((scaled < 0) & (idx > 0), 8, 0)
    return codes, exps


def unpack_sf_bytes(x_sf, groups):
    """int32 words -> exponent bytes, byte j of word i = group 4i+j, computed with shifts."""
    words = x_sf.numpy().astype(np.int64) & 0xFFFFFFFF
    out = np.stack([(words >> (8 * j)) & 0xFF for j in range(4)], axis=-1).reshape(words.shape[0], 4 * words.shape[1])
    return out[:, :groups], out[:, groups:]


# ---------------------------------------------------------------- inputs

def special_values():
    """Values that probe rounding: e4m3 subnormals and ties, e2m1 ties, huge and tiny numbers."""
    sub = [m * 2.0**-9 for m in (0.5, 1, 1.5, 2.5, 3.5, 7, 7.5)]
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 448.0, 240.0, 232.0, 13.0, 0.0, -0.0]
    huge = [3.0e38, 1.0e30, 65504.0]
    tiny = [1e-30, 1e-38, 1e-45, 3e-6, 1e-4]
    vals = sub + ties + huge + tiny
    return vals + [-v for v in vals]


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
mixed_values = st.one_of(finite_f32, st.sampled_from(special_values()),
                         st.floats(-8, 8, width=32), st.floats(-2.0**-10, 2.0**-10, width=32))


@st.composite
def activation_arrays(draw, dtype):
    t = draw(st.integers(0, 4))
    h = 32 * draw(st.sampled_from([1, 3, 4, 5, 8]))
    arr = draw(hnp.arrays(np.float32, (t, h), elements=mixed_values))
    if t and draw(st.booleans()):
        g = draw(st.integers(0, h // 32 - 1))
        arr[draw(st.integers(0, t - 1)), 32 * g:32 * g + 32] = 0.0  # an all-zero group
    x = torch.from_numpy(arr)
    if dtype == torch.bfloat16:
        x = x.clamp(-3.0e38, 3.0e38)
    return x.to(dtype)


# ---------------------------------------------------------------- FP8

@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_quantize_fp8_matches_oracle(data, dtype):
    x = data.draw(activation_arrays(dtype))
    x_fp8, x_sf = megamoe.quantize_fp8(x)
    t, h = x.shape
    assert x_fp8.dtype == torch.float8_e4m3fn and tuple(x_fp8.shape) == (t, h)
    assert x_sf.dtype == torch.int32 and tuple(x_sf.shape) == (t, -(-h // 128))
    codes, exps = oracle_fp8(x.float().numpy())
    np.testing.assert_array_equal(x_fp8.view(torch.uint8).numpy(), codes)
    got_exps, pad = unpack_sf_bytes(x_sf, h // 32)
    np.testing.assert_array_equal(got_exps, exps)
    assert (pad == 127).all()


@pytest.mark.parametrize("hidden", [32, 96, 2880])
def test_fp8_real_shapes_and_roundtrip(hidden):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=g) * torch.exp2(torch.randint(-20, 20, (7, 1), generator=g))).bfloat16()
    x_fp8, x_sf = megamoe.quantize_fp8(x)
    codes, exps = oracle_fp8(x.float().numpy())
    np.testing.assert_array_equal(x_fp8.view(torch.uint8).numpy(), codes)
    np.testing.assert_array_equal(unpack_sf_bytes(x_sf, hidden // 32)[0], exps)
    back = megamoe.dequantize_fp8(x_fp8, x_sf)
    assert back.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: each element within half an ulp of its scaled value.
    scale = torch.exp2(torch.from_numpy(exps).float() - 127).repeat_interleave(32, dim=1)
    ulp_bound = torch.maximum(x.float().abs() * 2.0**-4, scale * 2.0**-10)
    assert ((back - x.float()).abs() <= ulp_bound).all()
    # Quantizing is idempotent on dequantized values.
    assert torch.equal(megamoe.dequantize_fp8(*megamoe.quantize_fp8(back)), back)


def test_fp8_every_code_roundtrips():
    # Row g*32..: each e4m3 code once per group, scaled so that the group's amax is exactly 448.
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)          # drop NaN codes
    values = codes.view(torch.float8_e4m3fn).float()
    pad = (-values.numel()) % 32
    values = torch.cat([values, torch.full((pad,), 448.0)]).reshape(1, -1)
    x_fp8, x_sf = megamoe.quantize_fp8(values)
    assert torch.equal(megamoe.dequantize_fp8(x_fp8, x_sf), values)


def test_fp8_zero_tokens():
    x_fp8, x_sf = megamoe.quantize_fp8(torch.zeros(0, 96, dtype=torch.bfloat16))
    assert x_fp8.shape == (0, 96) and x_sf.shape == (0, 1)
    assert megamoe.dequantize_fp8(x_fp8, x_sf).shape == (0, 96)


def test_fp8_nan_stays_in_its_group():
    x = torch.randn(2, 128)
    x[0, 40] = float("nan")
    x_fp8, x_sf = megamoe.quantize_fp8(x)
    ref_fp8, ref_sf = megamoe.quantize_fp8(torch.nan_to_num(x, nan=0.0))
    same = torch.ones(2, 128, dtype=torch.bool)
    same[0, 32:64] = False
    assert torch.equal(x_fp8.view(torch.uint8)[same], ref_fp8.view(torch.uint8)[same])


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(4, 48), ValueError),                      # H not a multiple of 32
    (torch.zeros(4, 64, dtype=torch.int32), TypeError),    # not a float tensor
    (torch.zeros(64), ValueError),                         # not 2-D
    (torch.zeros(2, 2, 64), ValueError),
])
def test_quantize_fp8_rejects(bad, error):
    with pytest.raises(error, match="x"):
        megamoe.quantize_fp8(bad)


def test_dequantize_fp8_rejects():
    x_fp8, x_sf = megamoe.quantize_fp8(torch.randn(3, 160))
    with pytest.raises(ValueError, match="x_sf"):
        megamoe.dequantize_fp8(x_fp8, x_sf[:, :1])
    with pytest.raises(TypeError, match="x_sf"):
        megamoe.dequantize_fp8(x_fp8, x_sf.float())
    with pytest.raises(TypeError, match="x_fp8"):
        megamoe.dequantize_fp8(x_fp8.float(), x_sf)


# ---------------------------------------------------------------- MXFP4

@st.composite
def weight_arrays(draw):
    lead = draw(st.sampled_from([(), (2,), (2, 1)]))
    n = draw(st.integers(1, 3))
    k = 32 * draw(st.sampled_from([1, 2, 3]))
    elements = st.one_of(finite_f32, st.sampled_from(special_values()), st.floats(-6, 6, width=32),
                         st.sampled_from([m * s for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
                                          for s in (1.0, 2.0**-3, 2.0**5)]))
    return torch.from_numpy(draw(hnp.arrays(np.float32, (*lead, n, k), elements=elements)))


@settings(max_examples=150, deadline=None)
@given(w=weight_arrays())
def test_quantize_mxfp4_matches_oracle(w):
    w_q, w_sf = megamoe.quantize_mxfp4(w)
    *lead, n, k = w.shape
    assert w_q.dtype == torch.uint8 and tuple(w_q.shape) == (*lead, n, k // 2)
    assert w_sf.dtype == torch.uint8 and tuple(w_sf.shape) == (*lead, n, k // 32)
    codes, exps = oracle_mxfp4(w.reshape(-1, k).numpy())
    got = w_q.reshape(-1, k // 2).numpy()
    np.testing.assert_array_equal(got & 0xF, codes[:, 0::2])
    np.testing.assert_array_equal(got >> 4, codes[:, 1::2])
    np.testing.assert_array_equal(w_sf.reshape(-1, k // 32).numpy(), exps)


def test_mxfp4_every_code_and_tie():
    # One group holds every e2m1 magnitude with both signs plus every midpoint, amax = 6.
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = grid + [-v for v in grid[1:]] + mids + [-m for m in mids] + [6.0, 6.0, 6.0]
    w = torch.tensor([row], dtype=torch.float32)
    w_q, w_sf = megamoe.quantize_mxfp4(w)
    assert w_sf.item() == 127
    back = megamoe.dequantize_mxfp4(w_q, w_sf)[0].tolist()
    assert back[:15] == grid + [-v for v in grid[1:]]
    assert back[15:22] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]           # ties to the even code
    assert back[22:29] == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    codes = torch.stack([w_q & 0xF, w_q >> 4], -1).flatten()
    assert codes[22].item() == 0                                          # -0.25 -> +0 (code 0)


@pytest.mark.parametrize("k", [32, 96, 2880])
def test_mxfp4_roundtrip_error(k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(3, 4, k, generator=g).bfloat16()
    w_q, w_sf = megamoe.quantize_mxfp4(w)
    back = megamoe.dequantize_mxfp4(w_q, w_sf)
    codes, exps = oracle_mxfp4(w.float().reshape(-1, k).numpy())
    values = (np.where(codes & 8, -1.0, 1.0) * E2M1[codes & 7]).reshape(-1, k // 32, 32)
    expected = values * np.exp2(exps.astype(np.float64) - 127)[..., None]
    np.testing.assert_array_equal(back.reshape(-1, k).numpy(), expected.reshape(-1, k).astype(np.float32))
    # Quantizing is idempotent on dequantized values.
    assert torch.equal(megamoe.dequantize_mxfp4(*megamoe.quantize_mxfp4(back)), back)


def test_mxfp4_zero_rows():
    w_q, w_sf = megamoe.quantize_mxfp4(torch.zeros(2, 0, 64))
    assert w_q.shape == (2, 0, 32) and w_sf.shape == (2, 0, 2)


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(4, 48), ValueError),
    (torch.zeros(64), ValueError),
    (torch.zeros(4, 64, dtype=torch.uint8), TypeError),
    (torch.full((2, 32), float("inf")), ValueError),
])
def test_quantize_mxfp4_rejects(bad, error):
    with pytest.raises(error, match="w"):
        megamoe.quantize_mxfp4(bad)


def test_dequantize_mxfp4_rejects():
    w_q, w_sf = megamoe.quantize_mxfp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="w_sf"):
        megamoe.dequantize_mxfp4(w_q, w_sf[:, :1])
    with pytest.raises(TypeError, match="w_q"):
        megamoe.dequantize_mxfp4(w_q.int(), w_sf)


def test_hf_gpt_oss_layout_decodes_the_same():
    """gpt-oss stores `*_blocks` [.., N, K/32, 16] and `*_scales` [.., N, K/32]; low nibble first."""
    w = torch.randn(2, 5, 64)
    w_q, w_sf = megamoe.quantize_mxfp4(w)
    blocks = w_q.reshape(2, 5, 2, 16)
    lut = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    lo = torch.tensor(lut)[(blocks & 0x0F).long()]
    hi = torch.tensor(lut)[(blocks >> 4).long()]
    hf = torch.stack([lo, hi], -1).reshape(2, 5, 2, 32)
    hf = torch.ldexp(hf, w_sf.to(torch.int32).unsqueeze(-1) - 127).reshape(2, 5, 64)
    assert torch.equal(hf, megamoe.dequantize_mxfp4(w_q, w_sf))
    assert math.isclose(float((hf - w).norm() / w.norm()), 0.1, abs_tol=0.06)
