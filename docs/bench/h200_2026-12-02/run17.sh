#!/usr/bin/env bash
# Device call 17 (one H200, session 10): the rest of 1000 pressure iterations at EP = 1 with v16:
# 990-999, then 0-349 (which ran with v14 before), seed 0, --profile gpu.
set -u
export PYTHONPATH=src
START=990 ITERATIONS=10 timeout 60 tools/gpu_reliability.sh stress-ep1 $OUT/rel_990 > /dev/null 2>&1; echo "stress 990 rc=$?"; tail -5 $OUT/rel_990/stress-ep1*.log
START=0 ITERATIONS=350 timeout 520 tools/gpu_reliability.sh stress-ep1 $OUT/rel_0 > /dev/null 2>&1; echo "stress 0 rc=$?"; tail -5 $OUT/rel_0/stress-ep1*.log
