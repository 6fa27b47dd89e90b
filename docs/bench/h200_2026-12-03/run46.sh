# Session 15, call 46 (the warm machine after run 45): 160 EP = 1 pressure iterations on mma="fp16-l1".
export PYTHONPATH=$PWD/src; START=0 ITERATIONS=160 COPIES=8 MMA=fp16-l1 timeout -s KILL 75 tools/gpu_reliability.sh stress-ep1 $OUT/l1exact
