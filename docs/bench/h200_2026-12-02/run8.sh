#!/usr/bin/env bash
# Device call 8 (one H200, session 8): where the split launch (mix1) starts to beat FMA-only tiles
# (2-16 tokens), and at 64 tokens whether the FMA launch should go first (fmafirst: the same
# split with its two launches swapped).
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( timeout 120 $BD --tokens 2,4,8,16 --variants fma1,mix1
  timeout 120 $BD --shape gpt-oss-120b --tokens 2,4,8,16 --variants fma1,mix1 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_low.log
SWAP='import sys, megamoe.experts as e
t = e._tiling
def swapped(*a, **k):
    cfg, cols, launches = t(*a, **k)
    return cfg, cols, launches[::-1]
e._tiling = swapped
from megamoe.bench.breakdown import main
main(sys.argv[1:])'
( timeout 100 $BD --tokens 64 --variants mix1
  timeout 100 python3 -c "$SWAP" --tokens 64 --variants mix1
  timeout 100 $BD --shape gpt-oss-120b --tokens 64 --variants mix1
  timeout 100 python3 -c "$SWAP" --shape gpt-oss-120b --tokens 64 --variants mix1 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_order.log
