#!/usr/bin/env bash
# Device call 18 (one H200, session 10): tools/mma_row_stream.py -- one-row tiles on the FP16
# tensor cores (Gluon mma_v2, operands loaded in the MMA's layout), checked against float64 and
# timed against the layer's FMA loop and a read-only kernel of the same bytes.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name --format=csv,noheader | head -1; date -u
timeout 400 python3 tools/mma_row_stream.py 2>&1 | tail -45 | tee $OUT/mma_row_stream.log
