#!/usr/bin/env bash
# Device call 10 (one H200, session 8): v15 (split launches at 0.5-3 rows an expert, plan sized to its
# entries) -- `megamoe bench` at the decode sizes with the baselines in the same run; the GPU tests first.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -3 | tee $O/gpu_tests.log
timeout 300 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 1,8,32,64 --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
tail -14 $O/bench.log
