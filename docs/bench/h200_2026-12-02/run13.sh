#!/usr/bin/env bash
# Device call 13 (one H200, session 9): v16 -- split K over [k_split, rows, 64] tiles (as in run 11)
# with every loop address affine (no per-step clamp: the ranges run the same whole steps, the
# remainder after the loop), so loading a step ahead compiles as in 8a749f9 (107-113 registers);
# the heuristic's one-token config is split K in two (run 11). Against 8a749f9 in the same run,
# then the GPU tests and `megamoe bench` at the decode sizes with the baselines in the same run.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( timeout 80 tools/ab_trees.sh run $BD --tokens 1,2 --variants default
  timeout 80 tools/ab_trees.sh run $BD --shape gpt-oss-120b --tokens 1,2 --variants default ) 2>&1 | grep -v "^$" | tee $O/breakdown_ab.log
( timeout 100 $BD --tokens 1,2 --variants fma1s2,fma1k2,fma1k4,fma1s2k2
  timeout 100 $BD --shape gpt-oss-120b --tokens 1,2 --variants fma1s2,fma1k2,fma1k4,fma1s2k2 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_split.log
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels.py tests/test_layer.py 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 260 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 1,8,32,64 --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
tail -14 $O/bench.log
