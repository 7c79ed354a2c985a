"""Run in a subprocess with 8 simulated CPU devices; prints one JSON object of relative errors."""

import json
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import rfdit
from rfdit.checkpoint import Checkpointer
from rfdit.distributed import global_batch, make_mesh, shard_state

assert jax.device_count() == 8, jax.devices()
cfg = rfdit.DiTConfig(image_size=8, in_channels=1, patch_size=4, hidden_size=16, depth=1, num_heads=2,
                      mlp_ratio=1.0, num_classes=10)
optim = rfdit.OptimConfig(lr=1e-3)
optimizer = rfdit.make_optimizer(optim)
images = np.asarray(jr.normal(jr.key(5), (16, 8, 8, 1)))
labels = np.arange(16, dtype=np.int32) % 10


def fresh_state(dtype="float32"):
    with jax.numpy_dtype_promotion("standard"):
        return rfdit.TrainState.create(rfdit.DiT(cfg, key=jr.key(0), dtype=dtype), optimizer, key=jr.key(1))


def params(state):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_inexact_array))])


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


STEPS = {}


def run_steps(state, mesh, n=2, name="single"):
    # one compiled step per placement, reused across checks to keep compile time down
    step = STEPS.setdefault(name, rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=10))
    for _ in range(n):
        x = jnp.asarray(images) if mesh is None else global_batch(images, mesh)
        y = jnp.asarray(labels) if mesh is None else global_batch(labels, mesh)
        state, _ = step(state, x, y)
    return state


results = {}
single = run_steps(fresh_state(), None)
dp_mesh, fsdp_mesh = make_mesh(1), make_mesh(4)
dp = run_steps(shard_state(fresh_state(), dp_mesh), dp_mesh, name="dp")
fsdp_state = shard_state(fresh_state(), fsdp_mesh)
results["fsdp_sharded_leaves"] = sum(
    1 for x in jax.tree_util.tree_leaves(fsdp_state) if eqx.is_array(x) and len(x.sharding.device_set) == 8
    and not x.sharding.is_fully_replicated
)
fsdp_in_shardings = [x.sharding for x in jax.tree_util.tree_leaves(fsdp_state) if eqx.is_array(x)]
fsdp = run_steps(fsdp_state, fsdp_mesh, name="fsdp")
results["dp_vs_single"] = rel(params(dp), params(single))
results["fsdp_vs_single"] = rel(params(fsdp), params(single))
results["fsdp_still_sharded"] = all(
    x.sharding.is_equivalent_to(s, x.ndim)
    for x, s in zip([x for x in jax.tree_util.tree_leaves(fsdp) if eqx.is_array(x)], fsdp_in_shardings)
)

# bf16 products (on CPUs: float32 results, and the weight gradients' batch summed in one product)
bf16_single = run_steps(fresh_state("bfloat16"), None, name="bf16_single")
bf16_dp = run_steps(shard_state(fresh_state("bfloat16"), dp_mesh), dp_mesh, name="bf16_dp")
bf16_fsdp = run_steps(shard_state(fresh_state("bfloat16"), fsdp_mesh), fsdp_mesh, name="bf16_fsdp")
results["bf16_dp_vs_single"] = rel(params(bf16_dp), params(bf16_single))
results["bf16_fsdp_vs_single"] = rel(params(bf16_fsdp), params(bf16_single))
results["bf16_vs_float32"] = rel(params(bf16_single), params(single))

# grad accumulation equals the large batch
accum = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=10, grad_accum=4)
a, _ = accum(fresh_state(), jnp.asarray(images), jnp.asarray(labels))
b = run_steps(fresh_state(), None, n=1)
results["grad_accum_vs_big_batch"] = rel(params(a), params(b))

# sampling on the mesh
model = single.ema
noise = np.asarray(jr.normal(jr.key(9), (16, 8, 8, 1)))
ref, _ = rfdit.sample(model, jnp.asarray(noise), jnp.asarray(labels), cfg_scale=1.5, solver="heun", num_steps=8)
out, _ = rfdit.sample(shard_state(model, dp_mesh), global_batch(noise, dp_mesh), global_batch(labels, dp_mesh),
                      cfg_scale=1.5, solver="heun", num_steps=8)
results["sample_fixed_vs_single"] = rel(np.asarray(out), np.asarray(ref))
results["sample_is_sharded"] = len(out.sharding.device_set) == 8
ref, _ = rfdit.sample(model, jnp.asarray(noise), jnp.asarray(labels), solver="dopri5", rtol=1e-5, atol=1e-5)
out, _ = rfdit.sample(shard_state(model, dp_mesh), global_batch(noise, dp_mesh), global_batch(labels, dp_mesh),
                      solver="dopri5", rtol=1e-5, atol=1e-5)
results["sample_adaptive_max_abs"] = float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))

# a checkpoint saved on 8 devices (FSDP-sharded) restores on 1 and continues identically
with tempfile.TemporaryDirectory() as tmp:
    with Checkpointer(tmp) as ck:
        ck.save(3, fsdp, {"note": "8 devices"})
    with Checkpointer(tmp, read_only=True) as ck:
        restored, _ = ck.restore(jax.device_put(fresh_state(), jax.devices()[0]))
results["restored_on_one_device"] = all(
    len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(restored) if eqx.is_array(x)
)
results["restored_vs_saved"] = rel(params(restored), params(fsdp))
continued_1 = run_steps(restored, None, n=2)
continued_8 = run_steps(fsdp, fsdp_mesh, n=2, name="fsdp")
results["continue_1_vs_8"] = rel(params(continued_1), params(continued_8))
print(json.dumps(results))
sys.stdout.flush()
