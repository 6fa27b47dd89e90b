#!/usr/bin/env bash
# Device call 36 (one H200, session 14): run 35's cp.async rings (3 and 4 stages) with and
# without the activation rows and their scales in rings too ("+act": run 35 loaded them when
# used, on each step's critical path), beside run 34's best (K unrolled, loads two steps
# ahead), the layer's FMA loop and a read-only kernel, each checked against float64 first.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 400 python3 tools/mma_row_stream.py --ahead 2 --ring 3,4 2>&1 | tee $OUT/mma_row_stream.log | tail -60
