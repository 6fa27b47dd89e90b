#!/usr/bin/env bash
# Device call 8 (one H200): `megamoe bench` of v13 at the decode sizes (run 13).
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
timeout 150 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 1,8,64 --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
tail -9 $O/bench.log
