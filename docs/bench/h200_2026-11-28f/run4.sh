#!/usr/bin/env bash
# Device call 4 (one H200): prefill experiment on v12: the L1/L2 prefill tiles with the tokens
# as the MMA's M side and the decoded weights through shared memory (X_SWAP=1), and the same
# with the four MMAs of a step chained (X_SWAP=2: an upper bound, ignores three weight scales).
set -u
export PYTHONPATH=src
O=$OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee $O/gpu.txt; date -u | tee -a $O/gpu.txt
for sw in 0 1 2; do echo "== X_SWAP=$sw"; X_SWAP=$sw PYTHONPATH=build/abl/src timeout 100 python3 -m megamoe.bench.breakdown --tokens 4096 | grep -v "^$" | sort -u; done 2>&1 | tee $O/swap.log
