"""Stress seed 0 iteration 358 on the GPU: per-token error of the Triton path and the torch path."""
import sys
import torch
from megamoe import stress
from megamoe.comm import local
from megamoe.reference import mega_moe_reference
from megamoe.testing import relative_error

it = int(sys.argv[1]) if len(sys.argv) > 1 else 358
case = stress.draw_case(0, it, stress.PROFILES["gpu"])
print(case.describe())
dev = torch.device("cuda")
rep = stress.StressReport()
s = stress._Stress(None, dev, 1e-2, rep)
geo = case.geometry
s._setup(geo)
x, idx, w = (t.to(dev) for t in stress.make_inputs(case)[0])
print("idx", idx.flatten().tolist(), "w", [round(v, 4) for v in w.flatten().tolist()])
ref = mega_moe_reference(x, idx, w, s.user_l1, s.user_l2, mode=geo.mode, activation_clamp=case.activation_clamp,
                         routed_scaling_factor=case.routed_scaling_factor, intermediate_sf=geo.intermediate_sf,
                         activation=case.activation)
y = s._call(case, x, idx, w, None)
local_use = local.use_triton
local.use_triton = lambda d: False
yt = s._call(case, x, idx, w, None)
local.use_triton = local_use
print(f"triton vs ref {relative_error(y, ref):.3e}  torch-path vs ref {relative_error(yt, ref):.3e}  "
      f"triton vs torch-path {relative_error(y, yt.double()):.3e}")
for t in range(x.shape[0]):
    n = ref[t].norm().item()
    print(f"token {t}: |ref| {n:.4e}  err triton {(y[t].double() - ref[t]).norm().item():.3e}  "
          f"err torch {(yt[t].double() - ref[t]).norm().item():.3e}")
