"""patch_model: swap the MoE blocks of a transformers model for MegaMoELayers, in place.

    model = AutoModelForCausalLM.from_pretrained(...)
    megamoe.patch_model(model, mode="fp8xfp4")

Blocks are recognised by class name, so transformers is never imported here:

    MixtralSparseMoeBlock    (mixtral)       Qwen3MoeSparseMoeBlock (qwen3_moe)
    DeepseekV3MoE            (deepseek_v3)   GptOssMLP              (gpt_oss)

Any other module that looks like an MoE block (an `experts` child next to a `gate` or `router`,
or a class name ending like one) stays as it is, and one warning names every block left.
MEGAMOE_ENABLE=0 in the environment turns patch_model into a no-op.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from . import env
from .checkpoints import SafetensorsCheckpoint, layer_from_module, moe_spec
from .layer import DEFAULT_MAX_TOKENS_PER_CALL, BufferPool
from .reference import check_mma, check_mode, default_mma

logger = logging.getLogger("megamoe")

SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "DeepseekV3MoE": "deepseek_v3",
    "GptOssMLP": "gpt_oss",
}

_KNOWN_UNSUPPORTED = {
    "Mxfp4GptOssMLP": "gpt-oss quantized by transformers (its MXFP4 layout is swizzled for other kernels); load "
                      "the model with Mxfp4Config(dequantize=True) and pass patch_model(checkpoint=<its files>) "
                      "to use the original MXFP4 bytes",
    "DeepseekV4SparseMoeBlock": "DeepSeek-V4 blocks are not supported yet (hash-routed layers, sqrt-softplus "
                                "scores without groups)",
}

_MOE_CLASS_SUFFIXES = ("SparseMoeBlock", "MoeBlock", "MoE", "MoeMLP", "MoeLayer", "SparseMoE")


def _looks_like_moe(module: nn.Module) -> bool:
    if type(module).__name__.endswith(_MOE_CLASS_SUFFIXES):
        return True
    has_experts = isinstance(getattr(module, "experts", None), nn.Module)
    return has_experts and any(isinstance(getattr(module, a, None), nn.Module) for a in ("gate", "router"))


def _text_config(config):
    # Multimodal configs keep the language model's fields in a sub-config.
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _checkpoint_prefix(ckpt: SafetensorsCheckpoint, module_name: str, family: str) -> str:
    """The prefix of this block's tensors in the checkpoint: the module's name, with "model."
    in front for a base model, and Mixtral's "block_sparse_moe" for transformers 5's "mlp"."""
    tried = []
    for base in (module_name, "model." + module_name):
        candidates = [base]
        if family == "mixtral" and base.endswith(".mlp"):
            candidates.append(base[: -len("mlp")] + "block_sparse_moe")
        for name in candidates:
            prefix = name + "."
            tried.append(prefix)
            if ckpt.names(prefix + "experts."):
                return prefix
    raise ValueError(f"checkpoint {ckpt.source}: no expert tensors for block {module_name!r} (tried prefixes {tried})")


def patch_model(model: nn.Module, mode: str = "fp8xfp4", *, checkpoint=None,
                max_tokens_per_call: int = DEFAULT_MAX_TOKENS_PER_CALL, share_buffers: bool = True,
                mma: str | None = None) -> nn.Module:
    """Replace every supported MoE block of a transformers model by a MegaMoELayer; return the model.

    model:      a transformers model (anything with `.config` and the blocks listed in the
                module docstring); its weights must be materialised (not on the meta device).
    mode:       "fp8xfp4" (dense expert weights are quantized to MXFP4 now) or "bf16xbf16".
    checkpoint: None, or the model's safetensors files (directory, file, list or a
                SafetensorsCheckpoint): the routed experts are read from there instead of the
                modules. Use it for gpt-oss to keep the published MXFP4 bytes as they are.
    max_tokens_per_call: tokens per fused call; longer inputs run in chunks.
    share_buffers: one MegaMoEBuffer per (device, shape) for all layers (they run one after
                another); False gives every layer its own.
    mma:        fp8xfp4's tensor cores: "fp16-l1" (None: the default), "fp8" or "fp16" (MegaMoEBuffer).

    Each new layer sits on the device of the block it replaces and returns the block's dtype;
    the old block's expert weights are released with it (shared experts are kept). Blocks whose
    config the fused path cannot run stay, with a warning that names them and says why; a
    malformed checkpoint raises. With MEGAMOE_ENABLE=0 the model is returned unchanged.
    """
    check_mode(mode)
    mma = default_mma(mode) if mma is None else mma
    check_mma(mma, mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model: expected a transformers model with a `.config`, got {type(model).__name__}")
    if not env.enabled():
        logger.info("megamoe.patch_model: MEGAMOE_ENABLE=0, the model is left unchanged")
        return model
    config = _text_config(config)
    ckpt = None
    if checkpoint is not None:
        ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
    pool = BufferPool() if share_buffers else None
    replaced, skipped, claimed = [], [], []
    for name, module in list(model.named_modules()):
        if any(name.startswith(p + ".") for p in claimed):
            continue
        cls = type(module).__name__
        family = SUPPORTED_BLOCKS.get(cls)
        if family is None:
            if _looks_like_moe(module):
                claimed.append(name)
                skipped.append(f"{name} ({cls}: {_KNOWN_UNSUPPORTED.get(cls, 'no megamoe layout for this block')})")
            continue
        claimed.append(name)
        try:
            # The block's class names the family, also in models that reuse its blocks under
            # another model_type; its config fields are read under that family's names.
            moe_spec(config, family)
        except ValueError as err:
            skipped.append(f"{name} ({cls}: {err})")
            continue
        prefix = _checkpoint_prefix(ckpt, name, family) if ckpt is not None else None
        options = dict(max_tokens_per_call=max_tokens_per_call, mma=mma)
        if pool is not None:
            options["buffers"] = pool
        layer = layer_from_module(module, config, mode=mode, checkpoint=ckpt, prefix=prefix, family=family,
                                  **options)
        layer.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        replaced.append(name)
    if skipped:
        warnings.warn(f"megamoe.patch_model: left {len(skipped)} MoE block(s) unchanged: " + "; ".join(skipped),
                      stacklevel=2)
    elif not replaced:
        warnings.warn(f"megamoe.patch_model: found no MoE block in {type(model).__name__}", stacklevel=2)
    logger.info("megamoe.patch_model: replaced %d MoE block(s) with MegaMoELayer (mode %s)", len(replaced), mode)
    return model
