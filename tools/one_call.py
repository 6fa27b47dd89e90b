"""One warmed-up pre_dispatch + mega_moe call at a given shape, for profilers (ncu, nsys, sanitizer).

    python tools/one_call.py v4-flash 1
"""
import sys

import torch

import megamoe
from megamoe.testing import MODEL_SHAPES, make_problem

name = sys.argv[1] if len(sys.argv) > 1 else "v4-flash"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 1
shape = MODEL_SHAPES[name]
p = make_problem(shape, tokens, device="cuda", seed=0)
l1, l2 = megamoe.transform_weights(p.l1, p.l2)
buf = megamoe.MegaMoEBuffer(shape.num_experts, max(tokens, 1), shape.num_topk, shape.hidden, shape.intermediate)
y = torch.empty_like(p.x)
for _ in range(3):
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    megamoe.mega_moe(y, l1, l2, buf)
torch.cuda.synchronize()
print("done", y.float().norm().item())
