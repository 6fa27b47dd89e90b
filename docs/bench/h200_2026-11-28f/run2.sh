#!/usr/bin/env bash
# Device call 2 (one H200): v12 (activation rows rebased per 128 of K for the prefill tiles)
# against v11 (d39a1a4, carried by tools/ab_trees.sh) in one run; GPU tests; bench at prefill.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $O/gpu.txt
date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -4 | tee $O/pytest_gpu.log
( tools/ab_trees.sh run timeout 100 $BD --tokens 2048,4096,8192
  tools/ab_trees.sh run timeout 100 $BD --shape gpt-oss-120b --tokens 2048,4096,8192 ) 2>&1 | grep -v "^$" | tee $O/breakdown_v11_v12.log
timeout 200 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 4096,8192 --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
tail -8 $O/bench.log
