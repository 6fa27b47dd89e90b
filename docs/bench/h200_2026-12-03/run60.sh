# Session 18, run 60: exact_narrow_ab.py on both shapes (see its docstring).
export PYTHONPATH=$PWD/src
O=$OUT/r60; mkdir -p $O
t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
for shape in v4-flash gpt-oss-120b; do
  timeout -s KILL 270 python docs/bench/h200_2026-12-03/exact_narrow_ab.py $shape 256,1024,2048 > $O/ab_$shape.log 2>&1
  echo "== $shape ($(( $(date +%s) - t0 )) s)"; tail -n 16 $O/ab_$shape.log
done
tar czf $OUT/r60.tgz -C $OUT r60
