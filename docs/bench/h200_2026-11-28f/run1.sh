#!/usr/bin/env bash
# Device call 1 (one H200): prefill ablations (what per-128 promotion and a free decode could
# gain at most), the gpt-oss one-token PDL question, then the full v11 benchmark.
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $O/gpu.txt
date -u | tee -a $O/gpu.txt
BD="python3 -m megamoe.bench.breakdown"
( for a in 0 1 2 3 4; do echo "== X_ABLATE=$a"; X_ABLATE=$a PYTHONPATH=build/abl/src timeout 70 $BD --tokens 512,4096 | grep -v "^$"; done ) 2>&1 | tee $O/ablate.log
( for r in 1 2; do for pdl in 0 1; do echo "== gpt-oss MEGAMOE_PDL=$pdl ($r)"; MEGAMOE_PDL=$pdl timeout 40 $BD --shape gpt-oss-120b --tokens 1,8 | grep -v "^$"; done; done ) 2>&1 | tee $O/gptoss_pdl.log
timeout 330 python3 -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --sets 2 --no-loop --out $O/bench > $O/bench.log 2>&1; echo "bench rc=$?"
tail -30 $O/bench.log
