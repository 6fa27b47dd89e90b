#!/usr/bin/env bash
# Device call 4 (one H200): v14 (FMA tiles up to one row an expert) -- `megamoe bench` at the decode sizes
# with the baselines in the same run, the GPU tests, and 150 stress iterations at EP = 1; first
# FMA tiles loading 1 or 3 steps ahead at 1 and 2 tokens.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( timeout 100 $BD --tokens 1,2 --variants fma1s2,fma1s4
  timeout 100 $BD --shape gpt-oss-120b --tokens 1,2 --variants fma1s2,fma1s4 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_ahead.log
timeout 240 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 1,8,32,64 --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -3 | tee $O/pytest_gpu.log
ITERATIONS=150 timeout 170 tools/gpu_reliability.sh stress-ep1 $O/rel > /dev/null 2>&1; echo "stress rc=$?"; tail -4 $O/rel/stress-ep1*.log
tail -12 $O/bench.log
