# Session 18, run 62: v20 under the reliability checks (CUDA-graph soak whose 64- and 256-token
# batches take `_gemm_t`'s 64-token shape, pressure iterations at EP = 1 on fp16-l1), then the
# FP8 `_gemm` at 16-128 tokens a tile at the narrow sizes (exact_narrow_ab.py probe).
export PYTHONPATH=$PWD/src
O=$OUT/r62; mkdir -p $O
t0=$(date +%s)
el() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
timeout -s KILL 150 python -m megamoe.cli stress --graphs --replays 2000 --check-every 100 --batch-sizes 1,64,256,1024 \
  --experts 32 --mma fp16-l1 --json $O/graphs.json > $O/graphs.log 2>&1
el "graphs"; tail -n 4 $O/graphs.log
START=0 ITERATIONS=480 COPIES=8 MMA=fp16-l1 timeout -s KILL 160 tools/gpu_reliability.sh stress-ep1 $O/rel > /dev/null 2>&1
el "stress fp16-l1 0-479"; for f in $O/rel/stress-ep1*.log; do grep -E "failures:|max relative" $f | tail -n 2 | tr '\n' ' '; echo; done
for shape in v4-flash gpt-oss-120b; do
  timeout -s KILL 90 python docs/bench/h200_2026-12-03/exact_narrow_ab.py $shape 256,1024 probe > $O/probe_$shape.log 2>&1
  el "probe $shape"; tail -n 16 $O/probe_$shape.log | head -n 8
done
tar czf $OUT/r62.tgz -C $OUT r62
