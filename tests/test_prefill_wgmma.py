"""The Gluon prefill kernels (kernels/prefill_wgmma.py) on a Hopper GPU, against the float64
reference and against the Triton prefill tiles they replace (MEGAMOE_WGMMA=0).

Gluon does not run under the Triton interpreter, so these run through the device tool only:
`python -m pytest -m gpu tests/test_prefill_wgmma.py`.
"""

import functools

import pytest
import torch

import megamoe
from megamoe.kernels import prefill_wgmma
from megamoe.testing import MODEL_SHAPES, MoEShape, make_problem, relative_error

from tolerances import LAYER_EXACT_PRODUCTS, LAYER_KERNEL_VS_REFERENCE

pytestmark = pytest.mark.gpu

TAIL = MoEShape("tail", 8, 2, 320, 160)
"""K not a multiple of 128 in both GEMMs (2.5 and 1.25 steps): masked activation columns and
padding scale groups left out of each step's largest exponent."""


def _run(p, shape, tokens, monkeypatch, wgmma: bool, **kwargs):
    monkeypatch.setenv("MEGAMOE_WGMMA", "1" if wgmma else "0")
    calls = []   # the Gluon launches, "launch_l1" or "launch_l1/rows_above=2" (a split GEMM's MMA launch)

    def spy(*a, _f, _n, **k):
        calls.append(_n + (f"/rows_above={k['rows_above']}" if k.get("rows_above") else ""))
        return _f(*a, **k)

    for name in ("launch_l1", "launch_l2"):
        monkeypatch.setattr(prefill_wgmma, name, functools.partial(spy, _f=getattr(prefill_wgmma, name), _n=name))
    buf = megamoe.MegaMoEBuffer(shape.num_experts, tokens, shape.num_topk, shape.hidden, shape.intermediate,
                                intermediate_sf=kwargs.pop("intermediate_sf", "ue8m0"), mma=kwargs.pop("mma", "fp8"))
    l1, l2 = megamoe.transform_weights(p.l1, p.l2, l1_bias=kwargs.pop("l1_bias", None),
                                       l2_bias=kwargs.pop("l2_bias", None))
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.full_like(p.x, float("nan"))
    megamoe.mega_moe(y, l1, l2, buf, **kwargs)
    torch.cuda.synchronize()
    buf.destroy()
    return y, calls


def _reference(p, **kwargs):
    return megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2, **kwargs)


def _errors_gluon_and_triton(shape, tokens, experts, seed, monkeypatch, mma="fp8", gluon=("launch_l1", "launch_l2")):
    """The layer on the Gluon prefill kernels and on the Triton tiles (MEGAMOE_WGMMA=0), each
    checked to have taken its path (`gluon`: the GEMMs expected on the Gluon kernels): their
    relative errors against the float64 reference."""
    p = make_problem(shape, tokens, device="cuda", masked_ratio=0.1, seed=seed, num_experts=experts)
    shape = MoEShape(shape.name, experts or shape.num_experts, shape.num_topk, shape.hidden, shape.intermediate)
    y, calls = _run(p, shape, tokens, monkeypatch, True, mma=mma)
    assert calls == list(gluon), "the GEMMs did not take the Gluon kernels expected"
    y_triton, calls = _run(p, shape, tokens, monkeypatch, False, mma=mma)
    assert calls == []
    ref = _reference(p)
    return relative_error(y, ref), relative_error(y_triton, ref)


@pytest.mark.parametrize("shape, tokens, experts, warps, ws", [
    (TAIL, 1024, None, 4, False), (TAIL, 1024, None, 8, False), (TAIL, 1024, None, 4, True),
    (MODEL_SHAPES["v4-flash"], 1024, 16, 4, False), (MODEL_SHAPES["v4-flash"], 1024, 16, 4, True),
    (MODEL_SHAPES["gpt-oss-120b"], 1024, 16, 4, False), (MODEL_SHAPES["gpt-oss-120b"], 1024, 16, 8, False),
    (MODEL_SHAPES["gpt-oss-120b"], 1024, 16, 4, True)])
def test_prefill_kernels_match_reference_and_triton_tiles(shape, tokens, experts, warps, ws, monkeypatch):
    """With 8 warps (128 weight rows, 64 intermediate columns a program) TAIL's H = 320 and
    I = 160 and gpt-oss's H = 2880 leave the last program's rows partly past the end (masked).
    ws: the warp-specialized GEMM core (`prefill_wgmma._gemm_ws`)."""
    monkeypatch.setattr(prefill_wgmma, "NUM_WARPS", warps)
    monkeypatch.setattr(prefill_wgmma, "WARP_SPECIALIZED", ws)
    err, err_triton = _errors_gluon_and_triton(shape, tokens, experts, tokens, monkeypatch)
    assert err <= LAYER_KERNEL_VS_REFERENCE, (err, err_triton)
    # Both multiply on the FP8 tensor cores with FP32 promotion; neither should be much worse.
    assert err <= 2 * err_triton + 1e-3, (err, err_triton)


@pytest.mark.parametrize("shape, tokens, experts, warps, mma", [
    (TAIL, 1024, None, 4, "fp16"), (TAIL, 1024, None, 8, "fp16"),
    (MODEL_SHAPES["v4-flash"], 1024, 16, 4, "fp16"), (MODEL_SHAPES["v4-flash"], 1024, 16, 4, "fp16-l1"),
    (MODEL_SHAPES["gpt-oss-120b"], 1024, 16, 4, "fp16"), (MODEL_SHAPES["gpt-oss-120b"], 1024, 16, 8, "fp16-l1")])
def test_exact_products_kernels_match_reference_and_triton_tiles(shape, tokens, experts, warps, mma, monkeypatch):
    """The exact-products kernels (`_gemm_t`: FP16 weights and activations on the FP16 tensor
    cores; 4 or 8 warps, 64 or 128 tokens a tile): with both GEMMs exact only FP32 summation
    order separates them from float64; with L1 exact (fp16-l1) and L2 on FP8 MMAs, they stay as
    close as the Triton tiles in the same mode. TAIL's and gpt-oss's H and I leave the last
    program's 128 weight rows partly past the end (masked)."""
    monkeypatch.setattr(prefill_wgmma, "EXACT_WARPS", warps)
    err, err_triton = _errors_gluon_and_triton(shape, tokens, experts, tokens + warps, monkeypatch, mma=mma)
    if mma == "fp16":
        assert err <= LAYER_EXACT_PRODUCTS and err_triton <= LAYER_EXACT_PRODUCTS, (err, err_triton)
    else:
        assert err <= LAYER_KERNEL_VS_REFERENCE and err <= 2 * err_triton + 1e-3, (err, err_triton)


@pytest.mark.parametrize("shape, tokens, experts, mma", [
    (TAIL, 40, None, "fp16"), (MODEL_SHAPES["v4-flash"], 64, 16, "fp16"),
    (MODEL_SHAPES["v4-flash"], 64, 16, "fp16-l1"), (MODEL_SHAPES["gpt-oss-120b"], 32, 16, "fp16-l1"),
    (MODEL_SHAPES["gpt-oss-120b"], 192, 16, "fp16")])
def test_exact_products_take_the_gluon_kernels_past_three_rows_an_expert(shape, tokens, experts, mma, monkeypatch):
    """From `config.EXACT_GLUON_FROM` (3) rows an expert on, the exact GEMMs leave the Triton
    row tiles for the Gluon kernels: 10 and 8 rows an expert here take exact `_gemm` (16-token
    tiles, EXACT_SMALL_*), 24 and 48 `_gemm_t`'s 64-token shape (EXACT_NARROW_*), most tiles
    partly padding and masked; the FP8 L2 of fp16-l1 keeps its Triton row tiles."""
    gluon = ("launch_l1", "launch_l2") if mma == "fp16" else ("launch_l1",)
    err, err_triton = _errors_gluon_and_triton(shape, tokens, experts, tokens + 1, monkeypatch, mma=mma, gluon=gluon)
    if mma == "fp16":
        assert err <= LAYER_EXACT_PRODUCTS and err_triton <= LAYER_EXACT_PRODUCTS, (err, err_triton)
    else:
        assert err <= LAYER_KERNEL_VS_REFERENCE and err <= 2 * err_triton + 1e-3, (err, err_triton)


@pytest.mark.parametrize("shape, tokens, experts, mma", [
    (TAIL, 10, None, "fp16"), (MODEL_SHAPES["v4-flash"], 6, 16, "fp16-l1"), (MODEL_SHAPES["v4-flash"], 8, 16, "fp16"),
    (MODEL_SHAPES["gpt-oss-120b"], 8, 16, "fp16-l1")])
def test_split_exact_gemms_run_the_experts_past_two_rows_on_the_gluon_kernels(shape, tokens, experts, mma,
                                                                               monkeypatch):
    """From `config.FMA_UP_TO` to `MIX_UP_TO` rows an expert (1.8-2.7 here) a GEMM is split by
    the experts' row counts (`GemmConfig.fma_mix` = 2). An exact one runs the experts with
    three rows or more on exact `_gemm` (rebased rows; rows_above = 2) and the others on the
    FMA tiles, which read the rows as they were (L1) or rebased in place (L2)."""
    p = make_problem(shape, tokens, device="cuda", masked_ratio=0.1, seed=tokens + 7, num_experts=experts)
    counts = torch.bincount(p.topk_idx[p.topk_idx >= 0].long().flatten(), minlength=experts or shape.num_experts)
    assert bool((counts > 2).any()) and bool(((counts > 0) & (counts <= 2)).any()), counts
    gluon = ("launch_l1/rows_above=2", "launch_l2/rows_above=2") if mma == "fp16" else ("launch_l1/rows_above=2",)
    err, err_triton = _errors_gluon_and_triton(shape, tokens, experts, tokens + 7, monkeypatch, mma=mma, gluon=gluon)
    if mma == "fp16":
        assert err <= LAYER_EXACT_PRODUCTS and err_triton <= LAYER_EXACT_PRODUCTS, (err, err_triton)
    else:
        assert err <= LAYER_KERNEL_VS_REFERENCE and err <= 2 * err_triton + 1e-3, (err, err_triton)


def test_bias_clamp_gpt_oss_activation_and_fp32_scales(monkeypatch):
    shape = MoEShape("gpt-oss-16", 16, 4, 2880, 2880)
    p = make_problem(shape, 512, device="cuda", masked_ratio=0.1, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    b1 = torch.randn(16, 2 * 2880, device="cuda", generator=g) * 0.1
    b2 = torch.randn(16, 2880, device="cuda", generator=g) * 0.1
    opts = dict(activation="gpt_oss", activation_clamp=7.0)
    for sf in ("ue8m0", "fp32"):
        y, calls = _run(p, shape, 512, monkeypatch, True, l1_bias=b1, l2_bias=b2, intermediate_sf=sf, **opts)
        # FP32 intermediate scales are not powers of two: L2 keeps the Triton tiles then.
        assert calls == (["launch_l1", "launch_l2"] if sf == "ue8m0" else ["launch_l1"])
        ref = _reference(p, l1_bias=b1, l2_bias=b2, intermediate_sf=sf, **opts)
        assert relative_error(y, ref) <= LAYER_KERNEL_VS_REFERENCE


@pytest.mark.parametrize("mma, binades, tolerance", [("fp8", 20, LAYER_KERNEL_VS_REFERENCE),
                                                      ("fp16", 20, LAYER_EXACT_PRODUCTS),
                                                      ("fp16", 32, LAYER_EXACT_PRODUCTS)])
def test_weight_scales_far_apart_round_like_the_rebase(mma, binades, tolerance, monkeypatch):
    """Groups 20 binades below their step's largest: past the FP8 fold's exact range (14), their
    values round to e4m3 (at most 2^-10 of the step's scale) and the layer stays in contract.
    The FP16 decode is exact to 24 binades and rounds past that (32: subnormals or zero). Such
    groups weigh too little to show in the layer's error; what this checks is that their
    multipliers (normal, subnormal, zero) neither move the step's scale nor blow up a value."""
    shape = MoEShape("spread", 8, 2, 512, 256)
    p = make_problem(shape, 1024, device="cuda", seed=5)
    g = torch.Generator(device="cuda").manual_seed(6)
    for w_q, w_sf in (p.l1, p.l2):
        far = torch.rand(w_sf.shape, device="cuda", generator=g) < 0.1
        w_sf.copy_(torch.where(far, w_sf.int() - binades, w_sf.int()).clamp(1, 254).to(torch.uint8))
    y, calls = _run(p, shape, 1024, monkeypatch, True, mma=mma)
    assert calls == ["launch_l1", "launch_l2"]
    assert relative_error(y, _reference(p)) <= tolerance


def test_fold_table_is_the_e2m1_values_scaled():
    table = prefill_wgmma.fold_table(torch.device("cuda")).cpu().view(torch.uint8).view(-1, 8)
    values = table.view(torch.float8_e4m3fn).float()
    magnitudes = torch.tensor((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
    for d in range(15):  # exact range
        assert torch.equal(values[d], magnitudes * 2.0 ** (6 - d))
    assert values[-1].abs().max() == 0


@pytest.mark.parametrize("ws", [False, True])
def test_prefill_kernels_capture_in_a_cuda_graph(ws, monkeypatch):
    """No host sync inside: a whole prefill call captures, and its replays equal the eager call
    bit for bit."""
    monkeypatch.setenv("MEGAMOE_WGMMA", "1")
    monkeypatch.setattr(prefill_wgmma, "WARP_SPECIALIZED", ws)
    shape, tokens = TAIL, 1024
    p = make_problem(shape, tokens, device="cuda", seed=7)
    buf = megamoe.MegaMoEBuffer(shape.num_experts, tokens, shape.num_topk, shape.hidden, shape.intermediate)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    y_eager, y_graph = torch.empty_like(p.x), torch.empty_like(p.x)

    def call(y):
        megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
        megamoe.mega_moe(y, l1, l2, buf)

    call(y_eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(y_graph)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(y_graph)
    y_graph.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph.view(torch.int16), y_eager.view(torch.int16))
    buf.destroy()
