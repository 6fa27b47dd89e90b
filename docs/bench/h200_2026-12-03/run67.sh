# Session 19, run 67: v22 with mma="fp16-l1" the default: `megamoe bench` at the README's sizes
# (the default's column "ours", FP8 MMAs in "fp8mma", the baselines in the same run); a graph soak
# whose 8-token batch is a split GEMM (2 rows an expert: the Gluon exact `_gemm` for the experts
# with three rows or more); memcheck and racecheck on the split GEMMs' GPU tests.
export PYTHONPATH=$PWD/src
O=$OUT/r67; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
timeout -s KILL 330 python -m megamoe.cli bench --shapes v4-flash,gpt-oss-120b --tokens 1,8,64,4096,8192 --sets 2 \
  --no-loop --out $O/bench > $O/bench.log 2>&1
el bench; tail -n 14 $O/bench.log
timeout -s KILL 60 python -m megamoe.cli stress --graphs --replays 2000 --check-every 100 --batch-sizes 1,8,16,40 \
  --experts 32 > $O/graphs.log 2>&1
el graphs; tail -n 1 $O/graphs.log
# The sanitizers on the GPU tests of the split GEMMs (mma="fp16": both GEMMs' MMA launches on the
# Gluon exact `_gemm` with rows_above 1 and 2, the rest on FMA tiles).
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
for tool in memcheck racecheck; do
  flags=$([ $tool = racecheck ] && echo "--racecheck-report all")
  PYTORCH_NO_CUDA_MEMORY_CACHING=$([ $tool = memcheck ] && echo 1 || echo 0) timeout -s KILL 80 $SAN --tool $tool \
    $flags --error-exitcode 99 --print-limit 50 python -m pytest -q tests/test_kernels.py \
    -k "mixed_tiles" > $O/$tool.log 2>&1; echo "$tool rc=$?"
  el $tool; grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" $O/$tool.log | tail -n 3
done
tar czf $OUT/r67.tgz -C $OUT r67
