"""patch_model and layer_from_module against transformers' own MoE blocks and models.

Tiny models of each family are built from their configs (no downloads), their MoE blocks get
random weights (never zeros: biases and DeepSeek's correction bias too), and

  - bf16xbf16: the patched block against the transformers block run in BF16, and both against
    a float64 MoE on the same routing: ours may be at most twice as far from it as transformers'
    own BF16 path (the rule flash-attention uses);
  - fp8xfp4: the block's expert weights are first snapped to MXFP4 values (so quantizing them
    again is lossless, which the test checks), then the patched block is compared with the
    transformers block on those same weights (the activation quantization is the only
    difference) and with the float64 oracle that reproduces the kernels' rounding;
  - whole models: logits of the patched model against the original.
"""

import copy
import warnings

import pytest
import torch

import megamoe
from megamoe.checkpoints import _experts_from_module, layer_from_module, moe_spec
from megamoe.patch import SUPPORTED_BLOCKS
from megamoe.testing import relative_error

from tolerances import (FP8_REFERENCE_VS_DEQUANTIZED, HF_ROUTER_WEIGHTS, LAYER_CONTRACT, LAYER_KERNEL_VS_REFERENCE,
                        MODEL_LOGITS_BF16, MODEL_LOGITS_FP8_MEDIAN, TORCH_BF16_ERROR_FACTOR)

transformers = pytest.importorskip("transformers")

H = 64
COMMON = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
FAMILIES = {
    "qwen3_moe": dict(num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      intermediate_size=128, norm_topk_prob=True),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    # swiglu_limit 1.0 (gpt-oss uses 7.0) so that the clamps really cut values at these magnitudes.
    "gpt_oss": dict(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=64,
                    head_dim=16, swiglu_limit=1.0),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                        intermediate_size=128, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
                        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=16),
}


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    config = transformers.AutoConfig.for_model(family, **COMMON, **{**FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for block in moe_blocks(model):
        tensors = list(block.named_parameters()) + list(block.named_buffers())
        for name, t in tensors:
            std = 0.1 if "bias" in name else 0.15   # weights: about 1/sqrt(fan_in) for fan_in = 64
            t.data.copy_(torch.randn(t.shape, generator=g) * std)
    return model.to(dtype)


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_BLOCKS]


def snap_to_mxfp4(block):
    """Replace the block's expert weights by their MXFP4 values (groups of 32 along the input dim)."""
    for name, p in block.experts.named_parameters():
        if "bias" in name:
            continue
        # gpt-oss stores x @ W ([E, in, out]) for both projections; the others [E, out, in].
        w = p.data.transpose(1, 2) if type(block).__name__ == "GptOssMLP" else p.data
        snapped = megamoe.dequantize_mxfp4(*megamoe.quantize_mxfp4(w.float()))
        w.copy_(snapped)


def hf_route(block, x):
    """(topk_idx, topk_weights) from the transformers router; DeepSeek's weights include its
    routed_scaling_factor."""
    router = block.router if hasattr(block, "router") else block.gate
    _, weights, idx = router(x)
    return idx, weights


def hf_forward(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def experts64(block, x, idx, weights):
    """The transformers experts module (and shared experts) in float64 on given routing."""
    block64 = copy.deepcopy(block).double()
    if getattr(block64.experts, "config", None) is not None:
        # transformers 5 defaults to torch's grouped_mm, which has no float64 kernel.
        block64.experts.config._experts_implementation = "eager"
    x64 = x.double()
    flat = x64.reshape(-1, x.shape[-1])
    y = block64.experts(flat, idx, weights.double()).view(x.shape)
    if getattr(block64, "shared_experts", None) is not None:
        y = y + block64.shared_experts(x64)
    return y


def _x(shape, dtype, device, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _check_same_routing(layer, block, flat):
    idx, w = layer.router(flat)
    hf_idx, hf_w = hf_route(block, flat)
    assert torch.equal(idx.sort(dim=1).values, hf_idx.sort(dim=1).values)
    order = (idx.unsqueeze(2) == hf_idx.unsqueeze(1)).float().argmax(dim=2)
    scaled = w * layer.router.routed_scaling_factor
    assert torch.allclose(scaled, hf_w.float().gather(1, order), rtol=HF_ROUTER_WEIGHTS, atol=0)
    return idx, w


@pytest.mark.parametrize("family", FAMILIES)
def test_block_bf16_matches_transformers(family, device):
    model = tiny_model(family, torch.bfloat16).to(device)
    block = moe_blocks(model)[0]
    layer = layer_from_module(block, model.config, mode="bf16xbf16")
    x = _x((2, 3, H), torch.bfloat16, device)
    idx, w = _check_same_routing(layer, block, x.view(-1, H))
    ours, theirs = layer(x), hf_forward(block, x)
    ours = ours[0] if isinstance(ours, tuple) else ours
    exact = experts64(block, x, idx, w * layer.router.routed_scaling_factor)
    assert relative_error(ours, theirs) <= LAYER_CONTRACT
    assert relative_error(ours, exact) <= TORCH_BF16_ERROR_FACTOR * relative_error(theirs, exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_fp8_matches_transformers_on_mxfp4_weights(family, device):
    model = tiny_model(family, torch.float32).to(device)
    block = moe_blocks(model)[0]
    snap_to_mxfp4(block)
    layer = layer_from_module(block, model.config, mode="fp8xfp4")
    spec = moe_spec(model.config)
    user = _experts_from_module(block, spec, "fp8xfp4")
    # The snapped weights quantize to themselves: the layer holds exactly the block's weights.
    for e in range(spec.num_experts):
        assert torch.equal(layer.l1.dequantize(e), megamoe.dequantize_mxfp4(user.l1[0][e], user.l1[1][e]))
    x = _x((2, 3, H), torch.float32, device)
    flat = x.view(-1, H)
    idx, w = _check_same_routing(layer, block, flat)
    out = layer(x)
    out = out[0] if isinstance(out, tuple) else out
    assert relative_error(out, hf_forward(block, x)) <= FP8_REFERENCE_VS_DEQUANTIZED
    ref = megamoe.reference.mega_moe_reference(
        flat, idx, w, user.l1, user.l2, activation=layer.activation, activation_clamp=layer.activation_clamp,
        routed_scaling_factor=spec.routed_scaling_factor, l1_bias=user.l1_bias, l2_bias=user.l2_bias)
    ref = ref.float().view(x.shape)
    if layer.shared_experts is not None:
        ref = ref + block.shared_experts(x)
    assert relative_error(out, ref) <= LAYER_KERNEL_VS_REFERENCE


def _logits(model, ids, mode=None):
    if mode is not None:
        model = megamoe.patch_model(copy.deepcopy(model), mode=mode)
        layers = [m for m in model.modules() if isinstance(m, megamoe.MegaMoELayer)]
        assert layers and not moe_blocks(model)
        assert all(layer.buffers is layers[0].buffers for layer in layers)      # one shared buffer pool
    with torch.no_grad():
        return model(ids).logits


def _ids(device):
    return torch.randint(0, COMMON["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(8)).to(device)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_logits_bf16(family, device):
    model32 = tiny_model(family, torch.float32, seed=7).to(device)
    model = copy.deepcopy(model32).to(torch.bfloat16)
    ids = _ids(device)
    exact, theirs, ours = _logits(model32, ids), _logits(model, ids), _logits(model, ids, "bf16xbf16")
    assert ours.dtype == torch.bfloat16
    assert relative_error(ours, theirs) <= MODEL_LOGITS_BF16
    assert relative_error(ours, exact) <= TORCH_BF16_ERROR_FACTOR * relative_error(theirs, exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_logits_fp8(family, device):
    model = tiny_model(family, torch.float32, seed=7)
    for block in moe_blocks(model):
        snap_to_mxfp4(block)
    model = model.to(device)
    ids = _ids(device)
    theirs, ours = _logits(model, ids), _logits(model, ids, "fp8xfp4")
    per_token = (ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)
    assert per_token.median() <= MODEL_LOGITS_FP8_MEDIAN


def test_generate_runs_after_patching():
    model = megamoe.patch_model(tiny_model("qwen3_moe", torch.float32), mode="bf16xbf16")
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MEGAMOE_ENABLE", "0")
    model = tiny_model("mixtral")
    blocks = moe_blocks(model)
    assert megamoe.patch_model(model) is model
    assert moe_blocks(model) == blocks


def test_unsupported_blocks_stay_with_a_warning():
    config = transformers.AutoConfig.for_model(
        "qwen2_moe", **COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, intermediate_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match=r"left 2 MoE block\(s\) unchanged: model\.layers\.0\.mlp "
                                         r"\(Qwen2MoeSparseMoeBlock: no megamoe layout"):
        megamoe.patch_model(model)
    assert type(model.model.layers[1].mlp).__name__ == "Qwen2MoeSparseMoeBlock"


def test_unsupported_config_of_a_supported_family_stays():
    model = tiny_model("gpt_oss", swiglu_alpha=1.5)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp \(GptOssMLP: config: swiglu_alpha 1\.5"):
        megamoe.patch_model(model)
    assert len(moe_blocks(model)) == 2


def test_patch_reads_experts_from_a_saved_checkpoint(tmp_path):
    """save_pretrained writes Mixtral's per-expert w1/w3/w2 under "block_sparse_moe"; patching
    from those files must give the same bytes as patching from the modules."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    from_modules = megamoe.patch_model(copy.deepcopy(model))
    from_files = megamoe.patch_model(model, checkpoint=tmp_path)
    for a, b in zip(moe_layers(from_modules), moe_layers(from_files)):
        assert torch.equal(a.l1.w, b.l1.w) and torch.equal(a.l1.w_sf, b.l1.w_sf) and torch.equal(a.l2.w, b.l2.w)


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, megamoe.MegaMoELayer)]


def test_gpt_oss_patch_keeps_published_mxfp4_bytes(tmp_path):
    """A gpt-oss checkpoint's *_blocks / *_scales become the layer's weights byte for byte."""
    from safetensors.torch import save_file

    model = tiny_model("gpt_oss")
    spec = moe_spec(model.config)
    e, i = spec.num_experts, spec.intermediate
    tensors, expected = {}, []
    for n, block in enumerate(moe_blocks(model)):
        p = f"model.layers.{n}.mlp.experts."
        q1, s1 = megamoe.quantize_mxfp4(block.experts.gate_up_proj.data.transpose(1, 2))   # [E, 2I, H], interleaved
        q2, s2 = megamoe.quantize_mxfp4(block.experts.down_proj.data.transpose(1, 2))
        tensors.update({p + "gate_up_proj_blocks": q1.view(e, 2 * i, H // 32, 16), p + "gate_up_proj_scales": s1,
                        p + "down_proj_blocks": q2.view(e, H, i // 32, 16), p + "down_proj_scales": s2,
                        p + "gate_up_proj_bias": block.experts.gate_up_proj_bias.data.bfloat16(),
                        p + "down_proj_bias": block.experts.down_proj_bias.data.bfloat16()})
        rows = torch.cat([torch.arange(0, 2 * i, 2), torch.arange(1, 2 * i, 2)])
        expected.append(megamoe.transform_weights((q1[:, rows], s1[:, rows]), (q2, s2)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    megamoe.patch_model(model, checkpoint=tmp_path)
    for layer, (l1, l2) in zip(moe_layers(model), expected):
        assert torch.equal(layer.l1.w, l1.w) and torch.equal(layer.l1.w_sf, l1.w_sf)
        assert torch.equal(layer.l2.w, l2.w) and torch.equal(layer.l2.w_sf, l2.w_sf)


def test_patch_model_arguments_are_checked():
    with pytest.raises(TypeError, match="model"):
        megamoe.patch_model(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="mode"):
        megamoe.patch_model(tiny_model("mixtral"), mode="fp4")
    with pytest.raises(ValueError, match="mma"):
        megamoe.patch_model(tiny_model("mixtral"), mode="bf16xbf16", mma="fp16")


def test_patch_model_passes_mma_to_every_layer():
    model = megamoe.patch_model(tiny_model("qwen3_moe", torch.float32), mma="fp16")
    layers = [m for m in model.modules() if isinstance(m, megamoe.MegaMoELayer)]
    assert layers and all(layer.mma == "fp16" for layer in layers)
