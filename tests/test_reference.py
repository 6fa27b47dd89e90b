"""The float64 oracle against naive MoEs written here, and its rounding order step by step."""

import pytest
import torch
import torch.nn.functional as F

import megamoe
from megamoe.testing import MODEL_SHAPES, MoEShape, make_problem, relative_error

from tolerances import (BF16_REFERENCE_VS_UNROUNDED, FP8_REFERENCE_VS_DEQUANTIZED,
                        FP8_REFERENCE_VS_UNQUANTIZED)


def naive_moe(x, topk_idx, topk_weights, w1, w2):
    """Textbook float64 MoE, token by token, no rounding anywhere."""
    x = x.double()
    inter = w1.shape[1] // 2
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[t, k])
            if e < 0:
                continue
            h = w1[e].double() @ x[t]
            y[t] += float(topk_weights[t, k]) * (w2[e].double() @ (F.silu(h[:inter]) * h[inter:]))
    return y


SHAPE = MoEShape("small", 8, 3, 160, 96)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_mode_against_unrounded_moe(seed):
    p = make_problem(SHAPE, 21, mode="bf16xbf16", masked_ratio=0.2, seed=seed)
    ref = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2, mode="bf16xbf16")
    err = relative_error(ref, naive_moe(p.x, p.topk_idx, p.topk_weights, p.w1, p.w2))
    assert 0 < err < BF16_REFERENCE_VS_UNROUNDED


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_mode_against_float_moe(seed):
    p = make_problem(SHAPE, 21, masked_ratio=0.2, seed=seed)
    ref = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2)
    w1 = megamoe.dequantize_mxfp4(*p.l1)
    w2 = megamoe.dequantize_mxfp4(*p.l2)
    assert relative_error(ref, naive_moe(p.x, p.topk_idx, p.topk_weights, w1, w2)) < FP8_REFERENCE_VS_DEQUANTIZED
    assert relative_error(ref, naive_moe(p.x, p.topk_idx, p.topk_weights, p.w1, p.w2)) < FP8_REFERENCE_VS_UNQUANTIZED


def _bf16(t):
    return t.to(torch.bfloat16).double()


def _fp8_roundtrip_per32(a):
    """FP8 e4m3 with a power-of-two scale per 32, written out here from the format's rule."""
    g = a.reshape(a.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax.double() / 448)))  # exact for these magnitudes
    return ((g / scale).float().to(torch.float8_e4m3fn).double() * scale).reshape(a.shape)


@pytest.mark.parametrize("clamp", [None, 0.02])
def test_rounding_order_step_by_step(clamp):
    """One token, two slots: every step of DESIGN.md section 1 step 4, in order, by hand."""
    p = make_problem(SHAPE, 1, seed=5)
    idx = torch.tensor([[3, 6, -1]])
    w = torch.tensor([[0.7, 0.2, 0.1]])
    ref = megamoe.reference.mega_moe_reference(p.x, idx, w, p.l1, p.l2, activation_clamp=clamp,
                                               routed_scaling_factor=2.5)
    x = _fp8_roundtrip_per32(p.x.double())
    y = torch.zeros(SHAPE.hidden, dtype=torch.float64)
    for e, weight in ((3, 0.7), (6, 0.2)):
        w1 = megamoe.dequantize_mxfp4(p.l1[0][e], p.l1[1][e]).double()
        w2 = megamoe.dequantize_mxfp4(p.l2[0][e], p.l2[1][e]).double()
        h = _bf16(x @ w1.T)
        gate, up = h[:, :96], h[:, 96:]
        if clamp is not None:
            gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
        scaled_w = float(torch.tensor(weight, dtype=torch.float32) * torch.tensor(2.5, dtype=torch.float32))
        a = (F.silu(gate) * up * scaled_w).float().double()
        a = _fp8_roundtrip_per32(a)
        y += _bf16(a @ w2.T)[0]
    expected = _bf16(y)
    assert relative_error(ref[0], expected) < 1e-6
    if clamp is not None:  # the clamp really bit: without it the result differs
        unclamped = megamoe.reference.mega_moe_reference(p.x, idx, w, p.l1, p.l2, routed_scaling_factor=2.5)
        assert relative_error(unclamped[0], expected) > 1e-3


def test_fp32_intermediate_scales_differ_from_ue8m0():
    p = make_problem(SHAPE, 9, seed=2)
    ue8m0 = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2)
    fp32 = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2,
                                                intermediate_sf="fp32")
    assert 0 < relative_error(fp32, ue8m0) < 0.05


def test_counts_masked_slots_and_zero_tokens():
    p = make_problem(SHAPE, 17, masked_ratio=0.5, seed=3)
    p.topk_idx[4] = -1
    y, counts = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2,
                                                     return_recv_counts=True)
    expected = torch.zeros(SHAPE.num_experts, dtype=torch.int32)
    for e in p.topk_idx[p.topk_idx >= 0].tolist():
        expected[e] += 1
    assert torch.equal(counts, expected)
    assert torch.equal(y[4], torch.zeros_like(y[4]))            # no valid slot: exact zeros
    empty = megamoe.reference.mega_moe_reference(p.x[:0], p.topk_idx[:0], p.topk_weights[:0], p.l1, p.l2)
    assert empty.shape == (0, SHAPE.hidden)


def test_nan_in_one_token_stays_there():
    p = make_problem(SHAPE, 6, seed=4)
    x = p.x.clone()
    x[2, 7] = float("nan")
    y = megamoe.reference.mega_moe_reference(x, p.topk_idx, p.topk_weights, p.l1, p.l2)
    clean = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2)
    keep = torch.arange(6) != 2
    assert torch.equal(y[keep], clean[keep])
    assert torch.isnan(y[2]).any()


def test_real_model_shape_gpt_oss_runs():
    shape = MODEL_SHAPES["gpt-oss-120b"]
    p = make_problem(shape, 2, seed=0, num_experts=4)
    y = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2)
    assert y.shape == (2, 2880) and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="fp4"), ValueError, "mode"),
    (dict(intermediate_sf="e4m3"), ValueError, "intermediate_sf"),
    (dict(activation_clamp=-1.0), ValueError, "activation_clamp"),
])
def test_reference_rejects_bad_options(kwargs, error, match):
    p = make_problem(SHAPE, 3)
    with pytest.raises(error, match=match):
        megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2, **kwargs)


def test_reference_rejects_bad_routing():
    p = make_problem(SHAPE, 3)
    bad = p.topk_idx.clone()
    bad[0, 0] = SHAPE.num_experts
    with pytest.raises(ValueError, match="topk_idx"):
        megamoe.reference.mega_moe_reference(p.x, bad, p.topk_weights, p.l1, p.l2)
    with pytest.raises(ValueError, match="topk_weights"):
        megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights[:, :1], p.l1, p.l2)
    with pytest.raises(TypeError, match="l1_weights"):
        megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.w1, p.l2)
