"""megamoe: a fused, expert-parallel Mixture-of-Experts layer for LLM inference (FP8 x MXFP4).

    x_fp8, x_sf = megamoe.quantize_fp8(x)
    buf = megamoe.MegaMoEBuffer(num_experts, max_tokens_per_rank, num_topk, hidden, intermediate)
    l1, l2 = megamoe.transform_weights(l1_weights, l2_weights)
    megamoe.pre_dispatch(x, topk_idx, topk_weights, buf)
    megamoe.mega_moe(y, l1, l2, buf)

    layer = megamoe.MegaMoELayer(router, l1_weights, l2_weights)   # nn.Module: router + experts
    megamoe.patch_model(hf_model)                                   # swap a transformers model's MoE blocks
"""

from . import reference
from .buffer import MegaMoEBuffer, buffer_layout
# The backends are imported here, not first when a buffer is built: their Triton kernels become
# interpreted or compiled by TRITON_INTERPRET at decoration, which must happen at import.
from .comm import local as _local, nccl as _nccl, symm as _symm  # noqa: F401
from .formats import dequantize_fp8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4
from .kernels.pre_dispatch import pre_dispatch
from .layer import MegaMoELayer
from .moe import mega_moe
from .patch import patch_model
from .weights import ExpertWeights, transform_weights

__version__ = "0.1.0"

__all__ = [
    "ExpertWeights", "MegaMoEBuffer", "MegaMoELayer", "buffer_layout", "dequantize_fp8", "dequantize_mxfp4",
    "mega_moe", "patch_model", "pre_dispatch", "quantize_fp8", "quantize_mxfp4", "reference", "transform_weights",
]
