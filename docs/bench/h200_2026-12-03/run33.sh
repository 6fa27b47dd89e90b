#!/usr/bin/env bash
# Device call 33 (one H200, session 14): GPU pressure iterations at EP = 1 on v17 from 223 to
# 999, eight copies of `megamoe stress` side by side on the one GPU (each single-threaded on the
# CPU, where most of an iteration's time goes), to reach issue 6's 1000 iterations.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
COPIES=8 START=223 ITERATIONS=777 timeout 580 tools/gpu_reliability.sh stress-ep1 $OUT/rel 2>&1 | tail -60
# (Next time: tar $OUT/rel into one file; the device tool returned only 8 of the 18 files.)
