#!/usr/bin/env bash
# Device call 34 (one H200, session 14): does the one-row FP16 MMA tile of run 18
# (tools/mma_row_stream.py) stream faster with K unrolled and each step's loads issued ahead?
# Checked against float64 first, then timed beside the layer's FMA loop, the runtime-loop MMA
# kernel and a read-only kernel of the same bytes.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 400 python3 tools/mma_row_stream.py --ahead 0,1,2 2>&1 | tee $OUT/mma_row_stream.log | tail -60
