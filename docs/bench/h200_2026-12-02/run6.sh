#!/usr/bin/env bash
# Device call 6 (one H200, session 8): MMA decode tiles with FMA tiles mixed in (GemmConfig.fma_mix)
# against MMA-only and FMA-only tiles at 16-128 tokens; the one-program plan sized to its entries
# (working tree against a3cf955, same run) at 1 and 2 tokens; the mixed-tile GPU tests first.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "mixed" 2>&1 | tail -3 | tee $O/tests.log
BD="python3 -m megamoe.bench.breakdown"
( timeout 170 $BD --tokens 16,32,64,128 --variants m16,fma1,mix1,mix2
  timeout 170 $BD --shape gpt-oss-120b --tokens 16,32,64,128 --variants m16,fma1,mix1,mix2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_mix.log
( timeout 60 tools/ab_trees.sh run $BD --tokens 1,2 --variants default
  timeout 60 tools/ab_trees.sh run $BD --shape gpt-oss-120b --tokens 1,2 --variants default ) 2>&1 | grep -v "^$" | tee $O/breakdown_plan.log
