#!/usr/bin/env bash
# Device call 12 (one H200, session 9): run 11 again with the K ranges folded into the rows of the
# FMA tile ([k_split * rows, 64] bytes a step; k_split = 1 compiles as before: 113 / 91 registers,
# the same SASS counts as 8a749f9), against 8a749f9 in the same run.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "fma or every_tile" 2>&1 | tail -3 | tee $O/tests.log
BD="python3 -m megamoe.bench.breakdown"
( timeout 80 tools/ab_trees.sh run $BD --tokens 1,2 --variants default
  timeout 80 tools/ab_trees.sh run $BD --shape gpt-oss-120b --tokens 1,2 --variants default ) 2>&1 | grep -v "^$" | tee $O/breakdown_ab.log
( timeout 120 $BD --tokens 1,2 --variants fma1s2,fma1,fma1k2,fma1k4,fma1s2k2
  timeout 120 $BD --shape gpt-oss-120b --tokens 1,2 --variants fma1s2,fma1,fma1k2,fma1k4,fma1s2k2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_split.log
