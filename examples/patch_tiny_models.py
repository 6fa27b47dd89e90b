"""Build a tiny model of each supported family from its config, patch it, compare, time it.

    python examples/patch_tiny_models.py                       # every family, best device here
    python examples/patch_tiny_models.py --family gpt_oss --device cpu --mode bf16xbf16

No downloads: the models come from transformers configs with random weights (the MoE blocks get
weights of trained-like scale, std 1/sqrt(fan_in), so that they matter to the logits). For each
family it prints

  - block error: the first MoE block, patched against the original, on the hidden states the
    model really feeds it (relative Frobenius error);
  - logits error and top-1 agreement of the whole patched model against the original; in
    fp8xfp4 mode both also against the original model on the same MXFP4 weights, which
    isolates the activation quantization from the weight quantization; and for scale, how far
    the original model in BF16 is from itself in FP32 (random models are chaotic: a small change
    in one layer tips later routers, so logits move much more than one block does);
  - tokens/s of one prefill forward, original and patched (wall clock, median of repeats).

On a CUDA GPU the fused Triton kernels run; on the CPU the plain-torch path (or the Triton
interpreter with TRITON_INTERPRET=1, slow). Tiny models are launch-bound: these speeds say
that the path works, not how fast it is at scale (see `megamoe bench`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import megamoe
from megamoe.patch import SUPPORTED_BLOCKS

FAMILIES = {
    "qwen3_moe": dict(num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                      intermediate_size=512, norm_topk_prob=True),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=256),
    "gpt_oss": dict(num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4, intermediate_size=256,
                    head_dim=64),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
                        intermediate_size=512, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
                        routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=64),
}
COMMON = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=1024)


def tiny_model(family: str, dtype: torch.dtype, device: torch.device):
    import transformers

    config = transformers.AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for block in moe_blocks(model):
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            if t.dim() >= 2 and "bias" not in name:
                # gpt-oss stores x @ W: its fan-in is the middle dim; the others [.., out, in].
                fan_in = t.shape[1] if family == "gpt_oss" and name.startswith("experts.") else t.shape[-1]
                t.data.normal_(0, fan_in ** -0.5)
            else:
                t.data.normal_(0, 0.05)
    return model.to(device=device, dtype=dtype)


def moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_BLOCKS]


def snap_to_mxfp4(model) -> None:
    """Give the experts the MXFP4 values fp8xfp4 mode will use (groups of 32 along the input dim)."""
    for block in moe_blocks(model):
        for name, p in block.experts.named_parameters():
            if "bias" not in name:
                w = p.data.transpose(1, 2) if type(block).__name__ == "GptOssMLP" else p.data
                w.copy_(megamoe.dequantize_mxfp4(*megamoe.quantize_mxfp4(w.float())))


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def first_block_error(model, patched, ids) -> float:
    """The first MoE block, original and patched, on the input the model really gives it."""
    block = moe_blocks(model)[0]
    seen = {}
    handle = block.register_forward_pre_hook(lambda _, args: seen.setdefault("x", args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    layer = next(m for m in patched.modules() if isinstance(m, megamoe.MegaMoELayer))
    with torch.no_grad():
        ours, theirs = layer(seen["x"]), block(seen["x"])
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    return relative_error(first(ours), first(theirs))


def tokens_per_s(model, ids, reps: int) -> float:
    def sync():
        if ids.is_cuda:
            torch.cuda.synchronize()

    times = []
    with torch.no_grad():
        model(ids)   # warm-up: compiles kernels, allocates buffers
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            model(ids)
            sync()
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def run(family: str, mode: str, device: torch.device, batch: int, seq: int, reps: int) -> None:
    model = tiny_model(family, torch.bfloat16, device)
    ids = torch.randint(0, COMMON["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    patched = megamoe.patch_model(copy.deepcopy(model), mode=mode)
    with torch.no_grad():
        theirs, ours = model(ids).logits.float(), patched(ids).logits.float()
        exact = copy.deepcopy(model).float()(ids).logits
    print(f"{family} {mode}")
    print(f"  first MoE block vs original: {first_block_error(model, patched, ids):.2e}   logits vs original: "
          f"{relative_error(ours, theirs):.2e}, top-1 agree {top1(ours, theirs):.1%}")
    if mode == "fp8xfp4":
        same_weights = copy.deepcopy(model)
        snap_to_mxfp4(same_weights)
        with torch.no_grad():
            reference = same_weights(ids).logits.float()
        print(f"  the same against the original on the same MXFP4 weights: "
              f"{first_block_error(same_weights, patched, ids):.2e}   logits: {relative_error(ours, reference):.2e}, "
              f"top-1 agree {top1(ours, reference):.1%}")
    print(f"  for scale, the original in BF16 vs FP32: logits {relative_error(theirs, exact):.2e}, "
          f"top-1 agree {top1(theirs, exact):.1%}")
    print(f"  tokens/s: original {tokens_per_s(model, ids, reps):,.0f}, "
          f"megamoe {tokens_per_s(patched, ids, reps):,.0f} ({batch}x{seq} tokens per forward)")


def top1(logits, reference) -> float:
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--mode", choices=["fp8xfp4", "bf16xbf16", "both"], default="both")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    families = list(FAMILIES) if args.family == "all" else [args.family]
    modes = ["bf16xbf16", "fp8xfp4"] if args.mode == "both" else [args.mode]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"megamoe {megamoe.__version__} on {where}; models: hidden {COMMON['hidden_size']}, "
          f"{COMMON['num_hidden_layers']} layers, BF16")
    for family in families:
        for mode in modes:
            run(family, mode, device, args.batch, args.seq, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
