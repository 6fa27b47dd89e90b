"""MoE weights of Mixtral, Qwen3-MoE, DeepSeek-V3 and gpt-oss -> MegaMoELayer.

Two sources, one result (a `MegaMoELayer` with the family's router and activation):

    layer_from_module(block, config, mode=...)             a transformers MoE block in memory
    load_moe_layer(checkpoint, prefix, config, mode=...)   safetensors files (never pickle)

Each family's MoE block, as its config describes it (`moe_spec`) and as its checkpoints store it
(names relative to the block's prefix, e.g. "model.layers.3.mlp."; Mixtral's files say
"block_sparse_moe" where transformers 5 modules say "mlp"). [N, K] = [out, in] like nn.Linear.

    family       router                               experts (per expert e, or fused [E, ...])
    mixtral      gate.weight [E, H]                    experts.e.w1 / w3 / w2 .weight: gate [I, H],
                 softmax top-k, renormalised             up [I, H], down [H, I]
    qwen3_moe    gate.weight [E, H]                    experts.e.gate_proj / up_proj / down_proj .weight
                 softmax top-k, norm_topk_prob
    deepseek_v3  gate.weight [E, H],                   as qwen3_moe, optionally FP8 e4m3 with a
                 gate.e_score_correction_bias [E]       `.weight_scale_inv` F32 per 128x128 block (the
                                                        config's quantization_config.weight_block_size);
                 sigmoid, group-limited top-k,         shared_experts.gate_proj / up_proj / down_proj
                 routed_scaling_factor                  .weight: [S, H], [S, H], [H, S]
    gpt_oss      router.weight [E, H], router.bias [E] experts.gate_up_proj_blocks [E, 2I, H/32, 16] +
                 top-k logits, softmax over k          _scales [E, 2I, H/32] (MXFP4), or
                                                       experts.gate_up_proj [E, H, 2I] (dense, x @ W);
                                                       rows / columns interleave gate (even) and up (odd);
                                                       experts.down_proj_blocks [E, H, I/32, 16] + _scales,
                                                       or experts.down_proj [E, I, H];
                                                       experts.gate_up_proj_bias [E, 2I], down_proj_bias [E, H]

Mixtral, Qwen3-MoE and DeepSeek-V3 files may also hold the fused form transformers 5 keeps in
memory: experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and experts.down_proj [E, H, I].

In fp8xfp4 mode dense weights (BF16 / F16 / F32, or DeepSeek's FP8 blocks, dequantized first)
are quantized to MXFP4 on load, one expert at a time; gpt-oss's MXFP4 blocks and scales are
used as they are (its interleaved gate/up rows are a row permutation of the bytes), with no
dequantize-requantize round trip. In bf16xbf16 mode everything is dequantized to BF16.

Every tensor's name, shape and dtype is checked before it is read: a missing tensor or a wrong
shape raises ValueError, a wrong dtype TypeError, each naming the tensor, the file and what was
expected.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

import torch
from torch import nn

from .formats import SCALE_GROUP, dequantize_mxfp4
from .layer import (ExpertStack, GroupLimitedTopKRouter, MegaMoELayer, SoftmaxTopKRouter, SwiGLUMLP,
                    TopKSoftmaxRouter, dense_experts)
from .reference import GPT_OSS_ALPHA, check_mode

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")

DENSE = ("BF16", "F16", "F32")
"""safetensors dtypes accepted for dense (unquantized) weights."""
FP8 = "F8_E4M3"
U8 = "U8"
_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, FP8: torch.float8_e4m3fn,
                 U8: torch.uint8}
MXFP4_BLOCK_BYTES = SCALE_GROUP // 2
"""Bytes of one MXFP4 block of 32 elements: the last dim of gpt-oss's `*_blocks` tensors."""

_REQUIRED = object()


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class MoESpec:
    """What one family's MoE block computes, read from a model config by `moe_spec`.

    num_experts E, num_topk K, hidden H, intermediate I (per routed expert);
    router: "softmax_topk" (Mixtral, Qwen3-MoE), "group_limited" (DeepSeek-V3), "topk_softmax" (gpt-oss);
    shared_intermediate: S of the shared experts (0: none).
    fp8_block: rows x columns sharing one scale in FP8 checkpoints (DeepSeek-V3's
    quantization_config.weight_block_size).
    """

    family: str
    num_experts: int
    num_topk: int
    hidden: int
    intermediate: int
    router: str
    renormalize: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    activation: str = "swiglu"
    activation_clamp: float | None = None
    shared_intermediate: int = 0
    fp8_block: tuple[int, int] = (128, 128)


_ALIASES = {
    # transformers 5 saves some fields under other names than the published config.json files.
    "num_experts": ("num_experts", "num_local_experts"),
    "num_local_experts": ("num_local_experts", "num_experts"),
    "n_routed_experts": ("n_routed_experts", "num_local_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "experts_per_token"),
}


def _get(config, name: str, default=_REQUIRED):
    """A config field (a PretrainedConfig or a config.json dict), under any of its names."""
    for alias in _ALIASES.get(name, (name,)):
        value = config.get(alias, _REQUIRED) if isinstance(config, dict) else getattr(config, alias, _REQUIRED)
        if value is not _REQUIRED:
            return value
    if default is _REQUIRED:
        raise ValueError(f"config: missing field {name!r}")
    return default


def _family_of(config) -> str:
    family = _get(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"config: model_type {family!r} has no megamoe layout; supported: {FAMILIES}")
    return family


def moe_spec(config, family: str | None = None) -> MoESpec:
    """The MoE block of a model config (a transformers PretrainedConfig or a config.json dict).

    family: one of FAMILIES; default: the config's model_type. Raises ValueError naming the
    field when the config describes something the fused path cannot run (another activation,
    H or I not a multiple of 32, gpt-oss's alpha other than 1.702, a scoring other than
    sigmoid for DeepSeek-V3).
    """
    family = family or _family_of(config)
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    hidden = int(_get(config, "hidden_size"))
    topk = int(_get(config, "num_experts_per_tok"))
    if family == "gpt_oss":
        alpha = float(_get(config, "swiglu_alpha", GPT_OSS_ALPHA))
        if not math.isclose(alpha, GPT_OSS_ALPHA):
            raise ValueError(f"config: swiglu_alpha {alpha} is not supported (the kernels use {GPT_OSS_ALPHA})")
        spec = MoESpec(family, int(_get(config, "num_local_experts")), topk, hidden,
                       int(_get(config, "intermediate_size")), "topk_softmax", activation="gpt_oss",
                       activation_clamp=float(_get(config, "swiglu_limit", 7.0)))
    else:
        act = _get(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config: hidden_act {act!r} is not supported (the experts compute SwiGLU)")
        if family == "mixtral":
            spec = MoESpec(family, int(_get(config, "num_local_experts")), topk, hidden,
                           int(_get(config, "intermediate_size")), "softmax_topk")
        elif family == "qwen3_moe":
            spec = MoESpec(family, int(_get(config, "num_experts")), topk, hidden,
                           int(_get(config, "moe_intermediate_size")), "softmax_topk",
                           renormalize=bool(_get(config, "norm_topk_prob", False)))
        else:
            for name, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
                value = _get(config, name, expected)
                if value != expected:
                    raise ValueError(f"config: {name} {value!r} is not supported (expected {expected!r})")
            inter = int(_get(config, "moe_intermediate_size"))
            quantization = _get(config, "quantization_config", None) or {}
            block = quantization.get("weight_block_size") if isinstance(quantization, dict) else \
                getattr(quantization, "weight_block_size", None)
            spec = MoESpec(family, int(_get(config, "n_routed_experts")), topk, hidden, inter, "group_limited",
                           renormalize=bool(_get(config, "norm_topk_prob", True)),
                           num_groups=int(_get(config, "n_group", None) or 1),
                           topk_groups=int(_get(config, "topk_group", None) or 1),
                           routed_scaling_factor=float(_get(config, "routed_scaling_factor", 1.0)),
                           shared_intermediate=inter * int(_get(config, "n_shared_experts", None) or 0),
                           fp8_block=tuple(int(b) for b in block) if block else (128, 128))
    if spec.hidden % SCALE_GROUP or spec.intermediate % SCALE_GROUP:
        raise ValueError(f"config: hidden ({spec.hidden}) and intermediate ({spec.intermediate}) sizes must be "
                         f"multiples of {SCALE_GROUP}")
    return spec


def checkpoint_prefix(family: str, layer_idx: int) -> str:
    """The tensor-name prefix of layer `layer_idx`'s MoE block in the family's published files."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    return f"model.layers.{layer_idx}.{block}."


def build_router(spec: MoESpec, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 correction_bias: torch.Tensor | None = None) -> nn.Module:
    """The family's router holding `weight` [E, H] (and gpt-oss's `bias` [E], DeepSeek's
    `correction_bias` [E]), on their device, in weight's dtype."""
    kw = dict(dtype=weight.dtype, device=weight.device)
    if spec.router == "softmax_topk":
        router = SoftmaxTopKRouter(spec.hidden, spec.num_experts, spec.num_topk, spec.renormalize, **kw)
    elif spec.router == "group_limited":
        router = GroupLimitedTopKRouter(spec.hidden, spec.num_experts, spec.num_topk, num_groups=spec.num_groups,
                                        topk_groups=spec.topk_groups, renormalize=spec.renormalize,
                                        routed_scaling_factor=spec.routed_scaling_factor, **kw)
        if correction_bias is not None:
            router.e_score_correction_bias.copy_(correction_bias.float())
    else:
        router = TopKSoftmaxRouter(spec.hidden, spec.num_experts, spec.num_topk, **kw)
        router.bias.copy_(bias)
    router.weight.copy_(weight)
    return router


# ------------------------------------------------------------------------------ expert tensors


@dataclass
class ExpertTensors:
    """Routed experts in user layout for one mode (see `megamoe.transform_weights`).

    l1: fp8xfp4 (uint8 [E, 2I, H/2], uint8 [E, 2I, H/32]), bf16xbf16 bfloat16 [E, 2I, H]; gate rows
    then up rows. l2: (uint8 [E, H, I/2], uint8 [E, H, I/32]) or bfloat16 [E, H, I].
    l1_bias float32 [E, 2I] (gate then up) and l2_bias float32 [E, H], or None.
    """

    l1: object
    l2: object
    l1_bias: torch.Tensor | None = None
    l2_bias: torch.Tensor | None = None


def _deinterleave(num_rows: int, device) -> torch.Tensor:
    """Row order that turns gpt-oss's interleaved (gate0, up0, gate1, up1, ...) into gate rows then up rows."""
    rows = torch.arange(num_rows, device=device)
    return torch.cat([rows[0::2], rows[1::2]])


def mxfp4_experts(w_q: torch.Tensor, w_sf: torch.Tensor, mode: str, rows: torch.Tensor | None = None):
    """MXFP4 bytes (uint8 [E, N, K/2], uint8 [E, N, K/32]) -> user layout for `mode`, rows
    reordered by `rows` when given. fp8xfp4 keeps the bytes; bf16xbf16 dequantizes (exact)."""
    if rows is not None:
        w_q, w_sf = w_q[:, rows], w_sf[:, rows]
    if mode == "fp8xfp4":
        return w_q.contiguous(), w_sf.contiguous()
    out = torch.empty(*w_q.shape[:-1], 2 * w_q.shape[-1], dtype=torch.bfloat16, device=w_q.device)
    for expert in range(w_q.shape[0]):
        out[expert] = dequantize_mxfp4(w_q[expert], w_sf[expert]).to(torch.bfloat16)
    return out


# ------------------------------------------------------------------------------ from a module


def _param(module: nn.Module, path: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    t = module
    for part in path.split("."):
        t = getattr(t, part, None)
        if t is None:
            raise ValueError(f"{type(module).__name__}: has no `{path}` ({what})")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{path} ({what}): expected a tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{type(module).__name__}.{path} ({what}): the weights are not materialised (meta device)")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{type(module).__name__}.{path} ({what}): expected a float tensor, got {t.dtype} (a "
                        "quantized module: pass the safetensors checkpoint instead, see patch_model(checkpoint=))")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{type(module).__name__}.{path} ({what}): expected shape {list(shape)}, got {list(t.shape)}")
    return t.detach()


def _experts_from_module(block: nn.Module, spec: MoESpec, mode: str) -> ExpertTensors:
    e, h, i = spec.num_experts, spec.hidden, spec.intermediate
    experts = getattr(block, "experts", None)
    if experts is None:
        raise ValueError(f"{type(block).__name__}: has no `experts` module")
    if spec.family == "gpt_oss":
        gate_up = _param(block, "experts.gate_up_proj", (e, h, 2 * i), "L1, x @ W, gate/up interleaved")
        down = _param(block, "experts.down_proj", (e, i, h), "L2, x @ W")
        gate_up_bias = _param(block, "experts.gate_up_proj_bias", (e, 2 * i), "L1 bias, interleaved")
        down_bias = _param(block, "experts.down_proj_bias", (e, h), "L2 bias")
        rows = _deinterleave(2 * i, gate_up.device)
        return ExpertTensors(dense_experts(gate_up.transpose(1, 2), mode, rows=rows),
                             dense_experts(down.transpose(1, 2), mode),
                             gate_up_bias[:, rows].float(), down_bias.float())
    if isinstance(experts, nn.ModuleList):
        # transformers 4.x: one MLP module per expert.
        if len(experts) != e:
            raise ValueError(f"{type(block).__name__}.experts: expected {e} experts, got {len(experts)}")
        names = ("w1", "w3", "w2") if spec.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        device = _param(block, f"experts.0.{names[0]}.weight", (i, h), "expert 0 gate").device
        l1, l2 = ExpertStack(mode, e, 2 * i, h, device), ExpertStack(mode, e, h, i, device)
        for expert in range(e):
            gate = _param(block, f"experts.{expert}.{names[0]}.weight", (i, h), f"expert {expert} gate")
            up = _param(block, f"experts.{expert}.{names[1]}.weight", (i, h), f"expert {expert} up")
            l1.put(expert, torch.cat([gate, up]))
            l2.put(expert, _param(block, f"experts.{expert}.{names[2]}.weight", (h, i), f"expert {expert} down"))
        return ExpertTensors(l1.result(), l2.result())
    gate_up = _param(block, "experts.gate_up_proj", (e, 2 * i, h), "L1, gate rows then up rows")
    down = _param(block, "experts.down_proj", (e, h, i), "L2")
    return ExpertTensors(dense_experts(gate_up, mode), dense_experts(down, mode))


def _module_activation(block: nn.Module, spec: MoESpec) -> MoESpec:
    """gpt-oss experts carry their own `alpha` and `limit`; they win over the config, because
    some transformers versions (5.17) hard-code 1.702 and 7.0 whatever the config says."""
    experts = getattr(block, "experts", None)
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if alpha is not None and not math.isclose(float(alpha), GPT_OSS_ALPHA):
        raise ValueError(f"{type(block).__name__}.experts.alpha: {alpha} is not supported "
                         f"(the kernels use {GPT_OSS_ALPHA})")
    return replace(spec, activation_clamp=float(limit)) if limit is not None else spec


def layer_from_module(block: nn.Module, config, *, mode: str = "fp8xfp4", checkpoint=None,
                      prefix: str | None = None, family: str | None = None, **layer_options) -> MegaMoELayer:
    """A MegaMoELayer equivalent to a transformers MoE block (transformers 5 fused experts, or
    4.x per-expert modules), on the device of the block's weights.

    block:      MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3MoE or GptOssMLP.
    config:     the model's config.
    family:     one of FAMILIES; default: the config's model_type.
    checkpoint: None, or a SafetensorsCheckpoint / path to read the routed experts from (under
                `prefix`) instead of the module; the router and shared experts still come from
                the module. This is how gpt-oss's MXFP4 blocks are used as they are.
    layer_options: passed to MegaMoELayer (max_tokens_per_call, buffers, ...).
    The block's own shared-expert module is reused, not copied.
    """
    check_mode(mode)
    spec = moe_spec(config, family)
    if spec.family == "gpt_oss":
        spec = _module_activation(block, spec)
        router_module = getattr(block, "router", None)
        if router_module is None:
            raise ValueError(f"{type(block).__name__}: has no `router` module")
        weight = _param(block, "router.weight", (spec.num_experts, spec.hidden), "router")
        router = build_router(spec, weight, bias=_param(block, "router.bias", (spec.num_experts,), "router bias"))
    else:
        weight = _param(block, "gate.weight", (spec.num_experts, spec.hidden), "router")
        correction = None
        if spec.router == "group_limited":
            correction = getattr(block.gate, "e_score_correction_bias", None)
            if not isinstance(correction, torch.Tensor) or tuple(correction.shape) != (spec.num_experts,):
                raise ValueError(f"{type(block).__name__}.gate.e_score_correction_bias: expected a tensor "
                                 f"[{spec.num_experts}]")
        router = build_router(spec, weight, correction_bias=correction)
    if checkpoint is not None:
        if prefix is None:
            raise ValueError("prefix: required with checkpoint (the block's tensor-name prefix)")
        ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
        tensors = _experts_from_checkpoint(ckpt, prefix, spec, mode, weight.device)
    else:
        tensors = _experts_from_module(block, spec, mode)
    shared = None
    if spec.shared_intermediate:
        shared = getattr(block, "shared_experts", None)
        if not isinstance(shared, nn.Module):
            raise ValueError(f"{type(block).__name__}: config has n_shared_experts but the block has no "
                             "`shared_experts` module")
    return _make_layer(spec, router, tensors, mode, shared, layer_options)


def _make_layer(spec, router, tensors: ExpertTensors, mode, shared, layer_options) -> MegaMoELayer:
    return MegaMoELayer(router, tensors.l1, tensors.l2, mode=mode, l1_bias=tensors.l1_bias, l2_bias=tensors.l2_bias,
                        activation=spec.activation, activation_clamp=spec.activation_clamp, shared_experts=shared,
                        return_router_weights=spec.family == "gpt_oss", **layer_options)


# ------------------------------------------------------------------------------ from safetensors


def _dtype_names(dtypes) -> str:
    names = [f"{d} ({str(_TORCH_DTYPES[d]).replace('torch.', '')})" for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class SafetensorsCheckpoint:
    """Read-only access to the tensors of a safetensors checkpoint, with checks.

    path: a `.safetensors` file, a directory holding them (with or without
    `model.safetensors.index.json`; its `config.json`, if any, becomes `.config`), or a list of
    files. Files are opened with safetensors (headers and tensors only; no pickle, no code), one
    handle per file, kept open. Pickle checkpoints (.bin, .pt, .pth) are refused.
    """

    def __init__(self, path):
        from safetensors import safe_open  # a dependency of megamoe; imported here to keep `import megamoe` light

        self._safe_open = safe_open
        self.config = None
        if isinstance(path, (list, tuple)):
            files = [os.fspath(p) for p in path]
            self.source = f"{len(files)} files"
        else:
            path = os.fspath(path)
            self.source = path
            if os.path.isdir(path):
                files = self._files_in(path)
                config_file = os.path.join(path, "config.json")
                if os.path.isfile(config_file):
                    with open(config_file) as f:
                        self.config = json.load(f)
            else:
                files = [path]
        for file in files:
            if not file.endswith(".safetensors"):
                raise ValueError(f"checkpoint: {file!r} is not a .safetensors file; megamoe reads safetensors only "
                                 "(pickle checkpoints can run code when loaded)")
            if not os.path.isfile(file):
                raise ValueError(f"checkpoint: no such file {file!r}")
        self._file_of: dict[str, str] = {}
        self._handles = {}
        for file in files:
            for name in self._handle(file).keys():
                self._file_of[name] = file

    @staticmethod
    def _files_in(directory: str) -> list[str]:
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
        files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            pickles = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {pickles[:3]}: pickle checkpoints are not read; convert them to safetensors)" \
                if pickles else ""
            raise ValueError(f"checkpoint: no .safetensors files in {directory!r}{hint}")
        return files

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._safe_open(file, framework="pt", device="cpu")
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._file_of if n.startswith(prefix))

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name such as "BF16") of a tensor, from the file header."""
        piece = self._handle(self._file_of[name]).get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()

    def get(self, name: str, shape, dtypes, what: str) -> torch.Tensor:
        """The tensor `name` on the CPU after checking that it exists, has `shape` and one of
        `dtypes` (safetensors names); the errors say which tensor, where and what was expected."""
        shape = tuple(int(d) for d in shape)
        if name not in self._file_of:
            prefix = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
            near = self.names(prefix)
            seen = f"; {len(near)} tensor(s) under {prefix!r}, e.g. {near[:4]}" if near else \
                f"; nothing under {prefix!r}"
            raise ValueError(f"checkpoint {self.source}: missing tensor {name!r} ({what}; expected shape "
                             f"{list(shape)}, dtype {_dtype_names(dtypes)}){seen}")
        file = self._file_of[name]
        got_shape, got_dtype = self.info(name)
        if got_dtype not in dtypes:
            raise TypeError(f"checkpoint tensor {name!r} ({what}) in {file}: expected dtype {_dtype_names(dtypes)}, "
                            f"got {got_dtype}")
        if got_shape != shape:
            raise ValueError(f"checkpoint tensor {name!r} ({what}) in {file}: expected shape {list(shape)}, "
                             f"got {list(got_shape)}")
        return self._handle(file).get_tensor(name)

    def get_dense(self, name: str, shape, what: str, fp8_block: tuple[int, int] | None = None) -> torch.Tensor:
        """A dense weight [N, K] as float32: BF16 / F16 / F32, or, when `fp8_block` (bn, bk) is
        given, FP8 e4m3 times its `<name>_scale_inv` (F32 [ceil(N/bn), ceil(K/bk)], one scale per
        bn x bk block, DeepSeek-V3's form)."""
        dtypes = DENSE + ((FP8,) if fp8_block else ())
        w = self.get(name, shape, dtypes, what)
        if w.dtype != torch.float8_e4m3fn:
            return w.float()
        (n, k), (bn, bk) = shape, fp8_block
        scale = self.get(name + "_scale_inv", (-(-n // bn), -(-k // bk)), ("F32",),
                         f"{what}: FP8 scales per {bn}x{bk} block")
        scale = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return w.float() * scale

    def close(self) -> None:
        self._handles.clear()


def _experts_from_checkpoint(ckpt: SafetensorsCheckpoint, prefix: str, spec: MoESpec, mode: str,
                             device) -> ExpertTensors:
    e, h, i = spec.num_experts, spec.hidden, spec.intermediate
    p = prefix + "experts."
    if spec.family == "gpt_oss":
        rows = _deinterleave(2 * i, device)
        gate_up_bias = ckpt.get(p + "gate_up_proj_bias", (e, 2 * i), DENSE, "L1 bias, gate/up interleaved")
        down_bias = ckpt.get(p + "down_proj_bias", (e, h), DENSE, "L2 bias")
        biases = (gate_up_bias.to(device)[:, rows].float(), down_bias.to(device).float())
        if p + "gate_up_proj_blocks" in ckpt or p + "gate_up_proj" not in ckpt:
            l1 = _mxfp4_from_checkpoint(ckpt, p + "gate_up_proj", e, 2 * i, h, "L1, gate/up rows interleaved")
            l2 = _mxfp4_from_checkpoint(ckpt, p + "down_proj", e, h, i, "L2")
            return ExpertTensors(mxfp4_experts(*(t.to(device) for t in l1), mode, rows),
                                 mxfp4_experts(*(t.to(device) for t in l2), mode), *biases)
        gate_up = ckpt.get(p + "gate_up_proj", (e, h, 2 * i), DENSE, "L1, x @ W, gate/up columns interleaved")
        down = ckpt.get(p + "down_proj", (e, i, h), DENSE, "L2, x @ W")
        return ExpertTensors(dense_experts(gate_up.transpose(1, 2), mode, device, rows),
                             dense_experts(down.transpose(1, 2), mode, device), *biases)
    if p + "gate_up_proj" in ckpt:
        gate_up = ckpt.get(p + "gate_up_proj", (e, 2 * i, h), DENSE, "L1, gate rows then up rows")
        down = ckpt.get(p + "down_proj", (e, h, i), DENSE, "L2")
        return ExpertTensors(dense_experts(gate_up, mode, device), dense_experts(down, mode, device))
    names = ("w1", "w3", "w2") if spec.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    fp8 = spec.fp8_block if spec.family == "deepseek_v3" else None
    l1 = ExpertStack(mode, e, 2 * i, h, device)
    l2 = ExpertStack(mode, e, h, i, device)
    for expert in range(e):
        q = f"{p}{expert}."
        gate = ckpt.get_dense(q + names[0] + ".weight", (i, h), f"expert {expert} gate projection", fp8)
        up = ckpt.get_dense(q + names[1] + ".weight", (i, h), f"expert {expert} up projection", fp8)
        l1.put(expert, torch.cat([gate, up]))
        l2.put(expert, ckpt.get_dense(q + names[2] + ".weight", (h, i), f"expert {expert} down projection", fp8))
    return ExpertTensors(l1.result(), l2.result())


def _mxfp4_from_checkpoint(ckpt, name: str, e: int, n: int, k: int, what: str):
    """gpt-oss's `<name>_blocks` uint8 [E, N, K/32, 16] and `<name>_scales` uint8 [E, N, K/32] ->
    (w_q uint8 [E, N, K/2], w_sf uint8 [E, N, K/32]): the same bytes, blocks flattened."""
    groups = k // SCALE_GROUP
    blocks = ckpt.get(name + "_blocks", (e, n, groups, MXFP4_BLOCK_BYTES), (U8,), f"{what}: MXFP4 codes")
    scales = ckpt.get(name + "_scales", (e, n, groups), (U8,), f"{what}: MXFP4 UE8M0 scales")
    return blocks.reshape(e, n, k // 2), scales


def load_moe_layer(checkpoint, prefix: str, config=None, *, mode: str = "fp8xfp4", device="cpu",
                   family: str | None = None, **layer_options) -> MegaMoELayer:
    """One MoE block of a safetensors checkpoint as a MegaMoELayer on `device`.

    checkpoint: a SafetensorsCheckpoint, or a path (file, directory or list, see there).
    prefix:     the block's tensor-name prefix, e.g. "model.layers.3.mlp." (see
                `checkpoint_prefix`).
    config:     a transformers config or config.json dict; default: the checkpoint directory's
                config.json.
    family:     default: the config's model_type.
    Router and shared-expert weights keep the checkpoint's dtype (DeepSeek's FP8 shared experts
    become BF16); experts follow `mode` (module docstring).
    """
    check_mode(mode)
    ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
    config = config if config is not None else ckpt.config
    if config is None:
        raise ValueError("config: required (the checkpoint has no config.json next to it)")
    spec = moe_spec(config, family)
    device = torch.device(device)
    e, h = spec.num_experts, spec.hidden
    if spec.family == "gpt_oss":
        weight = ckpt.get(prefix + "router.weight", (e, h), DENSE, "router").to(device)
        router = build_router(spec, weight, bias=ckpt.get(prefix + "router.bias", (e,), DENSE, "router bias"))
    else:
        weight = ckpt.get(prefix + "gate.weight", (e, h), DENSE, "router").to(device)
        correction = None
        if spec.router == "group_limited":
            correction = ckpt.get(prefix + "gate.e_score_correction_bias", (e,), DENSE, "router score correction bias")
        router = build_router(spec, weight, correction_bias=correction)
    shared = None
    if spec.shared_intermediate:
        s = spec.shared_intermediate
        q = prefix + "shared_experts."
        parts = {name: ckpt.get_dense(q + name + ".weight", shape, f"shared experts {name}", spec.fp8_block)
                 for name, shape in (("gate_proj", (s, h)), ("up_proj", (s, h)), ("down_proj", (h, s)))}
        dtype = ckpt.info(q + "gate_proj.weight")[1]
        shared = SwiGLUMLP(h, s, dtype=_TORCH_DTYPES[dtype] if dtype in DENSE else torch.bfloat16, device=device)
        for name, w in parts.items():
            getattr(shared, name).weight.copy_(w)
    tensors = _experts_from_checkpoint(ckpt, prefix, spec, mode, device)
    return _make_layer(spec, router, tensors, mode, shared, layer_options)
