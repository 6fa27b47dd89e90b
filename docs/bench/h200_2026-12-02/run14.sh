#!/usr/bin/env bash
# Device call 14 (one H200, session 9): pressure iterations at EP = 1 with v16 (seed 0, --profile
# gpu, from 350: iterations 0-349 ran with v14, docs/RELIABILITY.md).
set -u
export PYTHONPATH=src
START=350 ITERATIONS=${ITERATIONS:-300} timeout 560 tools/gpu_reliability.sh stress-ep1 $OUT/rel > /dev/null 2>&1; echo "stress rc=$?"; tail -5 $OUT/rel/stress-ep1*.log
