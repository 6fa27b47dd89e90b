#!/usr/bin/env bash
set -u
export PYTHONPATH=src
O=$OUT
BD="python3 -m megamoe.bench.breakdown"
( echo "== HEAD + PDL on + MMA f16"; MEGAMOE_MMA=f16 timeout 130 $BD --tokens 1,8,64,4096 ) 2>&1 | tee $O/breakdown_v4_f16.log | grep -v "^$" | tail -5
( echo "== v10 (e4f3283)"; PYTHONPATH=build/trees/e4f3283/src timeout 100 $BD --shape gpt-oss-120b --tokens 1,8,64
  echo "== HEAD + PDL on"; timeout 100 $BD --shape gpt-oss-120b --tokens 1,8,64 ) 2>&1 | tee $O/breakdown_gptoss.log | grep -v "^$" | awk 'NR%4!=1 || /==/' 
for mma in fp8 f16; do
  echo "== stress 358 MMA=$mma"; MEGAMOE_MMA=$mma timeout 60 python3 -m megamoe.cli stress --start 358 --iterations 1 --profile gpu 2>&1 | tail -3
  echo "== stress 0-149 MMA=$mma"; MEGAMOE_MMA=$mma timeout 130 python3 -m megamoe.cli stress --start 0 --iterations 150 --profile gpu --json $O/stress_$mma.json 2>&1 | tail -6
done 2>&1 | tee $O/finding6.log
