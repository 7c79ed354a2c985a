#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one prepared run (about 6 minutes on an H100/H200):
#   DiT-B/2 on 32x32x4 latents, batch 256, bf16 (+ sampling throughput: 32 Euler steps with guidance,
#     and an op-by-op profile of the step in b2_bf16.log, its trace in b2_bf16_trace/);
#   the same in float32 (true f32 matmuls: jax_default_matmul_precision=highest);
#   DiT-XL/2 in bf16 at the largest batch whose compiled step fits (XLA memory analysis).
#     bash experiments/gpu_bench.sh [OUT_DIR]          TINY=1 for a CPU rehearsal with tiny sizes
set -uo pipefail
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$out/../.jax_cache_gpu" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
here=$(cd "$(dirname "$0")" && pwd)
if [ "${TINY:-0}" = 1 ]; then
  b2="--hidden_size 64 --depth 2 --num_heads 2 --patch_size 2 --image_size 8"; xl="$b2"; batch=16
  xl_batches="64 32 16"; steps="--steps 4 --repeats 2"; sample=8; peak="--peak_size 512"
else
  b2="--preset B/2 --image_size 32"; xl="--preset XL/2 --image_size 32"; batch=256
  xl_batches="256 128 64"; steps="--steps 20 --repeats 3"; sample=256; peak=""
fi
common="--channels 4 --num_classes 1000 $peak"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" python "$here/bench_train.py" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^{' | tail -n 5
  tail -n 1 "$out/$name.log" | grep '^{' > "$out/$name.json" || echo "$name: no result"
}
run b2_bf16 200 $b2 $common --batch_size $batch --precision bf16 $steps --sample_batch $sample \
  --profile 5 --profile_dir "$out/b2_bf16_trace"
run b2_f32 110 $b2 $common --batch_size $batch --precision float32 --steps 5 --repeats 2
run xl2_bf16 190 $xl $common --precision bf16 --max_batch_from $xl_batches --steps 5 --repeats 2
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':10} {'device':24} {'batch':>5} {'img/s':>9} {'ms/step':>9} {'MFU meas':>8} {'MFU nom':>8} {'peak TF':>8} {'mem GiB':>8} {'sample img/s':>12}")
for name in ["b2_bf16", "b2_f32", "xl2_bf16"]:
    f = out / f"{name}.json"
    if not f.exists() or not f.read_text().strip():
        print(f"{name:10} (no result)"); continue
    r = json.loads(f.read_text())
    mem = r.get("peak_memory_bytes") or 0
    print(f"{name:10} {r['device'][:24]:24} {r['config']['batch_size']:>5} {r['img_per_s']:>9} {r['ms_per_step']:>9} "
          f"{r['mfu_measured']:>8} {str(r['mfu_nominal']):>8} {r['peak_tflops_measured']:>8} {mem / 2**30:>8.1f} "
          f"{str(r.get('sample_img_per_s', '')):>12}")
PY
