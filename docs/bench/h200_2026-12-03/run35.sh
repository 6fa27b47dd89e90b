#!/usr/bin/env bash
# Device call 35 (one H200, session 14): the one-row FP16 MMA tile with its weight stream
# (packed bytes and scales) copied into shared-memory rings by cp.async, 3, 4 or 6 stages
# (tools/mma_row_stream.py `_mma_ring_kernel`, the weights only), beside run 34's best (K unrolled, loads two
# steps ahead), the layer's FMA loop and a read-only kernel, each checked against float64 first.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 400 python3 tools/mma_row_stream.py --ahead 2 --ring 3,4,6 2>&1 | tee $OUT/mma_row_stream.log | tail -60
