#!/usr/bin/env bash
# Device call 3 (one H200; no 4-GPU machine was lent): wider prefill tiles now that their
# promotion is cheaper, and the exact-products (mma="fp16") pressure test.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
s=$(date +%s)
timeout 170 python3 -m megamoe.bench.breakdown --tokens 4096 --variants default,m128,m64n128,m64s4 > $O/tiles_v4.log 2>&1
timeout 170 python3 -m megamoe.bench.breakdown --shape gpt-oss-120b --tokens 4096 --variants default,m128,m64n128,m64s4 > $O/tiles_gptoss.log 2>&1
echo "== tiles $(( $(date +%s) - s )) s"
grep -v "^$" $O/tiles_v4.log $O/tiles_gptoss.log | grep -v "shape "
s=$(date +%s)
timeout 200 python3 -m megamoe.cli stress --start 0 --iterations 200 --profile gpu --mma fp16 --json $O/stress_fp16_0.json > $O/stress_fp16_0.log 2>&1
echo "== stress fp16 rc=$? $(( $(date +%s) - s )) s"; tail -n 6 $O/stress_fp16_0.log
