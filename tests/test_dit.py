import functools as ft
import itertools
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from rfdit.config import PRESETS
from rfdit.nn.dit import (
    Linear,
    resolve_remat,
    resolve_scan_unroll,
    sincos_pos_embed,
    timestep_features,
    with_bf16_backward,
    with_compute_dtype,
)


def closed_form_params(h, d, p, c, k, o, r):
    # The DiT paper's parameter count, written independently of DiTConfig.num_params.
    return ((c * p * p * h + h) + (256 * h + h + h * h + h) + (k + 1) * h
            + d * (3 * h * h + 3 * h + h * h + h + 2 * r * h * h + r * h + h + 6 * h * h + 6 * h)
            + (2 * h * h + 2 * h + h * p * p * o + p * p * o))


@pytest.mark.parametrize("name", list(PRESETS))
def test_dit_preset_shapes_and_param_count(name):
    cfg = rfdit.DiTConfig.preset(name, image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    model = eqx.filter_eval_shape(rfdit.DiT, cfg, key=jr.key(0))
    out = eqx.filter_eval_shape(
        model, jax.ShapeDtypeStruct((32, 32, 4), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    assert out.shape == (32, 32, 8)
    p = PRESETS[name]
    expected = closed_form_params(p["hidden_size"], p["depth"], p["patch_size"], 4, 1000, 8, int(p["mlp_ratio"]))
    assert rfdit.count_params(model) == expected == cfg.num_params()


def test_dit_param_count_published_values():
    b2 = rfdit.DiTConfig.preset("B/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    xl2 = rfdit.DiTConfig.preset("XL/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert b2.num_params() == 130_315_808
    assert xl2.num_params() == 674_834_720


def test_dit_gflops_match_published():
    # DiT's Table 4 reports multiply-adds of the forward pass at 256x256 (32x32x4 latents).
    for name, gmacs in [("XL/2", 118.6), ("B/2", 23.01), ("S/8", 0.36)]:
        cfg = rfdit.DiTConfig.preset(name, image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        assert cfg.forward_flops() / 2 / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_dit_override_beats_preset():
    cfg = rfdit.DiTConfig.preset("big", patch_size=8, image_size=32)
    assert cfg.patch_size == 8 and cfg.hidden_size == 768


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30, patch_size=4), "patch_size \\(=4\\) must divide image_size \\(=30\\)"),
        (dict(hidden_size=100, num_heads=3), "num_heads \\(=3\\) must divide hidden_size \\(=100\\)"),
        (dict(depth=0), "depth"),
        (dict(time_convention="sit"), "time_convention"),
    ],
)
def test_dit_config_invalid_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rfdit.DiTConfig(**kwargs)


def test_dit_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="valid presets"):
        rfdit.DiTConfig.preset("huge")


def test_dit_config_json_round_trip():
    cfg = rfdit.DiTConfig.preset("S/4", image_size=16, learn_sigma=True)
    assert rfdit.DiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        rfdit.DiTConfig.from_dict({**cfg.to_dict(), "width": 3})


def small_model(key, **overrides):
    cfg = rfdit.DiTConfig(**{**dict(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2,
                                    num_heads=4, mlp_ratio=2.0, num_classes=10), **overrides})
    return rfdit.DiT(cfg, key=key)


def test_dit_zero_output_at_init(getkey):
    model = small_model(getkey())
    out = model(jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.3), jnp.asarray(4))
    assert out.shape == (8, 8, 3)
    assert jnp.all(out == 0)


def perturbed(model, key):
    # Nonzero weights everywhere, so the forward pass exercises every path.
    leaves, treedef = jax.tree_util.tree_flatten(model)
    keys = jr.split(key, len(leaves))
    leaves = [x + 0.05 * jr.normal(k, x.shape) if eqx.is_inexact_array(x) else x for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_dit_wrong_input_shape_raises(getkey):
    model = small_model(getkey())
    with pytest.raises(ValueError, match="expects one example of shape \\(8, 8, 3\\)"):
        model(jnp.zeros((4, 4, 3)), jnp.asarray(0.3), jnp.asarray(1))
    with pytest.raises(TypeError, match=r"f32\[2,8,8,3\]"):  # jaxtyping + beartype: a batch needs vmap
        model(jnp.zeros((2, 8, 8, 3)), jnp.asarray(0.3), jnp.asarray(1))


def test_dit_wrong_dtype_caught_by_jaxtyping(getkey):
    model = small_model(getkey())
    with pytest.raises(Exception, match="(?i)type"):
        model(jnp.zeros((8, 8, 3), jnp.int32), jnp.asarray(0.3), jnp.asarray(1))


def test_dit_unpatchify_keeps_pixels_local(getkey):
    # Changing one input patch may change only the outputs through attention, but with
    # attention and MLP switched off the final linear maps each token to its own patch.
    model = perturbed(small_model(getkey()), getkey())
    model = eqx.tree_at(lambda m: m.blocks.modulation.weight, model, jnp.zeros_like(model.blocks.modulation.weight))
    model = eqx.tree_at(lambda m: m.blocks.modulation.bias, model, jnp.zeros_like(model.blocks.modulation.bias))
    x = jr.normal(getkey(), (8, 8, 3))
    forward = eqx.filter_jit(lambda m, x: m(x, jnp.asarray(0.5), jnp.asarray(2)))
    y0, y1 = forward(model, x), forward(model, x.at[2:4, 4:6].add(1.0))
    changed = np.argwhere(np.abs(np.asarray(y1 - y0)).sum(-1) > 0)
    assert changed.min(0).tolist() == [2, 4] and changed.max(0).tolist() == [3, 5]


def test_timestep_features_order_and_range():
    f = timestep_features(jnp.asarray(1000.0 * 0.25))
    i = np.arange(128)
    freqs = np.exp(-np.log(10000.0) * i / 128)
    np.testing.assert_allclose(f[:128], np.cos(250.0 * freqs), atol=1e-4)
    np.testing.assert_allclose(f[128:], np.sin(250.0 * freqs), atol=1e-4)


def test_sincos_pos_embed_closed_form():
    table = sincos_pos_embed(16, 4)
    assert table.shape == (16, 16)
    # token (h=1, w=2): first half encodes w, second half h
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    token = table[1 * 4 + 2]
    np.testing.assert_allclose(token[:4], np.sin(2 * omega), rtol=1e-6)
    np.testing.assert_allclose(token[4:8], np.cos(2 * omega), rtol=1e-6)
    np.testing.assert_allclose(token[8:12], np.sin(1 * omega), rtol=1e-6)


def test_dit_position_table_is_not_a_parameter(getkey):
    model = small_model(getkey())
    assert rfdit.count_params(model) == model.config.num_params()


def test_dit_t_conditioning_off_ignores_time(getkey):
    model = perturbed(small_model(getkey(), t_conditioning=False), getkey())
    x = jr.normal(getkey(), (8, 8, 3))
    assert jnp.array_equal(model(x, jnp.asarray(0.1), jnp.asarray(3)), model(x, jnp.asarray(0.9), jnp.asarray(3)))


def test_dit_bf16_compute_close_to_f32(getkey):
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.4), jnp.asarray(5)
    ref = model(x, t, y)
    out = with_compute_dtype(model, "bfloat16")(x, t, y)
    assert out.dtype == jnp.float32
    rel = jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)
    assert 0 < rel < 2e-2  # bf16 operands carry 8 mantissa bits: ~1e-3..1e-2 relative error


def _dot_eqns(jaxpr) -> list:
    """Every dot_general of a jaxpr, inner jaxprs (scan, remat, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _dot_eqns(inner)
    return found


def _dot_dtypes(jaxpr) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """(operand ranks, operand dtypes) of every dot_general in a jaxpr, inner jaxprs included."""
    return [(tuple(v.aval.ndim for v in e.invars), tuple(str(v.aval.dtype) for v in e.invars)) for e in _dot_eqns(jaxpr)]


def test_dit_bf16_backward_products_stay_bf16(getkey):
    # The backward pass's products take bf16 operands too, as the training step differentiates the model
    # (with_bf16_backward). Float32 cotangents made them float32: on an H100 those ran as TF32 and the
    # DiT-B/2 step took twice as long; on CPUs, at half the speed of bf16 operands (BENCHMARKS.md).
    model = with_bf16_backward(with_compute_dtype(perturbed(small_model(getkey()), getkey()), "bfloat16"))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, t, y = jr.normal(getkey(), (2, 8, 8, 3)), jr.uniform(getkey(), (2,)), jnp.arange(2)
    loss = lambda p: jnp.mean(jax.vmap(eqx.combine(p, static))(x, t, y) ** 2)
    dots = _dot_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    # the linear layers' products, forward and backward (operands of rank <= 3 under vmap); XLA's
    # attention (batched over examples and heads: rank >= 4) keeps its logits in float32 by design and
    # runs fused (cuDNN) where it matters
    linear = [dtypes for ranks, dtypes in dots if min(ranks) <= 3]
    assert len(linear) >= 3 * 5  # x@W, g@W, x^T g for the five linears of the scanned block, and more
    float32 = [dtypes for dtypes in linear if dtypes != ("bfloat16", "bfloat16")]
    # on CPUs the patch embedding's gradients alone are float32 (p²C inputs: next to no work), its
    # weight's formed as patches^T g so that XLA transposes the narrow patches, not the cotangent;
    # the input's gradient (the data's) is in the jaxpr, and XLA drops it
    assert float32 == ([("float32", "float32")] * 2 if jax.default_backend() == "cpu" else []), linear


def test_patch_embedding_bf16_backward_matches_float64(getkey):
    from rfdit.nn.dit import PatchEmbed

    embed = PatchEmbed(0.1 * jr.normal(getkey(), (48, 2, 2, 3)), 0.1 * jr.normal(getkey(), (48,)), 2, "bfloat16")
    x = jr.normal(getkey(), (6, 8, 8, 3))  # 6 examples of 16 patches of 2x2x3, under vmap
    g = jr.normal(getkey(), (6, 16, 48))

    def loss(e, x):
        return jnp.sum(jax.vmap(e)(x) * g)

    de, dx = jax.grad(loss, argnums=(0, 1))(with_bf16_backward(embed), x)
    # float64 on the bf16-rounded operands of the forward product; the gradients are formed in float32
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
    patches = r(x).reshape(6, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(6, 16, 12)
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(de.weight.reshape(48, 12), np.einsum("bno,bnk->ok", g64, patches), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(de.bias, g64.sum((0, 1)), rtol=1e-5, atol=1e-5)
    dpatches = g64 @ r(embed.weight.reshape(48, 12))
    np.testing.assert_allclose(dx, dpatches.reshape(6, 4, 4, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(6, 8, 8, 3),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jax.vmap(with_bf16_backward(embed))(x), jax.vmap(embed)(x))  # the same forward pass


def test_bf16_backward_rounds_the_cotangent_and_sums_the_batch_in_one_product(getkey):
    layer = Linear(0.1 * jr.normal(getkey(), (24, 40)), 0.1 * jr.normal(getkey(), (24,)), "bfloat16")
    flagged = with_bf16_backward(layer)
    x = jr.normal(getkey(), (16, 32, 40))  # (batch, tokens, in): the layer runs per example, under vmap
    g = jr.normal(getkey(), (16, 32, 24))  # the output's cotangent

    def loss(l, x):
        return jnp.sum(jax.vmap(l)(x) * g)

    dl, dx = jax.grad(loss, argnums=(0, 1))(flagged, x)
    # float64 references on the bf16-rounded operands: each product is exact in float32 (8-bit
    # mantissas), so only float32 accumulation over 40 or 512 terms remains (~1e-7 relative)
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(dx, r(g) @ r(layer.weight), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dl.weight, np.einsum("bto,bti->oi", r(g), r(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dl.bias, np.asarray(g, np.float64).sum((0, 1)), rtol=1e-5, atol=1e-5)
    # the weight's gradient is one (out, in) product over batch and tokens, not one per example
    dots = _dot_eqns(jax.make_jaxpr(jax.grad(loss))(flagged, x).jaxpr)
    assert len(dots) == 3 and all(e.params["dimension_numbers"][1] == ((), ()) for e in dots)  # no batch axes
    # a weight per example (layers stacked by vmap): each gets its own example's gradient
    weights = 0.1 * jr.normal(getkey(), (16, 24, 40))

    def stacked_loss(weights, x):
        per_example = lambda w, x: with_bf16_backward(Linear(w, layer.bias, "bfloat16"))(x)
        return jnp.sum(jax.vmap(per_example)(weights, x) * g)

    np.testing.assert_allclose(jax.grad(stacked_loss)(weights, x), np.einsum("bto,bti->boi", r(g), r(x)),
                               rtol=1e-5, atol=1e-5)
    # and a bias per example: each gets its own example's sum
    biases = 0.1 * jr.normal(getkey(), (16, 24))

    def stacked_bias_loss(biases, x):
        per_example = lambda b, x: with_bf16_backward(Linear(layer.weight, b, "bfloat16"))(x)
        return jnp.sum(jax.vmap(per_example)(biases, x) * g)

    np.testing.assert_allclose(jax.grad(stacked_bias_loss)(biases, x), np.asarray(g, np.float64).sum(1),
                               rtol=1e-5, atol=1e-5)
    # the same forward pass as the unflagged layer, whose forward-mode autodiff still works
    np.testing.assert_array_equal(jax.vmap(flagged)(x), jax.vmap(layer)(x))
    jax.linearize(jax.vmap(layer), x)
    # float32 layers are unchanged
    f32 = Linear(layer.weight, layer.bias)
    ours, plain = jax.grad(loss)(with_bf16_backward(f32), x), jax.grad(loss)(f32, x)
    assert jnp.array_equal(ours.weight, plain.weight) and jnp.array_equal(ours.bias, plain.bias)


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _attention_float64(q, k, v) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", weights / weights.sum(-1, keepdims=True), v)


def test_einsum_attention_matches_a_float64_reference_and_jax_attention(getkey):
    from rfdit.nn.dit import einsum_attention

    q, k, v = (3 * jr.normal(getkey(), (64, 4, 32)) for _ in range(3))
    # float32: a few roundings of 6e-8 each, through products of 32 terms and sums of 64
    assert _relative_error(einsum_attention(q, k, v), _attention_float64(q, k, v)) < 1e-6
    grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2))(q, k, v)
             for f in (einsum_attention, jax.nn.dot_product_attention)]
    for ours, theirs in zip(*grads):
        assert _relative_error(ours, theirs) < 1e-5
    # bf16 inputs, float32 logits and softmax: the weights and the output are rounded to bf16 (half an
    # ulp is 2e-3 relative); scaling q in bf16 before the product, not the float32 logits, gave 5e-3
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    ours = einsum_attention(q, k, v)
    assert ours.dtype == jnp.bfloat16
    assert _relative_error(ours, _attention_float64(q, k, v)) < 3e-3


def test_qkv_attention_on_packed_heads_equals_attention_on_split_heads(getkey):
    from rfdit.nn.dit import attention, qkv_attention

    qkv = (3 * jr.normal(getkey(), (8, 16, 3, 2, 32))).astype(jnp.bfloat16)  # 8 examples, packed as the qkv layer writes
    g = jr.normal(getkey(), (8, 16, 2, 32))
    for flag in (False, True):
        packed = lambda qkv, flag=flag: jnp.sum(
            jax.vmap(ft.partial(qkv_attention, implementation="einsum", bf16_backward=flag))(qkv).astype(jnp.float32) * g)
        split = lambda qkv, flag=flag: jnp.sum(jax.vmap(
            lambda a: attention(a[:, 0], a[:, 1], a[:, 2], "einsum", bf16_backward=flag))(qkv).astype(jnp.float32) * g)
        np.testing.assert_array_equal(packed(qkv), split(qkv))
        np.testing.assert_array_equal(jax.grad(packed)(qkv), jax.grad(split)(qkv))
    # an implementation other than the einsum goes through `attention` on the split heads
    xla = jax.vmap(ft.partial(qkv_attention, implementation="xla", bf16_backward=True))(qkv)
    np.testing.assert_array_equal(xla, jax.vmap(lambda a: attention(a[:, 0], a[:, 1], a[:, 2], "xla"))(qkv))


def test_bf16_attention_backward_takes_bf16_operands_and_stays_close(getkey):
    from rfdit.nn.dit import attention

    q, k, v = (3 * jr.normal(getkey(), (8, 64, 4, 32)) for _ in range(3))  # 8 examples under vmap
    g = jr.normal(getkey(), (8, 64, 4, 32))
    q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))

    def loss(q, k, v, flag):
        heads = jax.vmap(ft.partial(attention, implementation="einsum", bf16_backward=flag))(q, k, v)
        return jnp.sum(heads.astype(jnp.float32) * g)

    # reference: float32 autodiff on the same bf16-rounded heads
    exact = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q16, k16, v16)), False)
    flagged = jax.grad(loss, argnums=(0, 1, 2))(q16, k16, v16, True)
    plain = jax.grad(loss, argnums=(0, 1, 2))(q16, k16, v16, False)
    for ours, autodiff, ref in zip(flagged, plain, exact):
        assert ours.dtype == jnp.bfloat16
        # bf16 roundings of the cotangent, the weights and the logits' gradient (half an ulp: 2e-3 each):
        # 3-5e-3 here, against 3e-3 for plain autodiff in bf16, which keeps the logits' gradient float32
        assert _relative_error(ours, ref) < 1e-2 and _relative_error(autodiff, ref) < 1e-2
    if jax.default_backend() == "cpu":  # elsewhere the flag changes nothing
        flagged_grad = jax.grad(ft.partial(loss, flag=True), argnums=(0, 1, 2))
        dots = _dot_dtypes(jax.make_jaxpr(flagged_grad)(q16, k16, v16).jaxpr)
        assert len(dots) == 6 and all(dtypes == ("bfloat16", "bfloat16") for _, dtypes in dots), dots


def test_dit_attention_setting_chooses_the_implementation(getkey, monkeypatch):
    import rfdit.nn.dit as dit

    if jax.default_backend() == "cpu":
        assert dit.resolve_attention(None, jnp.float32, 8) == "einsum"
    assert dit.resolve_attention("xla", jnp.bfloat16, 8) == "xla"
    model = perturbed(small_model(getkey()), getkey())
    with pytest.raises(ValueError, match="must be one of"):
        rfdit.DiT(model.config, key=getkey(), attention="flash")
    x, t, y = jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.3), jnp.asarray(4)
    xla = with_compute_dtype(model, "float32", attention="xla")
    assert xla.attention == "xla" and model.attention is None
    # the same function: float32 roundings in a different order
    assert _relative_error(xla(x, t, y), with_compute_dtype(model, "float32", attention="einsum")(x, t, y)) < 1e-6

    calls = []
    monkeypatch.setattr(dit, "einsum_attention", lambda q, k, v: calls.append(1) or jnp.zeros_like(q))
    xla(x, t, y)
    assert not calls  # XLA's attention, not the einsum
    with_compute_dtype(model, "float32", attention="einsum")(x, t, y)
    assert calls


def test_bf16_linear_sums_its_bias_gradient_in_float32(getkey):
    layer = Linear(0.1 * jr.normal(getkey(), (16, 32)), jnp.zeros((16,)), "bfloat16")
    x = jr.normal(getkey(), (256, 256, 32))
    weights = jr.normal(getkey(), (256, 256, 16))
    # the cotangent reaching the bf16 output is `weights` rounded to bf16; its sum over 65,536 tokens in
    # float64 is the exact bias gradient. A bf16 accumulation is off by ~1e-2, a float32 one by ~1e-6.
    # Under vmap (as in the DiT) the batch's broadcast of the bias comes after any cast inside the
    # layer: adding in bf16 there summed over the batch in bf16: up to a few per cent off per element.
    # Both cases count: the bias alone (the input's tangent is zero, as for the patch embedding) and
    # the whole layer (as in training, where the input's tangent is not). The layer of the training
    # step (`with_bf16_backward`: on CPUs a custom VJP with the bias inside) sums it in float32 too.
    exact = np.asarray(weights.astype(jnp.bfloat16), np.float64).sum(axis=(0, 1))

    def apply(l, vmapped):
        return jax.vmap(ft.partial(l, out_dtype=l.dtype))(x) if vmapped else l(x, out_dtype=l.dtype)

    def loss(l, vmapped):
        return jnp.sum(apply(l, vmapped).astype(jnp.float32) * weights)

    for vmapped, l in itertools.product((False, True), (layer, with_bf16_backward(layer))):
        assert apply(l, vmapped).dtype == jnp.bfloat16
        bias_alone = jax.grad(lambda b: loss(eqx.tree_at(lambda l: l.bias, l, b), vmapped))(l.bias)
        in_the_layer = jax.grad(loss)(l, vmapped).bias
        for grad in (bias_alone, in_the_layer):
            np.testing.assert_allclose(np.asarray(grad, np.float64), exact, rtol=1e-4, atol=1e-3)


def test_bf16_modulation_keeps_small_scales(getkey):
    from rfdit.nn.dit import _modulate

    # scales of ~5e-3, as adaLN-Zero's early in training: x·scale measured against float64 on the same
    # bf16 x. Only the output's rounding remains (0.32-0.35 of x·scale's size); rounding 1 + scale to
    # bf16 first, as x·(1 + scale) would, gave 0.43-0.46
    x = jr.normal(getkey(), (4096, 256)).astype(jnp.bfloat16)
    scale = 5e-3 * jr.normal(getkey(), (256,))
    effect = np.asarray(x, np.float64) * np.asarray(scale, np.float64)
    out = np.asarray(_modulate(x, jnp.zeros(256), scale).astype(jnp.float32), np.float64)
    assert np.linalg.norm(out - np.asarray(x, np.float64) - effect) / np.linalg.norm(effect) < 0.4


def test_dit_bf16_residual_stream_gradients_stay_close_to_float32(getkey):
    # the residual stream in bf16 as well as the products: the gradients of the modulation and the MLP,
    # summed over tokens and examples, stay as close to a float32 model's as bf16 operands allow
    # (~1e-3..1e-2 relative: 4-6e-3 here, 4-5e-3 with the float32 stream)
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (32, 8, 8, 3)), jr.uniform(getkey(), (32,)), jnp.arange(32) % 10

    @eqx.filter_jit
    def grads(m):
        params, static = eqx.partition(m, eqx.is_inexact_array)
        loss = lambda p: jnp.mean((jax.vmap(eqx.combine(p, static))(x, t, y) - x) ** 2)
        return jax.grad(loss)(params)

    ref = grads(model)
    bf16 = with_compute_dtype(model, "bfloat16", residual_dtype="bfloat16")
    assert bf16.residual_dtype == "bfloat16" and with_compute_dtype(model, "bfloat16").residual_dtype == "float32"
    for m, dtype in ((bf16, "bfloat16"), (with_compute_dtype(model, "bfloat16"), "float32")):  # the blocks' carry
        scans = [e for e in jax.make_jaxpr(m)(x[0], t[0], y[0]).jaxpr.eqns if e.primitive.name == "scan"]
        assert [str(e.outvars[0].aval.dtype) for e in scans] == [dtype]
    g = grads(bf16)
    for name in ("modulation", "fc1", "fc2"):
        for part in ("weight", "bias"):
            ours, theirs = (getattr(getattr(tree.blocks, name), part) for tree in (g, ref))
            assert ours.dtype == jnp.float32
            assert _relative_error(ours, theirs) < 1e-2, (name, part)
    with pytest.raises(ValueError, match="residual_dtype"):
        rfdit.DiT(model.config, key=getkey(), residual_dtype="float16")


def test_dit_scan_unroll_default_and_equivalence(getkey):
    assert resolve_scan_unroll(None, 12) == (1 if jax.default_backend() == "cpu" else 12)
    assert resolve_scan_unroll(None, 12, sharded_params=True) == 1  # FSDP: one block's weights gathered at a time
    # bf16 models run their blocks unrolled and without remat everywhere (on CPUs a scan's stacked
    # activations cost more than they save); float32 ones on CPUs scan and keep only the products
    assert resolve_scan_unroll(None, 12, dtype="bfloat16") == 12
    assert resolve_scan_unroll(None, 12, sharded_params=True, dtype="bfloat16") == 1
    cpu = jax.default_backend() == "cpu"
    assert resolve_remat(None, "bfloat16") == "none" and resolve_remat(None) == ("dots" if cpu else "none")
    bf16 = rfdit.DiT(small_model(getkey()).config, key=getkey(), dtype="bfloat16")  # DiT's defaults go through them
    assert (bf16.remat, bf16.scan_unroll) == ("none", bf16.config.depth)
    assert resolve_scan_unroll(4, 12) == 4 and resolve_scan_unroll(40, 12) == 12
    with pytest.raises(ValueError, match="scan_unroll"):
        resolve_scan_unroll(0, 12)
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.3), jnp.asarray(2)
    assert model.scan_unroll == resolve_scan_unroll(None, model.config.depth)  # DiT's default goes through it
    unrolled = with_compute_dtype(model, "float32", scan_unroll=model.config.depth)
    assert unrolled.scan_unroll == model.config.depth
    # the same blocks in the same order; XLA may fuse the unrolled ones differently: float32 rounding only
    np.testing.assert_allclose(unrolled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)


def test_dit_remat_policies_give_the_same_gradients(getkey):
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (4, 8, 8, 3)), jr.uniform(getkey(), (4,)), jnp.arange(4)

    def grads(remat):
        m = with_compute_dtype(model, "float32", remat=remat)
        params, static = eqx.partition(m, eqx.is_inexact_array)
        loss = lambda p: jnp.mean(jax.vmap(eqx.combine(p, static))(x, t, y) ** 2)
        return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(params))

    ref = grads("none")
    for remat in ("dots", "full", True):
        for a, b in zip(ref, grads(remat)):
            # the same arithmetic, recomputed in another fusion order: float32 rounding only
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        with_compute_dtype(model, "float32", remat="some")


def test_dit_xl2_compiles_fast():
    cfg = rfdit.DiTConfig.preset("XL/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    model = eqx.filter_eval_shape(rfdit.DiT, cfg, key=jr.key(0))
    args = (jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2,), jnp.int32))
    start = time.perf_counter()
    jax.jit(lambda m, x, t, y: jax.vmap(m)(x, t, y)).lower(model, *args).compile()
    elapsed = time.perf_counter() - start
    print(f"XL/2 forward trace+compile: {elapsed:.1f} s")
    assert elapsed < 60  # the scan over 28 blocks keeps this at a few seconds
