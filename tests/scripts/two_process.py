"""One of two local processes in a jax.distributed job on a loopback coordinator.

usage: two_process.py PORT PROCESS_ID; prints one JSON object.
"""

import json
import sys

import equinox as eqx
import jax
import jax.random as jr
import numpy as np

import rfdit
from rfdit.data.digits import load_digits_split
from rfdit.data.pipeline import ArrayBatches
from rfdit.distributed import global_batch, initialize, make_mesh, shard_state

port, process_id = sys.argv[1], int(sys.argv[2])
assert initialize(f"localhost:{port}", 2, process_id)
assert jax.process_count() == 2 and jax.device_count() == 2

cfg = rfdit.DiTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                      mlp_ratio=1.0, num_classes=10)
optim = rfdit.OptimConfig(lr=1e-3)
optimizer = rfdit.make_optimizer(optim)
with jax.numpy_dtype_promotion("standard"):
    state = rfdit.TrainState.create(rfdit.DiT(cfg, key=jr.key(0)), optimizer, key=jr.key(1))
mesh = make_mesh()
state = shard_state(state, mesh)
step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=10)
data = load_digits_split()
batches = ArrayBatches(data["train_images"], data["train_labels"], 32, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
seen = []
for i in range(3):
    seen += batches.indices(i).tolist()
    images, labels = batches.batch(i)
    state, metrics = step(state, global_batch(images, mesh), global_batch(labels, mesh))
params = [np.asarray(x.addressable_data(0)) for x in jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_array))]
print(json.dumps({"process": jax.process_index(), "seen": seen,
                  "checksum": float(sum(np.sum(p.astype(np.float64) ** 2) for p in params)),
                  "loss": float(np.asarray(metrics["loss"].addressable_data(0)))}))
sys.stdout.flush()
jax.distributed.shutdown()
