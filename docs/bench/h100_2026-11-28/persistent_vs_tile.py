"""Experiment: one-tile vs persistent, gathered vs indexed L1/L2 on the same EP=1 rows (GPU)."""
import sys
import torch
from megamoe.buffer import MegaMoEBuffer
from megamoe.experts import ExpertOptions, launch_l1, launch_l2, plan
from megamoe.kernels.pre_dispatch import pre_dispatch
from megamoe.testing import MODEL_SHAPES, make_problem, make_routing
from megamoe.weights import transform_weights
from megamoe.bench.timing import time_graph

from megamoe import experts
from megamoe.kernels.l2 import _l2_kernel
_orig = experts._launch
CAP = {"l2": None}
def _capped(kernel, grid, persistent, args, kwargs):
    if persistent and kernel is _l2_kernel and CAP["l2"]:
        kwargs = dict(kwargs, maxnreg=CAP["l2"])
    return _orig(kernel, grid, persistent, args, kwargs)
experts._launch = _capped
shape = MODEL_SHAPES["v4-flash"]
dev = torch.device("cuda")
problem = make_problem(shape, 1, device=dev, seed=0)
l1, l2 = transform_weights(problem.l1, problem.l2)
tokens_list = [int(t) for t in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 8, 64]
buf = MegaMoEBuffer(shape.num_experts, max(tokens_list), shape.num_topk, shape.hidden, shape.intermediate)
opts = ExpertOptions()
K = shape.num_topk
g = torch.Generator(device=dev).manual_seed(7)
print(f"{'T':>5} {'variant':<12} {'l1 us':>8} {'l2 us':>8}", flush=True)
for T in tokens_list:
    sets = []
    for _ in range(4):
        x = torch.randn(T, shape.hidden, generator=g, device=dev).bfloat16()
        idx, w = make_routing(T, shape.num_experts, K, generator=g)
        pre_dispatch(x, idx, w, buf)
        n = T * K
        plan(buf.topk_idx.view(-1), n, buf, None)
        srt = buf.sorted_rows[:n].long()
        gath = (buf.x[srt // K].clone(), buf.x_scales[srt // K].clone(), buf.topk_weights.view(-1)[srt].clone())
        sets.append((x, idx, w, gath))
    n = T * K

    def pre(s):
        x, idx, w, _ = s
        pre_dispatch(x, idx, w, buf)
        plan(buf.topk_idx.view(-1), n, buf, None)

    def l1v(s, persistent, gathered):
        if gathered:
            a, sf, rw = s[3]
            launch_l1(buf, n, 1, a, sf, rw, l1, opts, gathered=True, persistent=persistent)
        else:
            launch_l1(buf, n, K, buf.x, buf.x_scales, buf.topk_weights.view(-1), l1, opts, persistent=persistent)

    def l2v(s, persistent, gathered):
        rw = s[3][2] if gathered else buf.topk_weights.view(-1)
        launch_l2(buf, n, rw, buf.combine, l2, gathered=gathered, persistent=persistent)

    base = time_graph([lambda s=s: pre(s) for s in sets])
    for name, p, gth, cap in [("tile", False, False, None), ("persistent", True, False, None),
                              ("pers+cap160", True, False, 160), ("pers+cap128", True, False, 128),
                              ("pers+gath", True, True, None)]:
        CAP["l2"] = cap
        t1 = time_graph([lambda s=s: (pre(s), l1v(s, p, gth)) for s in sets])
        t2 = time_graph([lambda s=s: (pre(s), l1v(s, p, gth), l2v(s, p, gth)) for s in sets])
        print(f"{T:>5} {name:<12} {t1 - base:>8.1f} {t2 - t1:>8.1f}", flush=True)

for key, n in experts._resident_cache.items():
    print(key[0], dict(key[2]).get("maxnreg"), dict(key[2]).get("GATHERED"), "resident programs:", n)
