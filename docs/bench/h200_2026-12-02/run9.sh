#!/usr/bin/env bash
# Device call 9 (one H200, session 8): fma_mix 2 as three launches (MMA tiles for experts with 3+ rows,
# two-row FMA tiles for those with 2, one-row for those with 1) against mix1 and m16 at 32-128 tokens.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "mixed" 2>&1 | tail -2 | tee $O/tests.log
BD="python3 -m megamoe.bench.breakdown"
( timeout 130 $BD --tokens 32,64,128 --variants m16,mix1,mix2
  timeout 130 $BD --shape gpt-oss-120b --tokens 32,64,128 --variants m16,mix1,mix2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_mix2.log
