#!/usr/bin/env bash
# Device call 7 (one H200, session 8): fma_mix as two launches (one-row FMA tiles for the experts with at
# most fma_mix rows, then the MMA tiles for the others) against MMA-only and FMA-only tiles; the
# split's GPU tests first.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "mixed" 2>&1 | tail -3 | tee $O/tests.log
BD="python3 -m megamoe.bench.breakdown"
( timeout 170 $BD --tokens 32,64,128 --variants m16,fma1,mix1,mix2
  timeout 170 $BD --shape gpt-oss-120b --tokens 32,64,128 --variants m16,fma1,mix1,mix2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_split.log
