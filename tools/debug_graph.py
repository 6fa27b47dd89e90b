"""Debug: does a captured pre_dispatch + mega_moe replay reproduce the eager result?"""
import torch

import megamoe
from megamoe.testing import MODEL_SHAPES, make_problem, make_routing

shape = MODEL_SHAPES["qwen3-30b-a3b"]
p = make_problem(shape, 1, device="cuda", seed=0)
l1, l2 = megamoe.transform_weights(p.l1, p.l2)
buf = megamoe.MegaMoEBuffer(shape.num_experts, 256, shape.num_topk, shape.hidden, shape.intermediate)
g = torch.Generator(device="cuda").manual_seed(0)


def inputs(tokens):
    x = torch.randn(tokens, shape.hidden, device="cuda", generator=g).bfloat16()
    idx, w = make_routing(tokens, shape.num_experts, shape.num_topk, generator=g)
    return x, idx, w, torch.empty_like(x)


def call(x, idx, w, y):
    megamoe.pre_dispatch(x, idx, w, buf)
    megamoe.mega_moe(y, l1, l2, buf)


for tokens in (1, 7):
    x, idx, w, y = inputs(tokens)
    call(x, idx, w, y)
    torch.cuda.synchronize()
    eager = y.clone()
    count_eager = buf.expert_count.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(x, idx, w, y)
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    print(tokens, "replay == eager:", torch.equal(y, eager), "y nan:", torch.isnan(y).any().item(),
          "y norm", y.float().norm().item(), "eager norm", eager.float().norm().item(),
          "counts equal:", torch.equal(count_eager, buf.expert_count), "count sum", buf.expert_count.sum().item(),
          "idx row0", buf.topk_idx[0].tolist(), "offsets[-1]", buf.expert_offsets[-1].item(),
          "combine row0 norm", buf.combine[0].float().norm().item(), "meta", buf.meta[:2].tolist())
