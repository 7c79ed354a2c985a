"""Precision: bf16 products and their backward rules against float64 references, and the sums that
must stay float32 (rfdit.nn.layers, rfdit.nn.grad_rules). Tests that count a jaxpr's products back the
promises of BENCHMARKS.md's bf16 sections: bf16 operands in the backward pass, one weight-gradient
product per batch."""

import functools as ft
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from helpers import perturbed, relative_error, small_model
from rfdit.nn.dit import with_policy
from rfdit.nn.layers import Linear, PatchEmbed, attention, einsum_attention, modulate, qkv_attention
from rfdit.nn.policy import ExecutionPolicy

BF16 = ExecutionPolicy(compute_dtype="bfloat16")
BF16_BACKWARD = BF16.replace(bf16_backward=True)  # the training step's form on CPUs


def einsum(bf16_backward: bool) -> ExecutionPolicy:
    return ExecutionPolicy(attention="einsum", bf16_backward=bf16_backward)


def test_dit_bf16_compute_close_to_f32(getkey):
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.4), jnp.asarray(5)
    ref = model(x, t, y)
    out = with_policy(model, compute_dtype="bfloat16")(x, t, y)
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
    # (`ExecutionPolicy.bf16_backward`). Float32 cotangents made them float32: on an H100 those ran as TF32 and the
    # DiT-B/2 step took twice as long; on CPUs, at half the speed of bf16 operands (BENCHMARKS.md).
    model = with_policy(perturbed(small_model(getkey()), getkey()), compute_dtype="bfloat16", bf16_backward=True)
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
    embed = PatchEmbed(0.1 * jr.normal(getkey(), (48, 2, 2, 3)), 0.1 * jr.normal(getkey(), (48,)), 2)
    x = jr.normal(getkey(), (6, 8, 8, 3))  # 6 examples of 16 patches of 2x2x3, under vmap
    g = jr.normal(getkey(), (6, 16, 48))

    def loss(e, x):
        return jnp.sum(jax.vmap(lambda x: e(x, BF16_BACKWARD))(x) * g)

    de, dx = jax.grad(loss, argnums=(0, 1))(embed, x)
    # float64 on the bf16-rounded operands of the forward product; the gradients are formed in float32
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
    patches = r(x).reshape(6, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(6, 16, 12)
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(de.weight.reshape(48, 12), np.einsum("bno,bnk->ok", g64, patches), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(de.bias, g64.sum((0, 1)), rtol=1e-5, atol=1e-5)
    dpatches = g64 @ r(embed.weight.reshape(48, 12))
    np.testing.assert_allclose(dx, dpatches.reshape(6, 4, 4, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(6, 8, 8, 3),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jax.vmap(lambda x: embed(x, BF16_BACKWARD))(x),  # the same forward pass
                                  jax.vmap(lambda x: embed(x, BF16))(x))


def test_patch_embedding_float32_training_rule_matches_autodiff(getkey):
    # On CPUs the training step's float32 patch embedding takes the same rule (the weight gradient
    # transposes the patches): the same gradients as autodiff up to float32 summation order.
    embed = PatchEmbed(0.1 * jr.normal(getkey(), (48, 2, 2, 3)), 0.1 * jr.normal(getkey(), (48,)), 2)
    x, g = jr.normal(getkey(), (6, 8, 8, 3)), jr.normal(getkey(), (6, 16, 48))
    rule, plain = ExecutionPolicy(bf16_backward=True), ExecutionPolicy()
    assert rule.cpu_training_rules and not plain.cpu_training_rules

    def loss(e, x, policy):
        return jnp.sum(jax.vmap(lambda x: e(x, policy))(x) * g)

    ours = jax.grad(loss, argnums=(0, 1))(embed, x, rule)
    theirs = jax.grad(loss, argnums=(0, 1))(embed, x, plain)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # 96 float32 terms per weight entry
    np.testing.assert_array_equal(jax.vmap(lambda x: embed(x, rule))(x), jax.vmap(lambda x: embed(x, plain))(x))


def test_bf16_backward_rounds_the_cotangent_and_sums_the_batch_in_one_product(getkey):
    layer = Linear(0.1 * jr.normal(getkey(), (24, 40)), 0.1 * jr.normal(getkey(), (24,)))
    x = jr.normal(getkey(), (16, 32, 40))  # (batch, tokens, in): the layer runs per example, under vmap
    g = jr.normal(getkey(), (16, 32, 24))  # the output's cotangent

    def loss(l, x, policy=BF16_BACKWARD):
        return jnp.sum(jax.vmap(lambda x: l(x, policy))(x) * g)

    dl, dx = jax.grad(loss, argnums=(0, 1))(layer, x)
    # float64 references on the bf16-rounded operands: each product is exact in float32 (8-bit
    # mantissas), so only float32 accumulation over 40 or 512 terms remains (~1e-7 relative)
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(dx, r(g) @ r(layer.weight), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dl.weight, np.einsum("bto,bti->oi", r(g), r(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dl.bias, np.asarray(g, np.float64).sum((0, 1)), rtol=1e-5, atol=1e-5)
    # the weight's gradient is one (out, in) product over batch and tokens, not one per example
    dots = _dot_eqns(jax.make_jaxpr(jax.grad(loss))(layer, x).jaxpr)
    assert len(dots) == 3 and all(e.params["dimension_numbers"][1] == ((), ()) for e in dots)  # no batch axes
    # a weight per example (layers stacked by vmap): each gets its own example's gradient
    weights = 0.1 * jr.normal(getkey(), (16, 24, 40))

    def stacked_loss(weights, x):
        per_example = lambda w, x: Linear(w, layer.bias)(x, BF16_BACKWARD)
        return jnp.sum(jax.vmap(per_example)(weights, x) * g)

    np.testing.assert_allclose(jax.grad(stacked_loss)(weights, x), np.einsum("bto,bti->boi", r(g), r(x)),
                               rtol=1e-5, atol=1e-5)
    # and a bias per example: each gets its own example's sum
    biases = 0.1 * jr.normal(getkey(), (16, 24))

    def stacked_bias_loss(biases, x):
        per_example = lambda b, x: Linear(layer.weight, b)(x, BF16_BACKWARD)
        return jnp.sum(jax.vmap(per_example)(biases, x) * g)

    np.testing.assert_allclose(jax.grad(stacked_bias_loss)(biases, x), np.asarray(g, np.float64).sum(1),
                               rtol=1e-5, atol=1e-5)
    # the same forward pass as the unflagged layer, whose forward-mode autodiff still works
    np.testing.assert_array_equal(jax.vmap(lambda x: layer(x, BF16_BACKWARD))(x), jax.vmap(lambda x: layer(x, BF16))(x))
    jax.linearize(jax.vmap(lambda x: layer(x, BF16)), x)
    # float32 products are unchanged
    float32_backward = ExecutionPolicy(bf16_backward=True)
    ours, plain = jax.grad(loss)(layer, x, float32_backward), jax.grad(loss)(layer, x, ExecutionPolicy())
    assert jnp.array_equal(ours.weight, plain.weight) and jnp.array_equal(ours.bias, plain.bias)


def _attention_float64(q, k, v) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", weights / weights.sum(-1, keepdims=True), v)


def test_einsum_attention_matches_a_float64_reference_and_jax_attention(getkey):
    q, k, v = (3 * jr.normal(getkey(), (64, 4, 32)) for _ in range(3))
    # float32: a few roundings of 6e-8 each, through products of 32 terms and sums of 64
    assert relative_error(einsum_attention(q, k, v), _attention_float64(q, k, v)) < 1e-6
    grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2))(q, k, v)
             for f in (einsum_attention, jax.nn.dot_product_attention)]
    for ours, theirs in zip(*grads):
        assert relative_error(ours, theirs) < 1e-5
    # bf16 inputs, float32 logits and softmax: the weights and the output are rounded to bf16 (half an
    # ulp is 2e-3 relative); scaling q in bf16 before the product, not the float32 logits, gave 5e-3
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    ours = einsum_attention(q, k, v)
    assert ours.dtype == jnp.bfloat16
    assert relative_error(ours, _attention_float64(q, k, v)) < 3e-3


def test_qkv_attention_on_packed_heads_equals_attention_on_split_heads(getkey):
    qkv = (3 * jr.normal(getkey(), (8, 16, 3, 2, 32))).astype(jnp.bfloat16)  # 8 examples, packed as the qkv layer writes
    g = jr.normal(getkey(), (8, 16, 2, 32))
    for flag in (False, True):
        packed = lambda qkv, flag=flag: jnp.sum(
            jax.vmap(ft.partial(qkv_attention, policy=einsum(flag)))(qkv).astype(jnp.float32) * g)
        split = lambda qkv, flag=flag: jnp.sum(jax.vmap(
            lambda a: attention(a[:, 0], a[:, 1], a[:, 2], einsum(flag)))(qkv).astype(jnp.float32) * g)
        np.testing.assert_array_equal(packed(qkv), split(qkv))
        np.testing.assert_array_equal(jax.grad(packed)(qkv), jax.grad(split)(qkv))
    # an implementation other than the einsum goes through `attention` on the split heads
    xla = ExecutionPolicy(attention="xla", bf16_backward=True)
    np.testing.assert_array_equal(jax.vmap(ft.partial(qkv_attention, policy=xla))(qkv),
                                  jax.vmap(lambda a: attention(a[:, 0], a[:, 1], a[:, 2], xla.replace(bf16_backward=False)))(qkv))


def test_one_pass_layer_norm_of_the_cpu_training_step_matches_the_two_pass_form(getkey):
    from rfdit.nn.layers import layer_norm

    training = einsum(True)
    assert training.cpu_training_rules == (jax.default_backend() == "cpu")
    # activations with a mean of 3 standard deviations: E[x²] - E[x]² cancels 10 of its ~11 parts
    x = 3.0 + jr.normal(getkey(), (64, 16, 256))
    exact = (np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(-1, keepdims=True)) / np.sqrt(
        np.asarray(x, np.float64).var(-1, keepdims=True) + 1e-6)
    assert relative_error(layer_norm(x), exact) < 1e-6  # two passes, everywhere outside the training step
    assert relative_error(layer_norm(x, training), exact) < 3e-6
    g = jr.normal(getkey(), x.shape)
    grads = [jax.grad(lambda x, p=p: jnp.sum(layer_norm(x, p) * g))(x) for p in (training, einsum(False))]
    assert relative_error(grads[0], grads[1]) < 3e-5
    # a constant token (variance 0 up to rounding) stays finite instead of taking the root of a negative number
    assert bool(jnp.isfinite(layer_norm(jnp.full((4, 64), 7.1), training)).all())


def test_float32_packed_attention_backward_matches_autodiff(getkey):
    # the CPU training step's attention rule in float32: the hand-written backward pass against autodiff
    # through the plain einsum attention; both sum in float32, in other orders (hence 1e-5, not equality)
    qkv = 3 * jr.normal(getkey(), (8, 16, 3, 2, 32))
    g = jr.normal(getkey(), (8, 16, 2, 32))
    rule, autodiff = (lambda qkv, flag=flag: jnp.sum(jax.vmap(ft.partial(qkv_attention, policy=einsum(flag)))(qkv) * g)
                      for flag in (True, False))
    assert einsum(True).cpu_training_rules == (jax.default_backend() == "cpu")
    np.testing.assert_allclose(rule(qkv), autodiff(qkv), rtol=1e-6)
    assert relative_error(jax.grad(rule)(qkv), jax.grad(autodiff)(qkv)) < 1e-5
    if jax.default_backend() == "cpu":  # the rule is in the step: a custom VJP
        assert "custom_vjp_call" in str(jax.make_jaxpr(rule)(qkv))
        assert "custom_vjp_call" not in str(jax.make_jaxpr(autodiff)(qkv))


def test_bf16_attention_backward_takes_bf16_operands_and_stays_close(getkey):
    q, k, v = (3 * jr.normal(getkey(), (8, 64, 4, 32)) for _ in range(3))  # 8 examples under vmap
    g = jr.normal(getkey(), (8, 64, 4, 32))
    q16, k16, v16 = (a.astype(jnp.bfloat16) for a in (q, k, v))

    def loss(q, k, v, flag):
        heads = jax.vmap(ft.partial(attention, policy=einsum(flag)))(q, k, v)
        return jnp.sum(heads.astype(jnp.float32) * g)

    # reference: float32 autodiff on the same bf16-rounded heads
    exact = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q16, k16, v16)), False)
    flagged = jax.grad(loss, argnums=(0, 1, 2))(q16, k16, v16, True)
    plain = jax.grad(loss, argnums=(0, 1, 2))(q16, k16, v16, False)
    for ours, autodiff, ref in zip(flagged, plain, exact):
        assert ours.dtype == jnp.bfloat16
        # bf16 roundings of the cotangent, the weights and the logits' gradient (half an ulp: 2e-3 each):
        # 3-5e-3 here, against 3e-3 for plain autodiff in bf16, which keeps the logits' gradient float32
        assert relative_error(ours, ref) < 1e-2 and relative_error(autodiff, ref) < 1e-2
    if jax.default_backend() == "cpu":  # elsewhere the flag changes nothing
        flagged_grad = jax.grad(ft.partial(loss, flag=True), argnums=(0, 1, 2))
        dots = _dot_dtypes(jax.make_jaxpr(flagged_grad)(q16, k16, v16).jaxpr)
        assert len(dots) == 6 and all(dtypes == ("bfloat16", "bfloat16") for _, dtypes in dots), dots


def test_bf16_linear_sums_its_bias_gradient_in_float32(getkey):
    layer = Linear(0.1 * jr.normal(getkey(), (16, 32)), jnp.zeros((16,)))
    x = jr.normal(getkey(), (256, 256, 32))
    weights = jr.normal(getkey(), (256, 256, 16))
    # the cotangent reaching the bf16 output is `weights` rounded to bf16; its sum over 65,536 tokens in
    # float64 is the exact bias gradient. A bf16 accumulation is off by ~1e-2, a float32 one by ~1e-6.
    # Under vmap (as in the DiT) the batch's broadcast of the bias comes after any cast inside the
    # layer: adding in bf16 there summed over the batch in bf16: up to a few per cent off per element.
    # Both cases count: the bias alone (the input's tangent is zero, as for the patch embedding) and
    # the whole layer (as in training, where the input's tangent is not). The layer of the training
    # step (`bf16_backward`: on CPUs a custom VJP with the bias inside) sums it in float32 too.
    exact = np.asarray(weights.astype(jnp.bfloat16), np.float64).sum(axis=(0, 1))

    def apply(l, vmapped, policy):
        run = ft.partial(l, policy=policy, out_dtype="bfloat16")
        return jax.vmap(run)(x) if vmapped else run(x)

    def loss(l, vmapped, policy):
        return jnp.sum(apply(l, vmapped, policy).astype(jnp.float32) * weights)

    l = layer
    for vmapped, policy in itertools.product((False, True), (BF16, BF16_BACKWARD)):
        assert apply(l, vmapped, policy).dtype == jnp.bfloat16
        bias_alone = jax.grad(lambda b: loss(eqx.tree_at(lambda l: l.bias, l, b), vmapped, policy))(l.bias)
        in_the_layer = jax.grad(loss)(l, vmapped, policy).bias
        for grad in (bias_alone, in_the_layer):
            np.testing.assert_allclose(np.asarray(grad, np.float64), exact, rtol=1e-4, atol=1e-3)


def test_bf16_modulation_keeps_small_scales(getkey):
    # scales of ~5e-3, as adaLN-Zero's early in training: x·scale measured against float64 on the same
    # bf16 x. Only the output's rounding remains (0.32-0.35 of x·scale's size); rounding 1 + scale to
    # bf16 first, as x·(1 + scale) would, gave 0.43-0.46
    x = jr.normal(getkey(), (4096, 256)).astype(jnp.bfloat16)
    scale = 5e-3 * jr.normal(getkey(), (256,))
    effect = np.asarray(x, np.float64) * np.asarray(scale, np.float64)
    out = np.asarray(modulate(x, jnp.zeros(256), scale).astype(jnp.float32), np.float64)
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
    bf16 = with_policy(model, compute_dtype="bfloat16", residual_dtype="bfloat16")
    assert bf16.policy.residual_dtype == "bfloat16" and with_policy(model, compute_dtype="bfloat16").policy.residual_dtype == "float32"
    for m, dtype in ((bf16, "bfloat16"), (with_policy(model, compute_dtype="bfloat16"), "float32")):  # the blocks' carry
        scans = [e for e in jax.make_jaxpr(m)(x[0], t[0], y[0]).jaxpr.eqns if e.primitive.name == "scan"]
        assert [str(e.outvars[0].aval.dtype) for e in scans] == [dtype]
    g = grads(bf16)
    for name in ("modulation", "fc1", "fc2"):
        for part in ("weight", "bias"):
            ours, theirs = (getattr(getattr(tree.blocks, name), part) for tree in (g, ref))
            assert ours.dtype == jnp.float32
            assert relative_error(ours, theirs) < 1e-2, (name, part)
    with pytest.raises(ValueError, match="residual_dtype"):
        rfdit.DiT(model.config, key=getkey(), residual_dtype="float16")

