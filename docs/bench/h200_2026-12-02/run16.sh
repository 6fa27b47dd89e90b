#!/usr/bin/env bash
# Device call 16 (one H200, session 10): pressure iterations at EP = 1 with v16 (66ce496's src;
# v17's FP16 lanes were not kept), seed 0, --profile gpu, from 590 (350-589 ran in run 14).
set -u
export PYTHONPATH=src
git log -1 --format=%h 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader | head -1
START=${START:-590} ITERATIONS=${ITERATIONS:-400} timeout 575 tools/gpu_reliability.sh stress-ep1 $OUT/rel > /dev/null 2>&1; echo "stress rc=$?"; tail -5 $OUT/rel/stress-ep1*.log
