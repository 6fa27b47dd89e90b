"""The fused EP = 1 path (pre_dispatch, plan, L1 + SwiGLU, L2, combine) against the oracle.

On the CPU these run the Triton kernels themselves through Triton's interpreter (conftest.py);
on a GPU the same tests run the compiled kernels.
"""

from dataclasses import dataclass

import pytest
import torch

import megamoe
from megamoe.kernels.config import GemmConfig, force_config, is_fma
from megamoe.testing import MoEShape, make_problem, relative_error

from tolerances import LAYER_EXACT_PRODUCTS, LAYER_KERNEL_VS_REFERENCE


@dataclass(frozen=True)
class Case:
    hidden: int
    inter: int
    experts: int
    topk: int
    tokens: int
    capacity: int
    routing: str = "uniform"
    masked: float = 0.0
    mode: str = "fp8xfp4"
    intermediate_sf: str = "ue8m0"
    clamp: float | None = None
    scaling: float = 1.0
    activation: str = "swiglu"
    bias: bool = False
    mma: str = "fp8"

    def __str__(self):
        return (f"H{self.hidden}-I{self.inter}-E{self.experts}-K{self.topk}-T{self.tokens}-{self.routing}"
                f"-m{self.masked}-{self.mode}-{self.intermediate_sf}-c{self.clamp}-{self.activation}"
                f"{'-bias' if self.bias else ''}{'-' + self.mma if self.mma != 'fp8' else ''}")


CASES = [
    Case(96, 64, 8, 3, 13, 16, masked=0.2),
    Case(96, 64, 8, 3, 0, 16),                                  # no tokens
    Case(160, 96, 5, 2, 37, 40, routing="skewed"),              # odd sizes, skewed routing
    Case(128, 64, 6, 4, 11, 11, routing="one_expert"),          # every token to expert 0
    Case(96, 64, 8, 2, 9, 12, masked=1.0),                      # every slot masked
    Case(64, 32, 16, 1, 3, 8),                                  # most experts receive nothing
    Case(96, 64, 8, 3, 13, 16, masked=0.2, mode="bf16xbf16"),
    Case(96, 64, 8, 3, 13, 16, masked=0.2, intermediate_sf="fp32"),
    Case(96, 64, 8, 3, 13, 16, clamp=0.05, scaling=2.5),
    Case(96, 64, 8, 3, 13, 16, clamp=0.05, activation="gpt_oss", bias=True),     # gpt-oss's expert MLP
    Case(96, 64, 8, 3, 13, 16, mode="bf16xbf16", activation="gpt_oss", bias=True),
    Case(2880, 64, 4, 2, 3, 4),                                  # gpt-oss hidden, not a multiple of 128
    Case(64, 2880, 4, 2, 3, 4),                                  # gpt-oss intermediate
    Case(96, 64, 8, 3, 13, 16, masked=0.2, mma="fp16"),          # exact products
    Case(2880, 64, 4, 2, 3, 4, clamp=0.05, mma="fp16"),          # ... with a partial last K step
    Case(96, 64, 8, 3, 13, 16, masked=0.2, mma="fp16-l1"),       # exact products in L1 only
]


def run_case(case: Case, device, seed: int = 0):
    shape = MoEShape("case", case.experts, case.topk, case.hidden, case.inter)
    # Generated on the CPU so that every device sees the same numbers.
    p = make_problem(shape, case.tokens, mode=case.mode, routing=case.routing, masked_ratio=case.masked,
                     seed=seed).to(device)
    buf = megamoe.MegaMoEBuffer(case.experts, case.capacity, case.topk, case.hidden, case.inter, mode=case.mode,
                                intermediate_sf=case.intermediate_sf, mma=case.mma, device=device)
    biases = make_biases(case, seed, device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2, mode=case.mode, l1_bias=biases[0], l2_bias=biases[1])
    megamoe.pre_dispatch(p.x, p.topk_idx.int(), p.topk_weights, buf, routed_scaling_factor=case.scaling)
    stats = torch.randint(0, 100, (case.experts,), dtype=torch.int32, device=device)
    stats0 = stats.clone()
    y = torch.full_like(p.x, float("nan"))
    megamoe.mega_moe(y, l1, l2, buf, activation_clamp=case.clamp, recv_stats=stats, activation=case.activation)
    return p, buf, (l1, l2), y, stats - stats0


def make_biases(case: Case, seed: int, device):
    if not case.bias:
        return None, None
    g = torch.Generator().manual_seed(seed + 100)
    return (0.1 * torch.randn(case.experts, 2 * case.inter, generator=g)).bfloat16().to(device), \
        (0.1 * torch.randn(case.experts, case.hidden, generator=g)).to(device)


def reference(case: Case, p, seed: int = 0):
    l1_bias, l2_bias = make_biases(case, seed, p.x.device)
    return megamoe.reference.mega_moe_reference(
        p.x, p.topk_idx, p.topk_weights, p.l1, p.l2, mode=case.mode, activation_clamp=case.clamp,
        routed_scaling_factor=case.scaling, intermediate_sf=case.intermediate_sf, return_recv_counts=True,
        activation=case.activation, l1_bias=l1_bias, l2_bias=l2_bias)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_matches_reference(case, device):
    p, buf, _, y, added = run_case(case, device)
    ref, counts = reference(case, p)
    assert torch.equal(added, counts)                                     # recv_stats is added to
    assert not torch.isnan(y).any()                                       # every row was written
    assert relative_error(y, ref) <= LAYER_KERNEL_VS_REFERENCE
    masked = (p.topk_idx < 0).all(dim=1)
    assert torch.equal(y[masked], torch.zeros_like(y[masked]))            # no expert: exact zeros


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_pre_dispatch_is_exact(case, device):
    p, buf, _, _, _ = run_case(case, device)
    t = case.tokens
    q, sf = megamoe.quantize_fp8(p.x)
    assert torch.equal(buf.x[:t].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(buf.x_sf[:t], sf)
    assert torch.equal(buf.topk_idx[:t], p.topk_idx.int())
    assert torch.equal(buf.topk_weights[:t], p.topk_weights * torch.tensor(case.scaling, dtype=torch.float32))
    assert (buf.topk_idx[t:] == -1).all()
    assert int(buf.meta[0]) == t


@pytest.mark.parametrize("single", [True, False], ids=["one-program", "count+scatter"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5]], ids=str)
def test_plan_metadata_is_exact(case, single, device, monkeypatch):
    """Both plans: one program for small tables (every case here fits), count + scatter otherwise."""
    monkeypatch.setattr(megamoe.kernels.plan, "SINGLE_PROGRAM", single)
    p, buf, _, _, _ = run_case(case, device)
    p, buf = p.to("cpu"), {name: getattr(buf, name).cpu() for name in ("expert_count", "expert_offsets", "sorted_rows")}
    flat = p.topk_idx.reshape(-1)
    counts = torch.zeros(case.experts, dtype=torch.int32)
    for e in flat[flat >= 0].tolist():
        counts[e] += 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(counts, 0).int()])
    assert torch.equal(buf["expert_count"], counts)
    assert torch.equal(buf["expert_offsets"], offsets)
    for e in range(case.experts):
        got = buf["sorted_rows"][offsets[e]:offsets[e + 1]].sort().values
        expected = (flat == e).nonzero().flatten().int()
        assert torch.equal(got, expected)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=str)
def test_layer_with_the_general_plan(case, device, monkeypatch):
    """The count + scatter plan (the symm backend's, and EP = 1's past one program) end to end."""
    monkeypatch.setattr(megamoe.kernels.plan, "SINGLE_PROGRAM", False)
    p, _, _, y, added = run_case(case, device)
    ref, counts = reference(case, p)
    assert torch.equal(added, counts)
    assert relative_error(y, ref) <= LAYER_KERNEL_VS_REFERENCE


def test_reruns_are_bitwise_identical(device):
    case = CASES[2]
    _, _, _, y1, _ = run_case(case, device)
    _, _, _, y2, _ = run_case(case, device)
    assert torch.equal(y1.view(torch.int16), y2.view(torch.int16))


@pytest.mark.parametrize("l1, l2", [
    (GemmConfig(16, 32, 4, 4), GemmConfig(16, 64, 4, 4)),     # the GPU's decode tiles
    (GemmConfig(16, 32, 4, 2), GemmConfig(16, 16, 4, 2, block_k=32)),
    (GemmConfig(32, 64, 4, 3, block_k=32), GemmConfig(64, 32, 4, 3, block_k=128)),
    (GemmConfig(64, 32, 8, 3), GemmConfig(64, 64, 8, 3)),     # prefill tiles: rebased rows on both
    (GemmConfig(1, 32, 4, 1), GemmConfig(2, 64, 4, 1)),       # FMA tiles (fp8xfp4 only)
    (GemmConfig(2, 32, 4, 2), GemmConfig(1, 32, 4, 2)),       # FMA tiles loading a step ahead
    (GemmConfig(1, 32, 8, 2, k_split=2), GemmConfig(2, 64, 16, 1, k_split=4)),   # FMA tiles, K split over warps
    (GemmConfig(16, 32, 4, 4, fma_mix=2), GemmConfig(16, 64, 4, 4, fma_mix=1)),   # split with FMA tiles
])
@pytest.mark.parametrize("mode", ["fp8xfp4", "bf16xbf16"])
def test_every_tile_config_path(l1, l2, mode, device):
    """Several row tiles per expert, unrolled and partial K steps, narrow column tiles."""
    if mode == "bf16xbf16" and (is_fma(l1) or l1.fma_mix):
        pytest.skip("FMA tiles are fp8xfp4 only (test_fma_tiles_need_fp8xfp4)")
    case = Case(160, 96, 4, 2, 40, 40, routing="skewed", mode=mode)
    with force_config(l1=l1, l2=l2):
        p, _, _, y, _ = run_case(case, device)
    assert relative_error(y, reference(case, p)[0]) <= LAYER_KERNEL_VS_REFERENCE


def _spread_groups(x: torch.Tensor, seed: int, spread: int = 12) -> torch.Tensor:
    """x with each group of 32 columns of each row scaled by its own power of two in
    [2^-spread, 1], so the groups of a GEMM step get scales far apart."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = x.shape
    shifts = torch.randint(-spread, 1, (rows, cols // 32), generator=g).repeat_interleave(32, dim=1)
    return (x.float().cpu() * torch.exp2(shifts.float())).to(x.dtype).to(x.device)


@pytest.mark.parametrize("k, counted, in_place", [(256, False, False), (96, True, True), (2880, False, True)])
def test_rebase_rows_is_exact(k, counted, in_place, device):
    """kernels/rebase.py bit for bit against formats.rebase_fp8_steps: groups 2^0 to 2^-12 apart
    (values that fall below e4m3's normals round), a partial last step, a row count on the
    device; rows past the count and columns past k are untouched. Rebasing twice changes nothing."""
    from megamoe.formats import quantize_fp8, rebase_fp8_steps, ue8m0_to_float, unpack_ue8m0
    from megamoe.kernels.rebase import rebase_rows

    rows, valid = 45, 37
    g = torch.Generator().manual_seed(k)
    x = _spread_groups(torch.randn(rows, k, generator=g), seed=k + 1)
    q, sf = quantize_fp8(x)
    steps = -(-k // 128)
    scales = torch.ones(rows, 4 * steps)
    scales[:, : k // 32] = ue8m0_to_float(unpack_ue8m0(sf, k // 32))
    # Rows wider than k (a stride of k + 32) with a sentinel past k: never read nor written.
    src = torch.full((rows, k + 32), 7.0).to(torch.float8_e4m3fn)
    src[:, :k] = q
    src, scales = src.to(device), scales.to(device)
    expect_q, expect_s = rebase_fp8_steps(src[:valid].cpu(), scales[:valid].cpu(), k)
    original_s = scales[:valid].cpu().clone()
    if in_place:
        dst, dst_s = src, scales
        before_q, before_s = src.clone(), scales.clone()
    else:
        dst = torch.full_like(src.view(torch.uint8), 0x55).view(torch.float8_e4m3fn)
        dst_s = torch.full_like(scales, -3.0)
        before_q, before_s = dst.clone(), dst_s.clone()
    count = torch.tensor([valid], dtype=torch.int32, device=device) if counted else None
    rebase_rows(src, scales, dst, dst_s, valid if not counted else rows, k, count=count)
    assert torch.equal(dst[:valid, :k].view(torch.uint8).cpu(), expect_q[:, :k].view(torch.uint8))
    assert torch.equal(dst_s[:valid].cpu(), expect_s)
    assert torch.equal(dst[:, k:].view(torch.uint8), before_q[:, k:].view(torch.uint8))
    assert torch.equal(dst[valid:].view(torch.uint8), before_q[valid:].view(torch.uint8))
    assert torch.equal(dst_s[valid:], before_s[valid:])
    # Some values fell below the normals and rounded, each by at most 2^-10 of its step's scale.
    def values(q8, sc):
        return q8[:, :k].float() * sc[:, : k // 32].repeat_interleave(32, dim=1)
    step_scale = expect_s[:, : k // 32].repeat_interleave(32, dim=1)
    change = (values(expect_q, expect_s) - values(q[:valid], original_s)).abs()
    assert (change > 0).any() and (change <= step_scale * 2.0 ** -10).all()
    # Idempotent: a second call on rebased rows leaves them as they are.
    again_q, again_s = dst.clone(), dst_s.clone()
    rebase_rows(again_q, again_s, again_q, again_s, valid, k)
    assert torch.equal(again_q.view(torch.uint8), dst.view(torch.uint8)) and torch.equal(again_s, dst_s)


@pytest.mark.parametrize("case", [Case(160, 96, 4, 2, 40, 40, routing="skewed"),
                                  Case(160, 96, 4, 2, 40, 40, intermediate_sf="fp32"),
                                  Case(2880, 64, 4, 2, 5, 8, mma="fp16")], ids=str)
def test_prefill_tiles_on_spread_scales(case, device):
    """The prefill tiles (rebased rows, one promotion per step) against the reference, on
    tokens whose groups of 32 are up to 2^12 apart; FP32 intermediate scales skip the rebase of
    L2's rows. With exact products (mma="fp16") the rebase's rounding of tiny values is all
    that separates the kernels from the reference."""
    shape = MoEShape("case", case.experts, case.topk, case.hidden, case.inter)
    p = make_problem(shape, case.tokens, routing=case.routing, seed=3)
    p.x = _spread_groups(p.x, seed=4)
    p = p.to(device)
    buf = megamoe.MegaMoEBuffer(case.experts, case.capacity, case.topk, case.hidden, case.inter,
                                intermediate_sf=case.intermediate_sf, mma=case.mma, device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.full_like(p.x, float("nan"))
    with force_config(l1=GemmConfig(64, 32, 8, 3), l2=GemmConfig(64, 64, 8, 3)):
        megamoe.mega_moe(y, l1, l2, buf)
    # pre_dispatch's rows are left as they were: L1 read a rebased copy.
    assert torch.equal(buf.x[: case.tokens].view(torch.uint8), megamoe.formats.quantize_fp8(p.x)[0].view(torch.uint8))
    tolerance = LAYER_EXACT_PRODUCTS if case.mma == "fp16" else LAYER_KERNEL_VS_REFERENCE
    assert relative_error(y, reference(case, p)[0]) <= tolerance


FMA_TILES = dict(l1=GemmConfig(1, 32, 4, 1), l2=GemmConfig(2, 64, 4, 1))


def _fma_tiles(l1_stages: int, l2_rows: int, l2_stages: int, k_split: int = 1) -> dict:
    return dict(l1=GemmConfig(1, 32, 4 * k_split, l1_stages, k_split=k_split),
                l2=GemmConfig(l2_rows, 64, 4 * k_split, l2_stages, k_split=k_split))


@pytest.mark.parametrize("case, tiles", [
    (Case(160, 96, 4, 2, 40, 40, routing="skewed"), _fma_tiles(2, 2, 2)),
    (Case(160, 96, 4, 2, 40, 40, intermediate_sf="fp32"), _fma_tiles(1, 1, 1)),
    (Case(2880, 64, 4, 2, 5, 8), _fma_tiles(2, 1, 2)),     # 22 whole steps and a partial one
    (Case(1152, 64, 4, 2, 5, 8), _fma_tiles(2, 2, 1)),     # 9 whole steps: four pairs and one
    # K split over warps: 22 steps in four ranges of 6 (the last has 4), 9 in 5 + 4, L2's one
    # partial step (I = 64, 96) with no whole one, H = 160's one whole step in four ranges.
    (Case(2880, 64, 4, 2, 5, 8), _fma_tiles(2, 1, 2, k_split=4)),
    (Case(1152, 96, 4, 2, 5, 8), _fma_tiles(1, 2, 1, k_split=2)),
    (Case(160, 96, 4, 2, 12, 12, routing="skewed"), _fma_tiles(2, 2, 1, k_split=4)),
], ids=str)
def test_fma_tiles_multiply_exactly(case, tiles, device):
    """The FMA tiles (one or two rows, FP32 units; weights loaded a step ahead or not; K split
    over the program's warps or not) multiply the FP8 and MXFP4 values exactly and sum in FP32,
    so they meet the exact-products tolerance with FP8 MMAs configured (`mma="fp8"`), on
    tokens whose groups of 32 are up to 2^12 apart, with K ending on a partial step (H = 160,
    2880) or not (1152)."""
    shape = MoEShape("case", case.experts, case.topk, case.hidden, case.inter)
    p = make_problem(shape, case.tokens, routing=case.routing, seed=5)
    p.x = _spread_groups(p.x, seed=6)
    p = p.to(device)
    buf = megamoe.MegaMoEBuffer(case.experts, case.capacity, case.topk, case.hidden, case.inter,
                                intermediate_sf=case.intermediate_sf, mma=case.mma, device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.full_like(p.x, float("nan"))
    with force_config(**tiles):
        megamoe.mega_moe(y, l1, l2, buf)
    assert relative_error(y, reference(case, p)[0]) <= LAYER_EXACT_PRODUCTS


MIXED_TILES = {1: dict(l1=GemmConfig(16, 32, 4, 4, fma_mix=1), l2=GemmConfig(16, 64, 4, 4, fma_mix=1)),
               2: dict(l1=GemmConfig(16, 32, 4, 4, fma_mix=2), l2=GemmConfig(16, 64, 4, 4, fma_mix=2))}


@pytest.mark.parametrize("mix", [1, 2])
def test_mixed_tiles_multiply_exactly(mix, device):
    """GEMMs split by the experts' row counts (`GemmConfig.fma_mix`): of experts with 1, 2, 3, 17
    and 18 rows, those with at most `mix` rows go to FMA launches of their row count and the
    others to the MMA launch, so an expert that no launch selects shows (its rows stay NaN);
    with exact products on the MMA side (mma="fp16") the whole call meets the exact-products
    tolerance. Rows arrive in a shuffled order, groups of 32 are up to 2^12 apart, and H = 160
    ends on a partial K step."""
    hidden, inter, experts = 160, 96, 6
    counts = [1, 2, 3, 17, 18, 0]
    shape = MoEShape("case", experts, 1, hidden, inter)
    tokens = sum(counts)
    p = make_problem(shape, tokens, seed=7)
    g = torch.Generator().manual_seed(8)
    order = torch.randperm(tokens, generator=g)
    p.topk_idx = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))[order].unsqueeze(1)
    p.x = _spread_groups(p.x, seed=9)
    p = p.to(device)
    buf = megamoe.MegaMoEBuffer(experts, tokens, 1, hidden, inter, mma="fp16", device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.full_like(p.x, float("nan"))
    with force_config(**MIXED_TILES[mix]):
        megamoe.mega_moe(y, l1, l2, buf)
    ref = megamoe.reference.mega_moe_reference(p.x, p.topk_idx, p.topk_weights, p.l1, p.l2)
    assert relative_error(y, ref) <= LAYER_EXACT_PRODUCTS


def test_fma_tiles_need_fp8xfp4(device):
    case = Case(96, 64, 4, 2, 5, 8, mode="bf16xbf16")
    with force_config(**FMA_TILES), pytest.raises(ValueError, match="l1 config: one- and two-row FMA tiles"):
        run_case(case, device)
    with force_config(**MIXED_TILES[1]), pytest.raises(ValueError, match="l1 config: one- and two-row FMA tiles"):
        run_case(case, device)
    with pytest.raises(ValueError, match="GemmConfig.block_m"):
        GemmConfig(4, 32, 4, 1)
    with pytest.raises(ValueError, match="GemmConfig.fma_mix"):
        GemmConfig(16, 32, 4, 1, fma_mix=3)
    with pytest.raises(ValueError, match="GemmConfig.fma_mix"):
        GemmConfig(64, 32, 8, 3, fma_mix=1)
    with pytest.raises(ValueError, match="GemmConfig.k_split: expected a power of two"):
        GemmConfig(1, 32, 12, 1, k_split=3)
    with pytest.raises(ValueError, match="GemmConfig.k_split: splits the K steps of FMA tiles"):
        GemmConfig(16, 32, 8, 4, k_split=2)
    with pytest.raises(ValueError, match="GemmConfig.num_warps: expected a multiple of k_split"):
        GemmConfig(1, 32, 2, 1, k_split=4)
    case = Case(96, 64, 4, 2, 5, 8)
    with force_config(l1=GemmConfig(1, 32, 4, 3)), pytest.raises(ValueError, match="num_stages 1 or 2"):
        run_case(case, device)


def test_cpu_torch_path_agrees(monkeypatch, device):
    case = CASES[2]
    p, _, _, y_kernels, _ = run_case(case, device)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, _, _, y_torch, _ = run_case(case, "cpu")
    y_kernels = y_kernels.cpu()
    p = p.to("cpu")
    assert relative_error(y_torch, reference(case, p)[0]) <= LAYER_KERNEL_VS_REFERENCE
    assert relative_error(y_torch, y_kernels) <= LAYER_KERNEL_VS_REFERENCE


@pytest.mark.parametrize("configs", [{}, dict(l1=GemmConfig(64, 32, 8, 3), l2=GemmConfig(64, 64, 8, 3)),
                                     FMA_TILES], ids=["heuristic", "prefill-tiles", "fma-tiles"])
def test_nan_in_one_token_stays_there(configs, device):
    case = CASES[0]
    shape = MoEShape("case", case.experts, case.topk, case.hidden, case.inter)
    p = make_problem(shape, case.tokens, seed=1, device=device)
    buf = megamoe.MegaMoEBuffer(case.experts, case.capacity, case.topk, case.hidden, case.inter, device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    ys = []
    for poison in (False, True):
        x = p.x.clone()
        if poison:
            x[5, 17] = float("nan")
        megamoe.pre_dispatch(x, p.topk_idx, p.topk_weights, buf)
        y = torch.empty_like(x)
        with force_config(**configs):
            megamoe.mega_moe(y, l1, l2, buf)
        ys.append(y)
    keep = torch.arange(case.tokens, device=device) != 5
    assert torch.equal(ys[0][keep].view(torch.int16), ys[1][keep].view(torch.int16))
    assert torch.isnan(ys[1][5]).any()


# ------------------------------------------------------------------ bad input

@pytest.fixture
def setup(device):
    shape = MoEShape("case", 8, 3, 96, 64)
    p = make_problem(shape, 5, seed=2, device=device)
    buf = megamoe.MegaMoEBuffer(8, 8, 3, 96, 64, device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    return p, buf, l1, l2


def _snapshot(buf):
    return buf._storage.clone()


@pytest.mark.parametrize("mutate, error, match", [
    (lambda p: dict(x=p.x.float().half()[:, :64]), ValueError, "x"),
    (lambda p: dict(x=p.x.int()), TypeError, "x"),
    (lambda p: dict(x=torch.randn(9, 96, device=p.x.device).bfloat16()), ValueError, "capacity"),
    (lambda p: dict(x=p.x[:, ::2].repeat(1, 2)[:, :96].t().contiguous().t()), ValueError, "stride"),
    (lambda p: dict(topk_idx=p.topk_idx[:, :2].contiguous()), ValueError, "topk_idx"),
    (lambda p: dict(topk_idx=p.topk_idx.float()), TypeError, "topk_idx"),
    (lambda p: dict(topk_idx=p.topk_idx.masked_fill(p.topk_idx == p.topk_idx[0, 0], 8)), ValueError,
     r"\[-1, 8\)"),
    (lambda p: dict(topk_idx=p.topk_idx.masked_fill(p.topk_idx == p.topk_idx[0, 0], -2)), ValueError, "topk_idx"),
    (lambda p: dict(topk_weights=p.topk_weights.half()), TypeError, "topk_weights"),
    (lambda p: dict(topk_weights=p.topk_weights.t().contiguous().t()[:4]), ValueError, "topk_weights"),
    (lambda p: dict(routed_scaling_factor="2"), TypeError, "routed_scaling_factor"),
])
def test_pre_dispatch_rejects_before_writing(setup, mutate, error, match):
    p, buf, _, _ = setup
    args = dict(x=p.x, topk_idx=p.topk_idx, topk_weights=p.topk_weights, routed_scaling_factor=1.0)
    args.update(mutate(p))
    before = _snapshot(buf)
    with pytest.raises(error, match=match):
        megamoe.pre_dispatch(args["x"], args["topk_idx"], args["topk_weights"], buf,
                             routed_scaling_factor=args["routed_scaling_factor"])
    assert torch.equal(_snapshot(buf), before)


def test_unchecked_bad_ids_are_ignored_and_reported(setup):
    p, buf, l1, l2 = setup
    bad = p.topk_idx.clone()
    bad[1, 0] = 99
    megamoe.pre_dispatch(p.x, bad, p.topk_weights, buf, check_expert_ids=False)
    y = torch.empty_like(p.x)
    megamoe.mega_moe(y, l1, l2, buf)
    masked = bad.masked_fill(bad == 99, -1)
    ref = megamoe.reference.mega_moe_reference(p.x, masked, p.topk_weights, p.l1, p.l2)
    assert relative_error(y, ref) <= LAYER_KERNEL_VS_REFERENCE
    with pytest.raises(ValueError, match="1 expert id"):
        buf.check_errors()
    buf.check_errors()  # reported once


@pytest.mark.parametrize("mutate, error, match", [
    (lambda s: dict(y=torch.full((5, 96), 3.0, device=s[1].device)), TypeError, "y"),
    (lambda s: dict(y=torch.full((5, 64), 3.0, dtype=torch.bfloat16, device=s[1].device)), ValueError, "y"),
    (lambda s: dict(y=torch.full((9, 96), 3.0, dtype=torch.bfloat16, device=s[1].device)), ValueError, "capacity"),
    (lambda s: dict(l1=s[3]), ValueError, "l1"),
    (lambda s: dict(l1=s[0].l1), TypeError, "l1"),
    (lambda s: dict(activation_clamp=-1.0), ValueError, "activation_clamp"),
    (lambda s: dict(activation_clamp=float("inf")), ValueError, "activation_clamp"),
    (lambda s: dict(recv_stats=torch.zeros(8, dtype=torch.int64, device=s[1].device)), TypeError, "recv_stats"),
    (lambda s: dict(recv_stats=torch.zeros(7, dtype=torch.int32, device=s[1].device)), ValueError, "recv_stats"),
])
def test_mega_moe_rejects_before_writing(setup, mutate, error, match):
    p, buf, l1, l2 = setup
    args = dict(y=torch.full_like(p.x, 3.0), l1=l1, l2=l2, activation_clamp=None, recv_stats=None)
    args.update(mutate((p, buf, l1, l2)))
    before = _snapshot(buf)
    y_before = args["y"].clone()
    with pytest.raises(error, match=match):
        megamoe.mega_moe(args["y"], args["l1"], args["l2"], buf, activation_clamp=args["activation_clamp"],
                         recv_stats=args["recv_stats"])
    assert torch.equal(_snapshot(buf), before)
    assert torch.equal(args["y"], y_before)


def test_destroyed_buffer_raises(setup):
    p, buf, l1, l2 = setup
    buf.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    with pytest.raises(RuntimeError, match="destroyed"):
        megamoe.mega_moe(torch.empty_like(p.x), l1, l2, buf)


@pytest.mark.parametrize("kwargs", [dict(mma="bf16"), dict(mma="fp16", mode="bf16xbf16")], ids=str)
def test_buffer_rejects_bad_mma(kwargs):
    with pytest.raises(ValueError, match="mma"):
        megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, device="cpu", **kwargs)


def test_buffer_defaults_to_exact_products_in_l1():
    """Finding 6 (docs/RELIABILITY.md): FP8 MMAs in L1 put a few tokens in a thousand past the
    contract, so an fp8xfp4 buffer given no `mma` runs L1 on exact products; bf16xbf16 has no
    choice to make."""
    assert megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, device="cpu").mma == "fp16-l1"
    assert megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, mode="bf16xbf16", device="cpu").mma == "fp8"
    assert megamoe.MegaMoEBuffer(8, 4, 2, 64, 32, mma="fp8", device="cpu").mma == "fp8"


def test_each_mma_names_the_gemms_on_exact_products():
    from megamoe.reference import MMAS, exact_products

    table = {m: [g for g in ("l1", "l2") if exact_products(m, g)] for m in MMAS}
    assert table == {"fp8": [], "fp16-l1": ["l1"], "fp16": ["l1", "l2"]}


@pytest.mark.parametrize("rows_per_expert", [0.5, 3, 3.25, 12, 12.5, 24, 64, 65, 200])
def test_exact_gemms_past_three_rows_an_expert_take_the_gluon_shapes(rows_per_expert, monkeypatch):
    """Where the Gluon kernels run (`exact_gluon`), an exact GEMM with more than
    EXACT_GLUON_FROM rows an expert gets a wide config (rebased rows on the Gluon kernels): up
    to EXACT_SMALL_UP_TO rows an expert exact `_gemm` with 16-token tiles, then `_gemm_t` with
    64 tokens a tile up to EXACT_NARROW_UP_TO, 128 past it. Without Gluon, and for FP8 MMAs,
    the Triton row tiles stay as they were."""
    from megamoe.kernels import prefill_wgmma
    from megamoe.kernels.config import EXACT_GLUON_FROM, is_wide, pick_config

    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the GPU heuristic, not the interpreter's config
    experts = 16
    rows = int(rows_per_expert * experts)
    for which in ("l1", "l2"):
        plain = pick_config(which, rows, experts)
        exact = pick_config(which, rows, experts, exact_gluon=True)
        assert is_wide(exact) == (rows_per_expert > EXACT_GLUON_FROM or is_wide(plain)), (which, exact)
        if not is_wide(exact):
            assert exact == plain
    shape = prefill_wgmma._shape_args(experts, True, rows)
    if rows_per_expert <= prefill_wgmma.EXACT_SMALL_UP_TO:
        expected = (False, prefill_wgmma.NUM_WARPS, prefill_wgmma.NUM_STAGES, prefill_wgmma.EXACT_SMALL_TOKENS,
                    16 * prefill_wgmma.NUM_WARPS)
    elif rows_per_expert <= prefill_wgmma.EXACT_NARROW_UP_TO:
        expected = (True, prefill_wgmma.EXACT_NARROW_WARPS, prefill_wgmma.EXACT_NARROW_STAGES,
                    16 * prefill_wgmma.EXACT_NARROW_WARPS, prefill_wgmma.EXACT_ROWS_W)
    else:
        expected = (True, prefill_wgmma.EXACT_WARPS, prefill_wgmma.EXACT_STAGES, 16 * prefill_wgmma.EXACT_WARPS,
                    prefill_wgmma.EXACT_ROWS_W)
    assert (shape["TOKENS_M"], shape["num_warps"], shape["STAGES"], shape["BLOCK_T"], shape["BLOCK_W"]) == expected
    assert shape["EXACT"]
    fp8 = prefill_wgmma._shape_args(experts, False, rows)
    assert not fp8["EXACT"] and not fp8["TOKENS_M"]
    assert fp8["num_warps"] == prefill_wgmma.NUM_WARPS and fp8["BLOCK_T"] == prefill_wgmma.ROWS_T


@pytest.mark.parametrize("mma, gemms, tokens", [("fp16-l1", ["l1"], 10), ("fp16", ["l1", "l2"], 10), ("fp8", [], 10),
                                                ("fp16", [], 4)])
def test_split_exact_gemms_send_the_experts_past_two_rows_to_the_gluon_kernels(mma, gemms, tokens, device,
                                                                                monkeypatch):
    """Where the Gluon kernels run, a split GEMM (`GemmConfig.fma_mix` = 2) on exact products
    with more than `config.EXACT_GLUON_MIX_FROM` (1) rows an expert (10 tokens: 2.5) launches
    them for the experts with more than two rows (rows_above = 2) on rebased rows (L1: the
    buffer's rebased copy, L2: in place), then only the FMA launches of the Triton kernels, on
    the rows as they were (L1) and the rebased ones (L2). FP8 MMAs, and exact products at one
    row an expert (4 tokens), keep all three Triton launches. Plumbing only: the Gluon
    launchers are recorded, not run (they need a GPU; tests/test_prefill_wgmma.py runs them)."""
    from megamoe import experts as experts_mod
    from megamoe.kernels import prefill_wgmma

    hidden, inter, num_experts, topk = 128, 64, 8, 2
    shape = MoEShape("split", num_experts, topk, hidden, inter)
    p = make_problem(shape, tokens, seed=11).to(device)
    buf = megamoe.MegaMoEBuffer(num_experts, tokens, topk, hidden, inter, mma=mma, device=device)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    gluon, triton_launches = [], []
    monkeypatch.setattr(prefill_wgmma, "supported", lambda *a, **k: True)
    monkeypatch.setattr(prefill_wgmma, "launch_l1",
                        lambda buf_, n, epr, a, a_sf, *rest, rows_above=0: gluon.append(("l1", a, rows_above)))
    monkeypatch.setattr(prefill_wgmma, "launch_l2",
                        lambda buf_, n, rw, out, w, pdl, rows_above=0: gluon.append(("l2", buf_.inter, rows_above)))
    real_launch = experts_mod._launch

    def record(kernel, grid, persistent, args, kwargs):
        triton_launches.append((kernel, args[0], kwargs["ROWS_ABOVE"], kwargs["ROWS_UP_TO"], kwargs["BLOCK_M"]))
        real_launch(kernel, grid, persistent, args, kwargs)

    monkeypatch.setattr(experts_mod, "_launch", record)
    with force_config(**MIXED_TILES[2]):
        megamoe.mega_moe(torch.empty_like(p.x), l1, l2, buf)
    assert [(g, rows_above) for g, _, rows_above in gluon] == [(g, 2) for g in gemms]
    for g, rows, _ in gluon:
        assert rows.data_ptr() == (buf.x_rebased if g == "l1" else buf.inter).data_ptr()
    kernels = {"l1": experts_mod._l1_swiglu_kernel, "l2": experts_mod._l2_kernel}
    for g, kernel in kernels.items():
        launches = [(above, up_to, block_m) for k, _, above, up_to, block_m in triton_launches if k is kernel]
        fma = [(1, 2, 2), (0, 1, 1)]
        assert launches == (fma if g in gemms else [(2, 0, 16)] + fma), g
    l1_rows = {a.data_ptr() for k, a, *_ in triton_launches if k is kernels["l1"]}
    assert l1_rows == {buf.x.data_ptr()}   # the FMA tiles read the rows pre_dispatch wrote


# H100/H200 SM: 64K registers, 228 KB shared memory, 2048 threads.
HOPPER_SM = dict(regs_per_sm=65536, shared_per_sm=233472, threads_per_sm=2048)


@pytest.mark.parametrize("regs, warps, shared, expected", [
    (154, 4, 20480, 3),    # the one-tile 16-row L1 (tools/inspect_kernels.py)
    (168, 4, 20480, 3),    # the persistent L1 under its register cap
    (240, 4, 20480, 2),    # the persistent L1 without the cap
    (255, 8, 40960, 1),    # 64-row tiles, 8 warps
    (32, 4, 100000, 2),    # bound by shared memory (2 x (100000 + 1 KB) fit, 3 do not)
    (16, 4, 0, 16),        # bound by threads: 2048 / 128
    (16, 1, 0, 32),        # bound by the 32 blocks an SM holds
])
def test_persistent_grid_is_what_an_sm_holds(regs, warps, shared, expected):
    from megamoe.experts import programs_per_sm
    assert programs_per_sm(regs, warps, shared, **HOPPER_SM) == expected


def test_pdl_is_chosen_for_sm90_cuda_launches_only(monkeypatch):
    from megamoe.kernels import launch
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(launch, "_has_pdl", lambda index: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert launch.pdl_options(cuda) == {"PDL": True, "launch_pdl": True}
    assert launch.pdl_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("MEGAMOE_PDL", "0")
    assert launch.pdl_options(cuda) == {"PDL": False}
    monkeypatch.setenv("MEGAMOE_PDL", "maybe")
    with pytest.raises(ValueError, match="MEGAMOE_PDL"):
        launch.pdl_options(cuda)
    monkeypatch.setenv("MEGAMOE_PDL", "1")
    monkeypatch.setattr(launch, "_has_pdl", lambda index: False)   # before sm_90
    assert launch.pdl_options(cuda) == {"PDL": False}
    monkeypatch.setattr(launch, "_has_pdl", lambda index: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.pdl_options(cuda) == {"PDL": False}


class _RecordingKernel:
    """Stands in for a Triton kernel: records the grid and options of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


def test_persistent_launches_go_without_pdl(monkeypatch):
    from megamoe import experts
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the persistent grid without compiling anything
    kernel = _RecordingKernel()
    pdl = {"PDL": True, "launch_pdl": True}
    experts._launch(kernel, (1000,), False, (), dict(pdl, BLOCK_M=16))
    experts._launch(kernel, (1000,), True, (), dict(pdl, BLOCK_M=16))   # interpreter: a few programs
    (grid, one_tile), (persistent_grid, persistent) = kernel.launches
    assert grid == (1000,) and one_tile["PDL"] and one_tile["launch_pdl"] and not one_tile["PERSISTENT"]
    assert persistent_grid == (experts.INTERPRETER_PROGRAMS,) and persistent["PERSISTENT"]
    assert persistent["PDL"] is False and "launch_pdl" not in persistent


def test_grids_under_one_wave_go_without_pdl(monkeypatch):
    """A one-tile grid smaller than what the GPU holds at once is launched without PDL (its
    programs would crowd the SMs the kernel before frees first); one wave or more keeps it."""
    from megamoe import experts
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the resident count without compiling anything
    kernel = _RecordingKernel()
    pdl = {"PDL": True, "launch_pdl": True}
    for programs in (experts.INTERPRETER_PROGRAMS - 1, experts.INTERPRETER_PROGRAMS):
        experts._launch(kernel, (programs,), False, (), dict(pdl, BLOCK_M=16))
    (small_grid, small), (wave_grid, wave) = kernel.launches
    assert small_grid == (experts.INTERPRETER_PROGRAMS - 1,) and small["PDL"] is False and "launch_pdl" not in small
    assert wave_grid == (experts.INTERPRETER_PROGRAMS,) and wave["PDL"] and wave["launch_pdl"]


def _mxfp4(e: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return megamoe.formats.quantize_mxfp4(torch.randn(e, n, k, generator=g) * 2.0 ** torch.randint(-4, 5, (e, n, 1),
                                                                                                   generator=g))


def test_transform_weights_tiled_layout_is_exact():
    """weights.py's kernel layout byte by byte (32-row tiles, one contiguous block a 128-wide step,
    two nibble-split chunks of 64 in it, zero codes past K), and `dequantize` against formats."""
    e, inter, hidden = 2, 96, 160                    # K = 160 and 96: the last steps are padded
    (q1, s1), (q2, s2) = _mxfp4(e, 2 * inter, hidden, 1), _mxfp4(e, hidden, inter, 2)
    l1, l2 = megamoe.transform_weights((q1, s1), (q2, s2))
    steps = -(-hidden // 128)
    codes = torch.zeros(e, 2 * inter, steps * 128, dtype=torch.uint8)
    codes[..., 0:hidden:2], codes[..., 1:hidden:2] = q1 & 0xF, q1 >> 4
    chunks = codes.view(e, 2 * inter, steps * 2, 2, 32)
    packed = chunks[..., 0, :] | (chunks[..., 1, :] << 4)            # [e, rows, chunk, byte]
    assert tuple(l1.w.shape) == (e, 2 * inter // 32, steps, 32, 64)
    for row in range(2 * inter):
        for step in range(steps):
            block = l1.w[:, row // 32, step, row % 32]
            assert torch.equal(block, packed[:, row, 2 * step: 2 * step + 2].reshape(e, 64)), (row, step)
    for expert in range(e):
        assert torch.equal(l1.dequantize(expert), megamoe.formats.dequantize_mxfp4(q1[expert], s1[expert]))
        assert torch.equal(l2.dequantize(expert), megamoe.formats.dequantize_mxfp4(q2[expert], s2[expert]))


def test_transform_weights_rejects_rows_off_the_tile():
    (q1, s1), (q2, s2) = _mxfp4(1, 64, 64, 3), _mxfp4(1, 48, 32, 4)
    with pytest.raises(ValueError, match=r"l2_weights: expected a multiple of 32 rows"):
        megamoe.transform_weights((q1, s1), (q2, s2))


def test_tile_steps_rejects_partial_tiles_and_steps():
    from megamoe.weights import tile_steps
    for shape in [(1, 33, 64), (1, 32, 96)]:
        with pytest.raises(ValueError, match=r"rows: expected \[E, N, S \* 64\] with N a multiple of 32"):
            tile_steps(torch.zeros(shape, dtype=torch.uint8))
