"""MegaMoELayer and its routers, without transformers.

Routers against float64 formulas written out here (token by token); the layer against the float64
oracle on the routing its own router produced, for each router, activation and mode.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import megamoe
from megamoe.layer import (BufferPool, GroupLimitedTopKRouter, MegaMoELayer, SoftmaxTopKRouter, SwiGLUMLP,
                           TopKSoftmaxRouter)
from megamoe.testing import MoEShape, make_problem, relative_error

from tolerances import LAYER_EXACT_PRODUCTS, LAYER_KERNEL_VS_REFERENCE, ROUTER_WEIGHTS

H, I, E, K = 64, 64, 8, 2


def _randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _fill(router, seed):
    router.weight.copy_(_randn(*router.weight.shape, seed=seed, scale=router.hidden ** -0.5))
    if isinstance(router, TopKSoftmaxRouter):
        router.bias.copy_(_randn(router.num_experts, seed=seed + 1, scale=0.3))
    if isinstance(router, GroupLimitedTopKRouter):
        router.e_score_correction_bias.copy_(_randn(router.num_experts, seed=seed + 1, scale=0.3))
    return router


def _same_choice(idx, ref_idx):
    """Slot order is not part of the contract: compare each token's set of experts."""
    return torch.equal(idx.sort(dim=1).values, ref_idx.sort(dim=1).values)


def _gathered(weights, idx, ref_weights, ref_idx):
    """The reference's weights in the slot order of `idx`."""
    order = (idx.unsqueeze(2) == ref_idx.unsqueeze(1)).float().argmax(dim=2)
    return weights, ref_weights.gather(1, order)


# ------------------------------------------------------------------------------ routers


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_router(renormalize):
    router = _fill(SoftmaxTopKRouter(H, E, 3, renormalize, dtype=torch.float32), seed=1)
    x = _randn(19, H, seed=2)
    idx, w = router(x)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == (19, 3)
    probs = torch.softmax(x.double() @ router.weight.double().T, dim=-1)
    ref_w, ref_idx = probs.topk(3, dim=-1)
    if renormalize:
        ref_w = ref_w / ref_w.sum(dim=-1, keepdim=True)
    assert _same_choice(idx, ref_idx)
    got, expected = _gathered(w, idx, ref_w, ref_idx)
    assert torch.allclose(got.double(), expected, rtol=ROUTER_WEIGHTS, atol=0)


def _group_limited_reference(x, weight, bias, groups, topk_groups, topk, renormalize):
    """DeepSeek-V3's noaux_tc routing, one token at a time, in float64."""
    scores = torch.sigmoid(x.double() @ weight.double().T)
    per_group = weight.shape[0] // groups
    idx, w = [], []
    for s in scores:
        biased = s + bias.double()
        rank = [biased[g * per_group:(g + 1) * per_group].topk(min(2, per_group)).values.sum() for g in range(groups)]
        kept = torch.tensor(rank).topk(topk_groups).indices.tolist()
        candidates = [e for e in range(weight.shape[0]) if e // per_group in kept]
        chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:topk]
        weights = s[chosen]
        idx.append(chosen)
        w.append(weights / weights.sum() if renormalize else weights)
    return torch.tensor(idx), torch.stack(w)


@pytest.mark.parametrize("groups, topk_groups", [(4, 2), (1, 1)])
def test_group_limited_router(groups, topk_groups):
    router = _fill(GroupLimitedTopKRouter(H, E, 3, num_groups=groups, topk_groups=topk_groups,
                                          routed_scaling_factor=2.5), seed=3)
    x = _randn(23, H, seed=4)
    idx, w = router(x)
    ref_idx, ref_w = _group_limited_reference(x, router.weight, router.e_score_correction_bias, groups, topk_groups,
                                              3, True)
    assert _same_choice(idx, ref_idx)
    got, expected = _gathered(w, idx, ref_w, ref_idx)
    assert torch.allclose(got.double(), expected, rtol=ROUTER_WEIGHTS, atol=0)
    if topk_groups < groups:
        plain = (torch.sigmoid(x @ router.weight.T) + router.e_score_correction_bias).topk(3).indices
        assert not _same_choice(idx, plain), "no token was affected by the group limit: the case tests nothing"


def test_group_limited_router_keeps_fp32_bias_through_casts():
    router = _fill(GroupLimitedTopKRouter(H, E, 2, num_groups=2, topk_groups=1), seed=5)
    bias = router.e_score_correction_bias.clone()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, bias)


def test_topk_softmax_router():
    router = _fill(TopKSoftmaxRouter(H, E, 3, dtype=torch.float32), seed=6)
    x = _randn(17, H, seed=7)
    idx, w = router(x)
    logits = x.double() @ router.weight.double().T + router.bias.double()
    top, ref_idx = logits.topk(3, dim=-1)
    assert _same_choice(idx, ref_idx)
    got, expected = _gathered(w, idx, torch.softmax(top, dim=-1), ref_idx)
    assert torch.allclose(got.double(), expected, rtol=ROUTER_WEIGHTS, atol=0)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SoftmaxTopKRouter(H, 4, 5), ValueError, "num_topk"),
    (lambda: SoftmaxTopKRouter(0, 4, 2), ValueError, "hidden"),
    (lambda: GroupLimitedTopKRouter(H, 8, 2, num_groups=3), ValueError, "num_groups"),
    (lambda: GroupLimitedTopKRouter(H, 8, 2, num_groups=2, topk_groups=3), ValueError, "topk_groups"),
    (lambda: GroupLimitedTopKRouter(H, 8, 6, num_groups=4, topk_groups=2), ValueError, "num_topk"),
    (lambda: GroupLimitedTopKRouter(H, 8, 2, score_func="softmax"), ValueError, "score_func"),
    (lambda: GroupLimitedTopKRouter(H, 8, 2, routed_scaling_factor=0.0), ValueError, "routed_scaling_factor"),
])
def test_router_arguments_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_router_input_is_checked():
    router = SoftmaxTopKRouter(H, E, K)
    with pytest.raises(ValueError, match="x"):
        router(torch.randn(3, H + 32))
    with pytest.raises(TypeError, match="x"):
        router(torch.ones(3, H, dtype=torch.int32))


# ------------------------------------------------------------------------------ the layer


def _layer_case(kind: str, mode: str, device, seed: int = 0, mma: str = "fp8"):
    """A layer of `kind` with random weights (and the pieces the reference needs)."""
    p = make_problem(MoEShape("layer", E, K, H, I), 1, mode=mode, seed=seed)
    bias = {}
    options = dict(mma=mma)
    if kind == "softmax":
        router = SoftmaxTopKRouter(H, E, K, True)
    elif kind == "group_limited":
        router = GroupLimitedTopKRouter(H, E, K, num_groups=4, topk_groups=2, routed_scaling_factor=2.5)
        shared = SwiGLUMLP(H, 2 * I, dtype=torch.bfloat16)
        for i, lin in enumerate((shared.gate_proj, shared.up_proj, shared.down_proj)):
            lin.weight.copy_(_randn(*lin.weight.shape, seed=seed + 10 + i, scale=lin.weight.shape[1] ** -0.5))
        options["shared_experts"] = shared
    else:
        router = TopKSoftmaxRouter(H, E, K)
        bias = dict(l1_bias=_randn(E, 2 * I, seed=seed + 20, scale=0.1),
                    l2_bias=_randn(E, H, seed=seed + 21, scale=0.1))
        options.update(activation="gpt_oss", activation_clamp=0.5)
    _fill(router, seed + 30)
    layer = MegaMoELayer(router, p.w1, p.w2, mode=mode, **bias, **options).to(device)
    return layer, p, bias


def _expected(layer, p, bias, x):
    """The float64 oracle on the layer's own routing, plus the shared expert as the model runs it."""
    flat = x.reshape(-1, H)
    idx, w = layer.router(flat)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    y = megamoe.reference.mega_moe_reference(
        flat.cpu(), idx.cpu(), w.cpu(), p.l1, p.l2, mode=layer.mode, activation=layer.activation,
        activation_clamp=layer.activation_clamp, routed_scaling_factor=layer.router.routed_scaling_factor,
        l1_bias=cpu(bias.get("l1_bias")), l2_bias=cpu(bias.get("l2_bias")))
    y = y.to(x.device).to(x.dtype).view(x.shape)
    if layer.shared_experts is not None:
        y = y + layer.shared_experts(x)
    return y


@pytest.mark.parametrize("kind, mode, shape, dtype, chunk", [
    ("softmax", "fp8xfp4", (1, 7, H), torch.float32, 3),          # three chunks, fp32 in and out
    ("group_limited", "bf16xbf16", (5, H), torch.bfloat16, 16),   # scaling factor, shared expert
    ("topk_softmax", "fp8xfp4", (2, 3, H), torch.float16, 16),    # gpt-oss: biases, clamp; after .half()
])
def test_layer_matches_reference(kind, mode, shape, dtype, chunk, device):
    layer, p, bias = _layer_case(kind, mode, device)
    layer.max_tokens_per_call = chunk
    if dtype == torch.float16:
        layer.half()  # routers follow; expert bytes and FP32 biases must not
        assert layer.l1.bias.dtype == torch.float32 and layer.l1.w.dtype == torch.uint8
    x = _randn(*shape, seed=40).to(device=device, dtype=dtype)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert relative_error(out.float(), _expected(layer, p, bias, x).float()) <= LAYER_KERNEL_VS_REFERENCE


def test_layer_with_exact_products(device):
    layer, p, bias = _layer_case("softmax", "fp8xfp4", device, mma="fp16")
    x = _randn(5, H, seed=41).to(device)
    out = layer(x)
    assert "mma=fp16" in repr(layer) and [b.mma for b in layer.buffers._buffers.values()] == ["fp16"]
    assert relative_error(out.float(), _expected(layer, p, bias, x).float()) <= LAYER_EXACT_PRODUCTS


def test_layer_zero_tokens_and_router_weights(device):
    layer, _, _ = _layer_case("topk_softmax", "fp8xfp4", device)
    layer.return_router_weights = True
    out, weights = layer(torch.randn(0, H, device=device))
    assert out.shape == (0, H) and weights.shape == (0, K)


def test_buffer_pool_shares_by_shape():
    pool = BufferPool()
    a = pool.get(torch.device("cpu"), E, 4, K, H, I, "fp8xfp4")
    assert pool.get(torch.device("cpu"), E, 4, K, H, I, "fp8xfp4") is a
    b = pool.get(torch.device("cpu"), E, 4, K, H, I, "bf16xbf16")
    c = pool.get(torch.device("cpu"), E, 4, K, H, I, "fp8xfp4", "fp16")
    assert b is not a and c is not a and c.mma == "fp16"
    assert pool.nbytes == a.nbytes + b.nbytes + c.nbytes
    pool.destroy()
    assert a.destroyed and pool.nbytes == 0


def test_deepcopy_gives_a_fresh_shared_pool():
    p = make_problem(MoEShape("layer", E, K, H, I), 1)
    pool = BufferPool()
    pool.get(torch.device("cpu"), E, 4, K, H, I, "fp8xfp4")
    model = torch.nn.ModuleList(MegaMoELayer(SoftmaxTopKRouter(H, E, K), p.l1, p.l2, buffers=pool) for _ in range(2))
    copied = copy.deepcopy(model)
    assert copied[0].buffers is copied[1].buffers and copied[0].buffers is not pool
    assert copied[0].buffers.nbytes == 0 and pool.nbytes > 0
    assert torch.equal(copied[0].l1.w, model[0].l1.w) and copied[0].l1.w is not model[0].l1.w


class _BadRouter(torch.nn.Module):
    num_experts, num_topk, routed_scaling_factor = E, K, 1.0

    def forward(self, x):
        idx = torch.full((x.shape[0], K), E, dtype=torch.int64)
        return idx, torch.ones(x.shape[0], K)


def test_custom_router_ids_are_checked():
    p = make_problem(MoEShape("layer", E, K, H, I), 1)
    layer = MegaMoELayer(_BadRouter(), p.w1, p.w2)
    with pytest.raises(ValueError, match="topk_idx"):
        layer(torch.randn(3, H))


@pytest.mark.parametrize("change, error, match", [
    (dict(router=SoftmaxTopKRouter(H, E + 1, K)), ValueError, "l1_weights"),
    (dict(router="softmax"), TypeError, "router"),
    (dict(mode="fp8xfp8"), ValueError, "mode"),
    (dict(mma="fp4"), ValueError, "mma"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(activation_clamp=-1.0), ValueError, "activation_clamp"),
    (dict(max_tokens_per_call=0), ValueError, "max_tokens_per_call"),
    (dict(buffers={}), TypeError, "buffers"),
    (dict(shared_experts=torch.ones(3)), TypeError, "shared_experts"),
    (dict(l1_bias=torch.zeros(E, I)), ValueError, "l1_bias"),
    (dict(l1_weights=torch.zeros(E, 2 * I, H + 8)), ValueError, "l1_weights"),
])
def test_layer_arguments_are_checked(change, error, match):
    p = make_problem(MoEShape("layer", E, K, H, I), 1, seed=3)
    args = dict(router=SoftmaxTopKRouter(H, E, K), l1_weights=p.w1, l2_weights=p.w2, mode="fp8xfp4")
    args.update(change)
    with pytest.raises(error, match=match):
        MegaMoELayer(args.pop("router"), args.pop("l1_weights"), args.pop("l2_weights"), **args)


def test_layer_bf16_mode_refuses_mxfp4_pairs():
    p = make_problem(MoEShape("layer", E, K, H, I), 1)
    with pytest.raises(TypeError, match="l1_weights"):
        MegaMoELayer(SoftmaxTopKRouter(H, E, K), p.l1, p.l2, mode="bf16xbf16")


def test_layer_input_is_checked():
    p = make_problem(MoEShape("layer", E, K, H, I), 1)
    layer = MegaMoELayer(SoftmaxTopKRouter(H, E, K), p.l1, p.l2)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 3, H + 32))
    with pytest.raises(TypeError, match="hidden_states"):
        layer(torch.ones(2, H, dtype=torch.int64))
    x = torch.randn(3, H)
    with pytest.raises(ValueError, match=r"topk_idx: expected a tensor \[3, 2\]"):
        layer.forward_experts(x, torch.zeros(3, 3, dtype=torch.int64), torch.ones(3, 3))
    with pytest.raises(ValueError, match="topk_weights"):
        layer.forward_experts(x, torch.zeros(3, K, dtype=torch.int64), torch.ones(2, K))
    with pytest.raises(ValueError, match="x"):
        layer.forward_experts(x[:, :32], torch.zeros(3, K, dtype=torch.int64), torch.ones(3, K))


def test_mxfp4_pairs_are_used_as_given():
    p = make_problem(MoEShape("layer", E, K, H, I), 1, seed=4)
    from_pair = MegaMoELayer(SoftmaxTopKRouter(H, E, K), p.l1, p.l2)
    from_dense = MegaMoELayer(SoftmaxTopKRouter(H, E, K), p.w1, p.w2)
    for a, b in ((from_pair.l1, from_dense.l1), (from_pair.l2, from_dense.l2)):
        assert torch.equal(a.w, b.w) and torch.equal(a.w_sf, b.w_sf)
    assert F.mse_loss(from_pair.l1.dequantize(0), p.w1[0].float()) > 0  # really quantized
