#!/usr/bin/env bash
# Device call 4 (one H200): v14 (FMA tiles up to one row an expert) -- `megamoe bench` at the decode sizes
# with the baselines in the same run, and 100 stress iterations at EP = 1; first
# FMA tiles loading 1 or 3 steps ahead at 1 and 2 tokens; last, iteration 358 (finding 6) replayed.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( timeout 100 $BD --tokens 1,2 --variants fma1s2,fma1s4
  timeout 100 $BD --shape gpt-oss-120b --tokens 1,2 --variants fma1s2,fma1s4 ) 2>&1 | grep -v "^$" | awk 'NR==1 || !/^shape/' | tee $O/breakdown_ahead.log
timeout 240 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 1,8,32,64 --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
ITERATIONS=100 timeout 120 tools/gpu_reliability.sh stress-ep1 $O/rel > /dev/null 2>&1; echo "stress rc=$?"; tail -4 $O/rel/stress-ep1*.log
timeout 60 python3 -m megamoe.cli stress --seed 0 --start 358 --iterations 1 --profile gpu 2>&1 | tail -3 | tee $O/replay358.log
tail -12 $O/bench.log
