#!/usr/bin/env bash
# DiT-B/2 bf16 at batch 256 with XLA's attention, cuDNN's fused attention, and (VARIANTS="auto unroll")
# the 12 blocks unrolled instead of scanned, side by side.
#   bash experiments/gpu_attention_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache_gpu JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
here=$(cd "$(dirname "$0")" && pwd)
args="--preset B/2 --image_size 32 --channels 4 --num_classes 1000 --batch_size 256 --precision bf16 --steps 10 --repeats 3"
for impl in ${VARIANTS:-xla auto}; do
  unset RFDIT_ATTENTION
  extra=""
  case $impl in xla) export RFDIT_ATTENTION=xla;; unroll) extra="--scan_unroll 12";; esac
  timeout 150 python "$here/bench_train.py" $args $extra 2>&1 | tee "$out/b2_bf16_$impl.log" | grep -v '^{' | tail -n 3
  tail -n 1 "$out/b2_bf16_$impl.log" | python -c "import json,sys; r=json.loads(sys.stdin.read()); print('$impl', r['img_per_s'], 'img/s', r['ms_per_step'], 'ms', 'mfu', r['mfu_measured'], r['mfu_nominal'], 'mem GiB', round(r['peak_memory_bytes']/2**30,1))"
done
