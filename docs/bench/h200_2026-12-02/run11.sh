#!/usr/bin/env bash
# Device call 11 (one H200, session 9): FMA tiles with K split over the warps of a program
# (GemmConfig.k_split) at 1-16 tokens; the reworked FMA loop at k_split = 1 against 8a749f9 (same
# run, tools/ab_trees.sh); L2's split with one-row FMA tiles only (mix21) at 32-64 tokens.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "fma or every_tile" 2>&1 | tail -3 | tee $O/tests.log
BD="python3 -m megamoe.bench.breakdown"
( timeout 80 tools/ab_trees.sh run $BD --tokens 1,2 --variants default
  timeout 80 tools/ab_trees.sh run $BD --shape gpt-oss-120b --tokens 1,2 --variants default ) 2>&1 | grep -v "^$" | tee $O/breakdown_ab.log
( timeout 120 $BD --tokens 1,2 --variants fma1s2,fma1,fma1k2,fma1k4,fma1s2k2
  timeout 120 $BD --shape gpt-oss-120b --tokens 1,2 --variants fma1s2,fma1,fma1k2,fma1k4,fma1s2k2
  timeout 90 $BD --tokens 4,8,16 --variants fma1,fma1k2
  timeout 90 $BD --shape gpt-oss-120b --tokens 4,8,16 --variants fma1,fma1k2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_split.log
( timeout 60 $BD --tokens 32,64 --variants mix2,mix21
  timeout 60 $BD --shape gpt-oss-120b --tokens 32,64 --variants mix2,mix21 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_mix21.log
