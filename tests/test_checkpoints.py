"""Loading MoE blocks from safetensors files: each family's layout, exact bytes, malformed files.

Checkpoints are written here with random tensors (never zeros) under the names the published
models use; what the loader builds is compared exactly with what it must be.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import megamoe
from megamoe.checkpoints import SafetensorsCheckpoint, checkpoint_prefix, layer_from_module, load_moe_layer, moe_spec
from megamoe.testing import relative_error

from tolerances import LAYER_KERNEL_VS_REFERENCE

H, I, E = 64, 64, 4

CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=H, num_local_experts=E, num_experts_per_tok=2,
                    intermediate_size=I, hidden_act="silu"),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=H, num_experts=E, num_experts_per_tok=2,
                      moe_intermediate_size=I, norm_topk_prob=True, hidden_act="silu"),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=H, n_routed_experts=2 * E, num_experts_per_tok=2,
                        moe_intermediate_size=I, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        n_shared_experts=1, norm_topk_prob=True, hidden_act="silu"),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=H, num_local_experts=E, num_experts_per_tok=2,
                    intermediate_size=I, swiglu_limit=7.0),
}


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _fp8_blocks(w: torch.Tensor):
    """DeepSeek-V3's FP8 form: e4m3 values and one FP32 scale per 128x128 block (scale_inv)."""
    n, k = w.shape
    bn, bk = -(-n // 128), -(-k // 128)
    scale = torch.empty(bn, bk)
    for i in range(bn):
        for j in range(bk):
            scale[i, j] = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs().amax() / 448
    full = scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    w8 = (w / full).to(torch.float8_e4m3fn)
    return w8, scale, w8.float() * full


def _shrink_some_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Keep every code of every other 32-block at magnitude <= 3 (code <= 5), so that quantizing
    the dequantized values again would pick a smaller scale and different bytes."""
    lo, hi = blocks & 0xF, blocks >> 4
    small = lambda c: (c & 0x8) | (c & 0x7).clamp(max=5)  # noqa: E731
    shrunk = small(lo) | (small(hi) << 4)
    every_other = torch.zeros(blocks.shape[:-1], dtype=torch.bool)
    every_other[..., ::2] = True
    return torch.where(every_other.unsqueeze(-1), shrunk, blocks)


def make_checkpoint(family: str, layout: str = "per_expert", seed: int = 0, layer: int = 0):
    """(tensors by name, config, expected): a random MoE block in the family's published layout.

    layout: "per_expert" (one tensor per expert and projection), "fused" (transformers 5's
    in-memory experts.gate_up_proj / down_proj), "fp8" (DeepSeek-V3's FP8 blocks), "mxfp4"
    (gpt-oss's *_blocks / *_scales), "dense" (gpt-oss in BF16).
    expected: router tensors, l1 float [E, 2I, H] gate rows then up rows (or for mxfp4 the MXFP4
    pair, already de-interleaved), l2, biases de-interleaved, shared expert weights.
    """
    config = dict(CONFIGS[family])
    e = config.get("num_local_experts") or config.get("num_experts") or config["n_routed_experts"]
    prefix = checkpoint_prefix(family, layer)
    t, exp = {}, {}
    w1 = _randn(e, 2 * I, H, seed=seed, scale=H ** -0.5)
    w2 = _randn(e, H, I, seed=seed + 1, scale=I ** -0.5)
    exp["router"] = _randn(e, H, seed=seed + 2).bfloat16()
    if family == "gpt_oss":
        t[prefix + "router.weight"] = exp["router"]
        exp["router_bias"] = t[prefix + "router.bias"] = _randn(e, seed=seed + 3).bfloat16()
        rows = torch.cat([torch.arange(0, 2 * I, 2), torch.arange(1, 2 * I, 2)])
        interleave = torch.argsort(rows)       # de-interleaved row r sits at file row interleave[r]
        l1_bias = _randn(e, 2 * I, seed=seed + 4, scale=0.1).bfloat16()
        t[prefix + "experts.gate_up_proj_bias"] = l1_bias[:, interleave]
        exp["l1_bias"] = l1_bias.float()
        t[prefix + "experts.down_proj_bias"] = _randn(e, H, seed=seed + 5, scale=0.1).bfloat16()
        exp["l2_bias"] = t[prefix + "experts.down_proj_bias"].float()
        if layout == "mxfp4":
            (q1, s1), (q2, s2) = megamoe.quantize_mxfp4(w1), megamoe.quantize_mxfp4(w2)
            q1 = _shrink_some_blocks(q1.view(e, 2 * I, H // 32, 16)).view(e, 2 * I, H // 2)
            t[prefix + "experts.gate_up_proj_blocks"] = q1[:, interleave].reshape(e, 2 * I, H // 32, 16).contiguous()
            t[prefix + "experts.gate_up_proj_scales"] = s1[:, interleave].contiguous()
            t[prefix + "experts.down_proj_blocks"] = q2.reshape(e, H, I // 32, 16).contiguous()
            t[prefix + "experts.down_proj_scales"] = s2
            exp["l1"], exp["l2"] = (q1, s1), (q2, s2)
        else:
            t[prefix + "experts.gate_up_proj"] = w1[:, interleave].transpose(1, 2).contiguous().bfloat16()
            t[prefix + "experts.down_proj"] = w2.transpose(1, 2).contiguous().bfloat16()
            exp["l1"], exp["l2"] = w1.bfloat16().float(), w2.bfloat16().float()
        return t, config, exp

    t[prefix + "gate.weight"] = exp["router"]
    if family == "deepseek_v3":
        exp["correction"] = t[prefix + "gate.e_score_correction_bias"] = _randn(e, seed=seed + 6, scale=0.1)
        s = I * config["n_shared_experts"]
        for j, (name, shape) in enumerate((("gate_proj", (s, H)), ("up_proj", (s, H)), ("down_proj", (H, s)))):
            exp[f"shared.{name}"] = t[prefix + f"shared_experts.{name}.weight"] = \
                _randn(*shape, seed=seed + 7 + j, scale=shape[1] ** -0.5).bfloat16()
    if layout == "fused":
        t[prefix + "experts.gate_up_proj"] = w1.bfloat16()
        t[prefix + "experts.down_proj"] = w2.bfloat16()
        exp["l1"], exp["l2"] = w1.bfloat16().float(), w2.bfloat16().float()
        return t, config, exp
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    l1, l2 = torch.empty_like(w1), torch.empty_like(w2)
    for x in range(e):
        parts = (w1[x, :I], w1[x, I:], w2[x])
        for name, part, dense in zip(names, parts, (l1[x, :I], l1[x, I:], l2[x])):
            if layout == "fp8":
                w8, scale, dq = _fp8_blocks(part)
                t[f"{prefix}experts.{x}.{name}.weight"] = w8
                t[f"{prefix}experts.{x}.{name}.weight_scale_inv"] = scale
                dense.copy_(dq)
            else:
                t[f"{prefix}experts.{x}.{name}.weight"] = part.bfloat16()
                dense.copy_(part.bfloat16().float())
    exp["l1"], exp["l2"] = l1, l2
    return t, config, exp


def write(tmp_path, tensors, config, name="model.safetensors"):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _expected_weights(exp, mode):
    """What transform_weights makes of the expected user layout."""
    def user(w):
        if isinstance(w, tuple):
            return w if mode == "fp8xfp4" else megamoe.dequantize_mxfp4(*w).bfloat16()
        return megamoe.quantize_mxfp4(w) if mode == "fp8xfp4" else w.bfloat16()
    return megamoe.transform_weights(user(exp["l1"]), user(exp["l2"]), mode=mode, l1_bias=exp.get("l1_bias"),
                                     l2_bias=exp.get("l2_bias"))


def _assert_same(a, b):
    assert torch.equal(a.w, b.w)
    assert (a.w_sf is None and b.w_sf is None) or torch.equal(a.w_sf, b.w_sf)
    assert (a.bias is None and b.bias is None) or torch.equal(a.bias, b.bias)


FAMILY_LAYOUTS = [("mixtral", "per_expert"), ("qwen3_moe", "per_expert"), ("qwen3_moe", "fused"),
                  ("deepseek_v3", "per_expert"), ("deepseek_v3", "fp8"), ("gpt_oss", "mxfp4"), ("gpt_oss", "dense")]


@pytest.mark.parametrize("mode", ["fp8xfp4", "bf16xbf16"])
@pytest.mark.parametrize("family, layout", FAMILY_LAYOUTS)
def test_each_family_loads_exactly(family, layout, mode, tmp_path):
    tensors, config, exp = make_checkpoint(family, layout, layer=3)
    path = write(tmp_path, tensors, config)
    layer = load_moe_layer(path, checkpoint_prefix(family, 3), mode=mode)
    l1, l2 = _expected_weights(exp, mode)
    _assert_same(layer.l1, l1)
    _assert_same(layer.l2, l2)
    assert torch.equal(layer.router.weight, exp["router"])
    spec = moe_spec(config)
    assert (layer.activation, layer.activation_clamp) == (spec.activation, spec.activation_clamp)
    if family == "gpt_oss":
        assert torch.equal(layer.router.bias, exp["router_bias"]) and layer.return_router_weights
    if family == "deepseek_v3":
        assert torch.equal(layer.router.e_score_correction_bias, exp["correction"])
        assert layer.router.routed_scaling_factor == 2.5
        assert (layer.router.num_groups, layer.router.topk_groups) == (2, 1)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(layer.shared_experts, name).weight, exp[f"shared.{name}"])
    else:
        assert layer.shared_experts is None


def test_gpt_oss_mxfp4_bytes_are_kept_not_requantized(tmp_path):
    tensors, config, exp = make_checkpoint("gpt_oss", "mxfp4")
    layer = load_moe_layer(write(tmp_path, tensors, config), "model.layers.0.mlp.")
    q1, s1 = exp["l1"]
    requantized = megamoe.quantize_mxfp4(megamoe.dequantize_mxfp4(q1, s1))
    assert not torch.equal(requantized[0], q1), "a requantization would give the same bytes: the test tests nothing"
    _assert_same(layer.l1, megamoe.transform_weights((q1, s1), exp["l2"], l1_bias=exp["l1_bias"])[0])


def test_gpt_oss_mxfp4_decodes_like_transformers(tmp_path):
    """Our reading of *_blocks / *_scales against transformers' own gpt-oss dequantizer."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    tensors, config, _ = make_checkpoint("gpt_oss", "mxfp4")
    layer = load_moe_layer(write(tmp_path, tensors, config), "model.layers.0.mlp.")
    p = "model.layers.0.mlp.experts."
    hf_l1 = mxfp4.convert_moe_packed_tensors(tensors[p + "gate_up_proj_blocks"], tensors[p + "gate_up_proj_scales"],
                                             dtype=torch.float32)      # [E, H, 2I], x @ W, interleaved columns
    hf_l2 = mxfp4.convert_moe_packed_tensors(tensors[p + "down_proj_blocks"], tensors[p + "down_proj_scales"],
                                             dtype=torch.float32)      # [E, I, H]
    for x in range(E):
        ours = layer.l1.dequantize(x)
        assert torch.equal(ours[:I], hf_l1[x, :, 0::2].T) and torch.equal(ours[I:], hf_l1[x, :, 1::2].T)
        assert torch.equal(layer.l2.dequantize(x), hf_l2[x].T)


def test_gpt_oss_mxfp4_layer_runs_like_the_reference(tmp_path, device):
    tensors, config, exp = make_checkpoint("gpt_oss", "mxfp4", seed=5)
    layer = load_moe_layer(write(tmp_path, tensors, config), "model.layers.0.mlp.", device=device)
    x = _randn(6, H, seed=9).bfloat16().to(device)
    out, weights = layer(x)
    idx, w = layer.router(x)
    assert torch.equal(weights, w)
    ref = megamoe.reference.mega_moe_reference(x.cpu(), idx.cpu(), w.cpu(), exp["l1"], exp["l2"],
                                               activation="gpt_oss", activation_clamp=7.0,
                                               l1_bias=exp["l1_bias"], l2_bias=exp["l2_bias"])
    assert relative_error(out.cpu(), ref) <= LAYER_KERNEL_VS_REFERENCE


def test_sharded_checkpoint_with_index(tmp_path):
    tensors, config, exp = make_checkpoint("mixtral", layer=1)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    layer = load_moe_layer(tmp_path, "model.layers.1.block_sparse_moe.", config, mode="bf16xbf16")
    _assert_same(layer.l1, _expected_weights(exp, "bf16xbf16")[0])


def test_fp8_block_dequantization_with_partial_blocks(tmp_path):
    w = _randn(160, 288, seed=11)
    w8, scale, _ = _fp8_blocks(w)
    save_file({"w.weight": w8, "w.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    got = SafetensorsCheckpoint(tmp_path / "m.safetensors").get_dense("w.weight", (160, 288), "w", (128, 128))
    for i in range(2):
        for j in range(3):
            block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert torch.equal(got[block], w8[block].float() * scale[i, j])
    assert relative_error(got, w) < 0.05   # e4m3 keeps 3 mantissa bits


# ------------------------------------------------------------------------------ malformed checkpoints

P = "model.layers.0.mlp."


def _drop(name):
    return lambda t: t.pop(name)


def _set(name, value):
    return lambda t: t.__setitem__(name, value)


@pytest.mark.parametrize("family, layout, mutate, error, match", [
    ("qwen3_moe", "per_expert", _drop(P + "experts.2.up_proj.weight"), ValueError,
     r"missing tensor 'model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight' \(expert 2 up projection; "
     r"expected shape \[64, 64\]"),
    ("qwen3_moe", "per_expert", _drop(P + "gate.weight"), ValueError, r"missing tensor '.*gate\.weight' \(router"),
    ("qwen3_moe", "per_expert", _set(P + "experts.1.down_proj.weight", torch.ones(H, 32).bfloat16()), ValueError,
     r"'model\.layers\.0\.mlp\.experts\.1\.down_proj\.weight' \(expert 1 down projection\) in .*: "
     r"expected shape \[64, 64\], got \[64, 32\]"),
    ("qwen3_moe", "per_expert", _set(P + "experts.0.gate_proj.weight", torch.ones(I, H, dtype=torch.int64)),
     TypeError, r"'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight' .*expected dtype BF16 \(bfloat16\), "
                r"F16 \(float16\) or F32 \(float32\), got I64"),
    ("mixtral", "per_expert", _set("model.layers.0.block_sparse_moe.experts.0.w1.weight",
                                   torch.ones(I, H).to(torch.float8_e4m3fn)), TypeError, r"w1\.weight.*got F8_E4M3"),
    ("deepseek_v3", "fp8", _drop(P + "experts.3.down_proj.weight_scale_inv"), ValueError,
     r"missing tensor '.*experts\.3\.down_proj\.weight_scale_inv' \(expert 3 down projection: FP8 scales"),
    ("deepseek_v3", "per_expert", _set(P + "gate.e_score_correction_bias", torch.ones(3)), ValueError,
     r"e_score_correction_bias.*expected shape \[8\], got \[3\]"),
    ("gpt_oss", "mxfp4", _set(P + "experts.down_proj_scales", torch.ones(E, H, I // 32)), TypeError,
     r"'model\.layers\.0\.mlp\.experts\.down_proj_scales' \(L2: MXFP4 UE8M0 scales\).*expected dtype U8 \(uint8\), "
     r"got F32"),
    ("gpt_oss", "mxfp4", _set(P + "experts.gate_up_proj_blocks", torch.ones(E, 2 * I, H // 32, 8, dtype=torch.uint8)),
     ValueError, r"gate_up_proj_blocks.*expected shape \[4, 128, 2, 16\], got \[4, 128, 2, 8\]"),
    ("gpt_oss", "mxfp4", _drop(P + "experts.gate_up_proj_bias"), ValueError, r"missing tensor .*gate_up_proj_bias"),
])
def test_malformed_checkpoint_is_refused(family, layout, mutate, error, match, tmp_path):
    tensors, config, _ = make_checkpoint(family, layout)
    mutate(tensors)
    path = write(tmp_path, tensors, config)
    with pytest.raises(error, match=match):
        load_moe_layer(path, checkpoint_prefix(family, 0))


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        SafetensorsCheckpoint(tmp_path / "pytorch_model.bin")


def test_config_is_required_without_config_json(tmp_path):
    tensors, _, _ = make_checkpoint("mixtral")
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="config"):
        load_moe_layer(tmp_path / "m.safetensors", "model.layers.0.block_sparse_moe.")


@pytest.mark.parametrize("family, change, match", [
    ("mixtral", dict(hidden_act="gelu"), "hidden_act"),
    ("gpt_oss", dict(swiglu_alpha=1.5), "swiglu_alpha"),
    ("qwen3_moe", dict(hidden_size=48), "multiples of 32"),
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    ("qwen3_moe", dict(model_type="llama"), "model_type"),
    ("mixtral", dict(num_local_experts=None), "num_local_experts"),
])
def test_unsupported_configs_are_refused(family, change, match):
    config = {**CONFIGS[family], **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        moe_spec(config)


def test_config_field_aliases_and_fp8_block_size():
    """transformers 5 saves Qwen3-MoE's `num_experts` as `num_local_experts`; published gpt-oss
    configs also say `experts_per_token`; DeepSeek's FP8 block size comes from its
    quantization_config."""
    qwen = {k: v for k, v in CONFIGS["qwen3_moe"].items() if k != "num_experts"}
    assert moe_spec({**qwen, "num_local_experts": 6}).num_experts == 6
    gpt = {k: v for k, v in CONFIGS["gpt_oss"].items() if k != "num_experts_per_tok"}
    assert moe_spec({**gpt, "experts_per_token": 3}).num_topk == 3
    deepseek = {**CONFIGS["deepseek_v3"], "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}}
    assert moe_spec(deepseek).fp8_block == (64, 32)
    assert moe_spec(CONFIGS["deepseek_v3"]).fp8_block == (128, 128)


# ------------------------------------------------------------------------------ from a module


class _Expert4x(torch.nn.Module):
    """transformers 4.x's per-expert MLP (Mixtral's names)."""

    def __init__(self, w1, w3, w2):
        super().__init__()
        self.w1, self.w3, self.w2 = (torch.nn.Linear(1, 1, bias=False) for _ in range(3))
        self.w1.weight, self.w3.weight, self.w2.weight = (torch.nn.Parameter(w) for w in (w1, w3, w2))


class _Block4x(torch.nn.Module):
    def __init__(self, router, w1, w2):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.gate.weight = torch.nn.Parameter(router)
        self.experts = torch.nn.ModuleList(_Expert4x(w1[e, :I], w1[e, I:], w2[e]) for e in range(E))


class _Block5x(torch.nn.Module):
    def __init__(self, router, w1, w2):
        super().__init__()
        self.gate = torch.nn.Module()
        self.gate.weight = torch.nn.Parameter(router)
        self.experts = torch.nn.Module()
        self.experts.gate_up_proj = torch.nn.Parameter(w1)
        self.experts.down_proj = torch.nn.Parameter(w2)


@pytest.mark.parametrize("mode", ["fp8xfp4", "bf16xbf16"])
def test_module_layouts_of_transformers_4_and_5_agree(mode):
    _, _, exp = make_checkpoint("mixtral", seed=4)
    args = (exp["router"].float(), exp["l1"], exp["l2"])
    old, new = (layer_from_module(block(*args), CONFIGS["mixtral"], mode=mode) for block in (_Block4x, _Block5x))
    _assert_same(old.l1, new.l1)
    _assert_same(old.l2, new.l2)
    _assert_same(new.l1, _expected_weights(exp, mode)[0])


def test_module_weights_must_be_materialised_and_dense():
    _, _, exp = make_checkpoint("mixtral", seed=4)
    block = _Block5x(exp["router"].float(), exp["l1"], exp["l2"])
    block.experts.down_proj = torch.nn.Parameter(torch.zeros(E, H, I // 2, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match=r"experts\.down_proj .*uint8.*checkpoint"):
        layer_from_module(block, CONFIGS["mixtral"])
    block = _Block5x(exp["router"].float(), exp["l1"], exp["l2"]).to("meta")
    with pytest.raises(ValueError, match="meta"):
        layer_from_module(block, CONFIGS["mixtral"])
