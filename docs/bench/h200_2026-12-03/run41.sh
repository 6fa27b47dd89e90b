#!/usr/bin/env bash
# Device call 41 (one H200, session 14): the large-size cases (past 2^31 elements: x and y of
# 131072 x 16384, the combine rows of v4-flash at 65536 tokens) on v17, where both now run the
# Gluon prefill kernels (their last run, 2026-11-27 on an H100, predates them). The launches of
# the Gluon L1 are counted. First the new GPU test of the graph soak on prefill batches.
set -u
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $OUT/gpu.txt
timeout 100 python3 -m pytest -q -m gpu tests/test_stress.py -k "graph_soak_on_gpu" 2>&1 | tail -3 | tee $OUT/pytest_graph_soak.log
timeout 330 python3 -c "
import json
from megamoe.kernels import prefill_wgmma as pw
from megamoe import stress
n = {'l1': 0}
o1 = pw.launch_l1
def c1(*a, **k):
    n['l1'] += 1
    return o1(*a, **k)
pw.launch_l1 = c1
for case in stress.LARGE_CASES:
    n['l1'] = 0
    r = stress.run_large(case)
    r['gluon_l1_launches'] = n['l1']
    print(case.name, json.dumps(r), flush=True)
" 2>&1 | tail -6 | tee $OUT/large.log
