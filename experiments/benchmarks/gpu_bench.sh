#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one prepared run (about 7 minutes on an H100/H200), each run its own process:
#   b2_bf16        DiT-B/2 on 32x32x4 latents, batch 256, bf16 (defaults); sampling throughput (32 and 250
#                  Euler steps with guidance 1.5) and an op-by-op profile of the step (in b2_bf16.log, trace in b2_bf16_trace/);
#   b2_bf16_*      the same with one change each, side by side: VARIANTS="scanned no_triton_gemm" by default, also
#                  cublaslt, remat_dots, xla_attention (XLA's attention instead of cuDNN's), bf16_stream
#                  (--residual_dtype bfloat16);
#   b2_f32         the same in float32 (true f32 matmuls: jax_default_matmul_precision=highest), blocks scanned;
#   xl2_bf16       DiT-XL/2 in bf16 at the largest batch whose compiled step fits (XLA's memory analysis).
#     bash experiments/benchmarks/gpu_bench.sh [OUT_DIR]   TINY=1: a CPU rehearsal with tiny sizes; BUDGET=seconds
#                                                          for all runs
# Runs stop early rather than overrun BUDGET (default 480 s); the table at the end says which ran.
source "$(dirname "$0")/gpu_env.sh" "$@"
budget=${BUDGET:-480}
if [ "${TINY:-0}" = 1 ]; then
  b2="--hidden_size 64 --depth 2 --num_heads 2 --patch_size 2 --image_size 8"; xl="$b2"; batch=16
  xl_batches="64 32 16"; steps="--steps 4 --repeats 2"; short="--steps 2 --repeats 2"; sample=8; peak="--peak_size 512"
else
  b2="--preset B/2 --image_size 32"; xl="--preset XL/2 --image_size 32"; batch=256
  xl_batches="128 64"; steps="--steps 10 --repeats 3"; short="--steps 4 --repeats 2"; sample=256; peak=""
fi
common="--channels 4 --num_classes 1000 $peak"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
names=()
run() {  # name, timeout, "ENV=value ..." (or ""), bench_train args...
  local name=$1 limit=$2 envs=$3; shift 3
  local left=$((budget - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (budget spent)"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  names+=("$name")
  echo "== $name ($envs): $*"
  env $envs timeout "$limit" python "$here/bench_train.py" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^{' | tail -n 3
  tail -n 1 "$out/$name.log" | grep '^{' > "$out/$name.json" || echo "$name: no result"
}
b2_args="$b2 $common --batch_size $batch --precision bf16"
run b2_bf16 200 "" $b2_args $steps --sample_batch $sample --sample_steps 32 250 --profile 3 --profile_dir "$out/b2_bf16_trace"
for v in ${VARIANTS-scanned no_triton_gemm}; do
  case $v in
    scanned) run b2_bf16_$v 60 "" $b2_args $steps --scan_unroll 1 ;;
    no_triton_gemm) run b2_bf16_$v 75 "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false" $b2_args $steps ;;
    cublaslt) run b2_bf16_$v 75 "XLA_FLAGS=--xla_gpu_enable_cublaslt=true" $b2_args $steps ;;
    remat_dots) run b2_bf16_$v 75 "" $b2_args $steps --remat dots ;;
    xla_attention) run b2_bf16_$v 75 "" $b2_args $steps --attention xla ;;
    bf16_stream) run b2_bf16_$v 75 "" $b2_args $steps --residual_dtype bfloat16 ;;
    *) echo "unknown variant $v" ;;
  esac
done
run xl2_bf16 130 "" $xl $common --precision bf16 --max_batch_from $xl_batches $short
# scanned: the unrolled float32 step did not compile and run within 110 s on an H100 (autotuning), and
# float32 is bound by its matmuls either way
run b2_f32 110 "" $b2 $common --batch_size $batch --precision float32 --scan_unroll 1 $short
python - "$out" ${names[@]+"${names[@]}"} <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':24} {'device':22} {'batch':>5} {'img/s':>8} {'ms/step':>8} {'MFU meas':>8} {'MFU nom':>7} "
      f"{'peak TF':>7} {'mem GiB':>7} {'compile s':>9} {'sample img/s by Euler steps':>12}")
for name in sys.argv[2:]:
    f = out / f"{name}.json"
    if not f.exists() or not f.read_text().strip():
        print(f"{name:24} (no result)"); continue
    r = json.loads(f.read_text())
    mem = r.get("peak_memory_bytes") or 0
    print(f"{name:24} {r['device'][:22]:22} {r['config']['batch_size']:>5} {r['img_per_s']:>8} {r['ms_per_step']:>8} "
          f"{r['mfu_measured']:>8} {str(r['mfu_nominal']):>7} {r['peak_tflops_measured']:>7} {mem / 2**30:>7.1f} "
          f"{r['compile_s']:>9} {str(r.get('sample_img_per_s_by_steps', r.get('sample_img_per_s', ''))):>12}")
    if "op_profile_ms_per_call" in r:
        print(f"{'':24} ops ms/call: " + ", ".join(f"{k} {v}" for k, v in r["op_profile_ms_per_call"].items()))
PY
