#!/usr/bin/env bash
# Device call 29 (one H200, session 13): v18, the Gluon prefill GEMM folding each weight row's
# groups against the row's largest exponent over all of K (a step promotes with one FMA an
# element; the row's scale once, after the loop) and copying without masks except in a last
# partial step. GPU tests, bitwise equality with v17 (4ebdf66) on a layer call, the layer's
# breakdown of v17 and v18 in the same call, v18 with two ring stages and 168 registers a
# thread (three programs an SM instead of two), then `megamoe bench` at the prefill sizes in
# what is left of the call's 10 minutes.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 120 python3 -m pytest -q -x -m gpu tests/test_prefill_wgmma.py 2>&1 | tail -4 | tee $OUT/tests_wgmma.log
SAVE='
import sys, torch, megamoe
from megamoe.testing import MODEL_SHAPES, make_problem
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
torch.save(out, sys.argv[1])'
PYTHONPATH=build/trees/4ebdf66/src timeout 60 python3 -c "$SAVE" $OUT/y_v17.pt
timeout 60 python3 -c "$SAVE" $OUT/y_v18.pt
python3 -c "
import torch
a, b = torch.load('$OUT/y_v17.pt'), torch.load('$OUT/y_v18.pt')
for k in a: print(k, 'bitwise equal v17/v18:', torch.equal(a[k], b[k]), 'max abs diff', (a[k].float() - b[k].float()).abs().max().item())
" 2>&1 | tee $OUT/bitwise.log
for shape in v4-flash gpt-oss-120b; do
  timeout 110 tools/ab_trees.sh run python3 -m megamoe.bench.breakdown --shape $shape --tokens 4096,8192 2>&1 | grep -v "^#" | tail -8 | tee -a $OUT/breakdown.log
done
for shape in v4-flash gpt-oss-120b; do
  echo "NUM_STAGES = 2, MAXNREG = 168" | tee -a $OUT/breakdown.log
  timeout 60 python3 -c "
from megamoe.kernels import prefill_wgmma as pw
pw.NUM_STAGES, pw.MAXNREG = 2, 168
from megamoe.bench import breakdown
breakdown.main(['--shape', '$shape', '--tokens', '4096,8192'])" 2>&1 | tail -2 | tee -a $OUT/breakdown.log
done
timeout $((585 - SECONDS)) python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 4096,8192 --sets 2 \
    --no-loop --out $OUT/bench 2>&1 | tail -14 | tee $OUT/bench.log
