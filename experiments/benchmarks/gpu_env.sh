# The set-up shared by the prepared GPU scripts, sourced with their arguments: `out` (the results
# folder: the first argument, else $OUT, else bench_out), `here` (experiments/benchmarks/) and the environment.
set -uo pipefail
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/rfdit_jax_cache}  # not among the results
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}  # JAX's default leaves 25% unused
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
