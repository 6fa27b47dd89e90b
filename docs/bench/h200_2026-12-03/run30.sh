#!/usr/bin/env bash
# Device call 30 (one H200, session 13): v18 with the activation rows past a tile masked again
# (run 29's version read them, clamped to a real row: slower, most at gpt-oss 4096 where many
# tiles are half empty) and the column mask kept to a last partial step. GPU tests; v17
# (4ebdf66) and v18 side by side: bitwise equality of a layer call and the breakdown, full
# output; then `megamoe bench` at the prefill sizes in what is left of the call.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q -x -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -3 | tee $OUT/tests_wgmma.log
SAVE='
import sys, torch, megamoe
from megamoe.testing import MODEL_SHAPES, make_problem
tag = "v17" if "trees" in megamoe.__file__ else "v18"
out = {}
for name in ("v4-flash", "gpt-oss-120b"):
    shape = MODEL_SHAPES[name]
    p = make_problem(shape, 2048, device="cuda", masked_ratio=0.1, seed=11, num_experts=32)
    buf = megamoe.MegaMoEBuffer(32, 2048, shape.num_topk, shape.hidden, shape.intermediate)
    l1, l2 = megamoe.transform_weights(p.l1, p.l2)
    megamoe.pre_dispatch(p.x, p.topk_idx, p.topk_weights, buf)
    y = torch.empty_like(p.x)
    megamoe.mega_moe(y, l1, l2, buf)
    out[name] = y.cpu()
print(tag, megamoe.__file__)
torch.save(out, f"/tmp/y_{tag}.pt")'
timeout 120 tools/ab_trees.sh run python3 -c "$SAVE" 2>&1 | tee $OUT/bitwise.log
python3 -c "
import torch
a, b = torch.load('/tmp/y_v17.pt'), torch.load('/tmp/y_v18.pt')
for k in a: print(k, 'bitwise equal v17/v18:', torch.equal(a[k], b[k]), 'max abs diff', (a[k].float() - b[k].float()).abs().max().item())
" 2>&1 | tee -a $OUT/bitwise.log
for shape in v4-flash gpt-oss-120b; do
  timeout 120 tools/ab_trees.sh run python3 -m megamoe.bench.breakdown --shape $shape --tokens 4096,8192 2>&1 \
    | grep -v "^#" | tee -a $OUT/breakdown.log
done
timeout $((580 - SECONDS)) python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 4096,8192 --sets 2 \
    --no-loop --out $OUT/bench 2>&1 | tail -7 | tee $OUT/bench.log
