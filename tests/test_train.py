import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from rfdit.data.digits import load_digits_split
from rfdit.data.pipeline import ArrayBatches
from rfdit.train import ema_decay_at


def digits_setup(key, *, steps_per_call=1, optim=None, batch_size=64):
    cfg = rfdit.DiTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                          mlp_ratio=2.0, num_classes=10)
    model_key, state_key = jr.split(key)
    optim = optim or rfdit.OptimConfig(lr=1e-3)
    optimizer = rfdit.make_optimizer(optim)
    state = rfdit.TrainState.create(rfdit.DiT(cfg, key=model_key), optimizer, key=state_key)
    step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=10, steps_per_call=steps_per_call,
                           max_traces=1)
    data = load_digits_split()
    batches = ArrayBatches(data["train_images"], data["train_labels"], batch_size, seed=0)
    return state, step, batches


def test_train_step_traces_once_and_loss_falls():
    k = 10  # steps scanned per call: 30 calls of one trace
    state, step, batches = digits_setup(jr.key(0), steps_per_call=k)
    losses = []
    for call in range(30):
        chunk = [batches.batch(call * k + i) for i in range(k)]
        images, labels = np.stack([c[0] for c in chunk]), np.stack([c[1] for c in chunk])
        state, metrics = step(state, jnp.asarray(images), jnp.asarray(labels))
        losses.append(metrics["loss"])
    losses = np.concatenate(jax.device_get(losses))
    assert int(state.step) == 300
    first, last = losses[:20].mean(), losses[-50:].mean()
    print(f"digits loss: first 20 steps {first:.3f}, last 50 steps {last:.3f}")
    assert last < 0.6 * first
    assert set(metrics) == {"loss", "grad_norm", "update_norm", "param_norm", "v_abs_mean", "v_pred_abs_mean"}


def test_train_step_scanned_chunk_equals_single_steps():
    single, step1, batches = digits_setup(jr.key(1))
    chunked, step4, _ = digits_setup(jr.key(1), steps_per_call=4)
    images = np.stack([batches.batch(i)[0] for i in range(4)])
    labels = np.stack([batches.batch(i)[1] for i in range(4)])
    for i in range(4):
        single, _ = step1(single, jnp.asarray(images[i]), jnp.asarray(labels[i]))
    chunked, metrics = step4(chunked, jnp.asarray(images), jnp.asarray(labels))
    assert metrics["loss"].shape == (4,)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(single.model, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(chunked.model, eqx.is_array))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_rejects_wrong_batch_rank():
    state, step, _ = digits_setup(jr.key(2), steps_per_call=2)
    with pytest.raises(ValueError, match=r"\(K, B, H, W, C\)"):
        step(state, jnp.zeros((4, 8, 8, 1)), jnp.zeros((4,), jnp.int32))


def test_compiled_step_is_the_step_and_a_state_of_another_structure_is_refused():
    state, step, batches = digits_setup(jr.key(3))
    images, labels = (jnp.asarray(x) for x in batches.batch(0))
    twin = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)  # donated below
    compiled = step.compile(state, images, labels)
    by_step, _ = step(state, images, labels)
    by_compiled, _ = compiled(twin, images, labels)
    assert jax.tree_util.tree_structure(by_compiled) == jax.tree_util.tree_structure(by_step)
    for a, b in zip(step.arrays(by_step), step.arrays(by_compiled)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jr.key_data(a), jr.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other, _, _ = digits_setup(jr.key(4), optim=rfdit.OptimConfig(lr=1e-3, grad_clip=1.0))  # a chained optimizer
    with pytest.raises(ValueError, match="state of another structure"):
        step(other, images, labels)


def test_ema_warmup_closed_form():
    decays = [float(ema_decay_at(jnp.asarray(n), 0.9999, True)) for n in (0, 1, 10, 10**6)]
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11)
    assert decays[2] == pytest.approx(11 / 20) and decays[3] == pytest.approx(0.9999)
    assert float(ema_decay_at(jnp.asarray(0), 0.9999, False)) == pytest.approx(0.9999)


def test_ema_tracks_the_model():
    optim = rfdit.OptimConfig(lr=1e-3, ema_decay=0.5, ema_warmup=False)
    state, step, batches = digits_setup(jr.key(3), optim=optim)
    images, labels = batches.batch(0)
    state, _ = step(state, jnp.asarray(images), jnp.asarray(labels))
    # EMA = 0.5·init + 0.5·new; the old state's buffers were donated, so rebuild the init.
    init = rfdit.DiT(state.model.config, key=jr.split(jr.key(3))[0])
    np.testing.assert_allclose(state.ema.t_fc1.weight, 0.5 * init.t_fc1.weight + 0.5 * state.model.t_fc1.weight,
                               rtol=1e-6, atol=1e-7)


def test_optimizer_options():
    cfg = rfdit.OptimConfig(lr=1e-3, warmup_steps=10, grad_clip=1.0, weight_decay=0.01)
    optimizer = rfdit.make_optimizer(cfg)
    params = {"w": jnp.ones(3)}
    with jax.numpy_dtype_promotion("standard"):  # optax's own code needs standard promotion
        state = optimizer.init(params)
        updates, _ = optimizer.update({"w": jnp.full(3, 100.0)}, state, params)
    assert float(jnp.abs(updates["w"]).max()) < 1e-3  # warm-up starts at lr 0 (only decay moves it)
    with pytest.raises(ValueError, match="beta2"):
        rfdit.OptimConfig(beta2=1.0)


def test_cpu_micro_batches_by_default_give_the_same_update():
    from rfdit.train import resolve_grad_accum

    from rfdit.benchmarking import CORE_CONFIGS

    def shape_only(name):
        fields = {k: v for k, v in CORE_CONFIGS[name].items() if k != "batch_size"}
        return eqx.filter_eval_shape(rfdit.DiT, rfdit.DiTConfig(**fields), key=jr.key(0))

    hidden256, debug = shape_only("hidden256"), shape_only("debug")
    single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    # 64 examples x 64 tokens x 1024 MLP features x 4 bytes = 16 MiB: four micro-batches of 4 MiB
    assert resolve_grad_accum(None, hidden256, 64) == (4 if single_cpu else 1)
    assert resolve_grad_accum(None, hidden256.config, 64) == (4 if single_cpu else 1)
    assert resolve_grad_accum(None, debug, 128) == 1  # 1.5 MiB: left whole
    assert resolve_grad_accum(3, debug, 128) == 3
    with pytest.raises(ValueError, match="grad_accum"):
        rfdit.TrainStep(rfdit.make_optimizer(rfdit.OptimConfig()), rfdit.FlowConfig(), rfdit.OptimConfig(),
                        num_classes=10, grad_accum=0)

    # 512 examples x 16 tokens x 192 (qkv) x 4 bytes = 6 MiB: two micro-batches by default
    cfg = rfdit.DiTConfig(image_size=8, in_channels=1, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                          mlp_ratio=2.0, num_classes=10)
    optim = rfdit.OptimConfig(lr=1e-3)
    optimizer = rfdit.make_optimizer(optim)
    model = rfdit.DiT(cfg, key=jr.key(3))
    data = load_digits_split()
    images, labels = jnp.asarray(data["train_images"][:512]), jnp.asarray(data["train_labels"][:512])
    after, metrics = {}, {}
    for grad_accum in (None, 1):
        fresh = jax.tree_util.tree_map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)  # the step donates
        state = rfdit.TrainState.create(fresh, optimizer, key=jr.key(4))
        step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=10, grad_accum=grad_accum)
        split = "tensor<2x256x8x8x1xf32>" in step.lower(state, images, labels).as_text()  # the batch in halves
        assert split == (grad_accum is None and single_cpu)
        state, metrics[grad_accum] = step(state, images, labels)
        leaves = jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_array))
        after[grad_accum] = jnp.concatenate([x.ravel() for x in leaves])
    # the same draws and gradients, summed in two halves: float32 rounding only. The loss and the
    # gradient's norm catch a wrong scale, which Adam's first (sign-like) update would hide.
    for name in ("loss", "grad_norm", "v_pred_abs_mean"):
        np.testing.assert_allclose(metrics[None][name], metrics[1][name], rtol=1e-5)
    rel = jnp.linalg.norm(after[None] - after[1]) / jnp.linalg.norm(after[1])
    assert rel < 1e-5, rel
