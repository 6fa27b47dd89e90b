"""Load one MoE block straight from safetensors files, without building the model.

    python examples/load_safetensors_layer.py [--device cuda]

For each family a tiny model is built from its config (no downloads) and saved with
`save_pretrained`, which writes the published per-expert layout (Mixtral's w1/w3/w2 under
"block_sparse_moe", Qwen3-MoE's and DeepSeek-V3's gate_proj/up_proj/down_proj); gpt-oss is also
written the way openai publishes it, as MXFP4 `*_blocks` / `*_scales`, which megamoe uses byte
for byte. `megamoe.checkpoints.load_moe_layer` then reads one block's tensors (checking every
name, shape and dtype) and the result is compared with the model's own block.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import megamoe
from megamoe.checkpoints import checkpoint_prefix, load_moe_layer

CONFIGS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=128),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, n_group=4, topk_group=2,
                        first_k_dense_replace=0, n_shared_experts=1, routed_scaling_factor=2.5, kv_lora_rank=32,
                        q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                        num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=128, head_dim=32),
}


def tiny_model(family: str):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.for_model(family, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                               vocab_size=256, **CONFIGS[family])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    block = model.model.layers[0].mlp
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        t.data.normal_(0, 0.05 if "bias" in name else 0.1)
    return model, block


def write_gpt_oss_mxfp4(block, directory: Path, config) -> None:
    """gpt-oss as published: expert weights as MXFP4 blocks [E, N, K/32, 16] + scales [E, N, K/32]."""
    p = "model.layers.0.mlp."
    experts = block.experts
    tensors = {p + "router.weight": block.router.weight.data, p + "router.bias": block.router.bias.data,
               p + "experts.gate_up_proj_bias": experts.gate_up_proj_bias.data,
               p + "experts.down_proj_bias": experts.down_proj_bias.data}
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(experts, name).data.transpose(1, 2)            # x @ W -> [E, out, in]
        w_q, w_sf = megamoe.quantize_mxfp4(w)
        tensors[p + f"experts.{name}_blocks"] = w_q.view(*w_sf.shape, 16)
        tensors[p + f"experts.{name}_scales"] = w_sf
        # The model now holds exactly the published values.
        w.copy_(megamoe.dequantize_mxfp4(w_q, w_sf))
    save_file({k: v.contiguous().bfloat16() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    config.to_json_file(str(directory / "config.json"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for family in CONFIGS:
        model, block = tiny_model(family)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            if family == "gpt_oss":
                write_gpt_oss_mxfp4(block, directory, model.config)
            else:
                model.save_pretrained(directory)
            block = block.to(device)
            x = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1)).to(device)
            with torch.no_grad():
                expected = block(x)
            expected = expected[0] if isinstance(expected, tuple) else expected
            for mode in ("bf16xbf16", "fp8xfp4"):
                layer = load_moe_layer(directory, checkpoint_prefix(family, 0), mode=mode, device=device)
                out = layer(x)
                out = out[0] if isinstance(out, tuple) else out
                err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
                print(f"{family:<12} {mode:<10} from {checkpoint_prefix(family, 0)}*: relative error vs the model's "
                      f"block {err:.2e}   ({layer.expert_nbytes / 2**10:.0f} KiB of experts)")
    print("fp8xfp4 includes the MXFP4 weight error (except gpt-oss, whose published weights are MXFP4 already).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
