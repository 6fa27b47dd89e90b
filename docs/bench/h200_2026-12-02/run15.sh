#!/usr/bin/env bash
# Device call 15 (one H200, session 10): v17 -- FMA tiles of the default mma add each group's
# products in FP16 lanes (f16x2 FMAs, `expert_mma._half_sums`): sm_90a K loop 309 -> 191-195 SASS
# a step. Correctness first (the order test bit for bit, the FMA tile tests, finding 6's EP = 1
# case), then against 66ce496 in the same run (tools/ab_trees.sh), then the tile variants at 32
# and 64 tokens (FMA tiles only against the split launches).
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "half_sums or fma_tiles" 2>&1 | tail -3 | tee $O/fma_tests.log
timeout 40 python3 -c "
from megamoe.stress import run_stress
for mma in ('fp8', 'fp16'):
    r = run_stress(1, start=358, profile='gpu', mma=mma)
    print('mma', mma, 'failures', r.num_failures, 'max error', r.max_relative_error)
" 2>&1 | tail -3 | tee $O/finding6.log
BD="python3 -m megamoe.bench.breakdown"
( timeout 120 tools/ab_trees.sh run $BD --tokens 1,8,32,64 --variants default
  timeout 120 tools/ab_trees.sh run $BD --shape gpt-oss-120b --tokens 1,8,32,64 --variants default ) 2>&1 | grep -v "^$" | tee $O/breakdown_ab.log
( timeout 110 $BD --tokens 2,16,32,64 --variants default,fma1,fma2,mix2
  timeout 110 $BD --shape gpt-oss-120b --tokens 2,16,32,64 --variants default,fma1,fma2,mix2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_variants.log
