#!/usr/bin/env bash
# The DiT-B/2 bf16 training step (32x32x4 latents, batch 256) under several settings, side by side in
# one process (bench_variants.py: interleaved rounds, medians, nominal MFU), then an op-by-op profile
# of one setting (bench_train.py --profile). About 4 minutes on an H100/H200.
#     bash experiments/benchmarks/gpu_variants.sh [OUT_DIR]
# VARIANTS (space-separated, each as bench_variants.py takes it) and PROFILE_ARGS (bench_train.py flags
# of the profiled setting) override the defaults below; TINY=1 rehearses with tiny sizes on a CPU.
source "$(dirname "$0")/gpu_env.sh" "$@"
if [ "${TINY:-0}" = 1 ]; then
  model="--preset debug --image_size 16 --batch_size 16"; timing="--rounds 2 --steps 2"; train="--peak_size 512"
else
  model="--preset B/2 --image_size 32 --batch_size 256"; timing="--rounds 7 --steps 10"; train=""
fi
common="$model --channels 4 --num_classes 1000 --precision bf16"
read -r -a variants <<< "${VARIANTS-residual_dtype=bfloat16}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
echo "== variants: ${variants[*]}"
timeout "${VARIANTS_TIMEOUT:-260}" python "$here/bench_variants.py" $common $timing --variants "${variants[@]}" 2>&1 \
  | tee "$out/variants.log" | grep -v '^{' | tail -n $((3 + ${#variants[@]}))
tail -n 1 "$out/variants.log" | grep '^{' > "$out/variants.json" || echo "variants: no result"
profile_args=${PROFILE_ARGS---residual_dtype bfloat16}
echo "== profile: $profile_args"
timeout "${PROFILE_TIMEOUT:-120}" python "$here/bench_train.py" $common $train $profile_args --steps 10 --repeats 3 \
  --profile 3 --profile_dir "${TMPDIR:-/tmp}/rfdit_trace" 2>&1 | tee "$out/profile.log" | grep -v '^{' | tail -n 30
tail -n 1 "$out/profile.log" | grep '^{' > "$out/profile.json" || echo "profile: no result"
