import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from rfdit.config import PRESETS
from helpers import perturbed, relative_error, small_model
from rfdit.nn.dit import sincos_pos_embed, timestep_features, with_policy
from rfdit.nn.policy import (
    BLOCK_DEFAULTS,
    CPU_FAMILIES,
    Machine,
    block_default,
    cpu_family,
    resolve_attention,
    resolve_remat,
    resolve_scan_unroll,
    this_machine,
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


def test_dit_zero_output_at_init(getkey):
    model = small_model(getkey())
    out = model(jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.3), jnp.asarray(4))
    assert out.shape == (8, 8, 3)
    assert jnp.all(out == 0)


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


def test_dit_attention_setting_chooses_the_implementation(getkey, monkeypatch):
    from rfdit.nn import layers

    if jax.default_backend() == "cpu":
        assert resolve_attention(None, jnp.float32, 8) == "einsum"
    assert resolve_attention("xla", jnp.bfloat16, 8) == "xla"
    model = perturbed(small_model(getkey()), getkey())
    with pytest.raises(ValueError, match="must be one of"):
        rfdit.DiT(model.config, key=getkey(), attention="flash")
    x, t, y = jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.3), jnp.asarray(4)
    xla = with_policy(model, attention="xla")
    assert xla.policy.attention == "xla" and model.policy.attention is None
    # the same function: float32 roundings in a different order
    assert relative_error(xla(x, t, y), with_policy(model, attention="einsum")(x, t, y)) < 1e-6

    calls = []
    monkeypatch.setattr(layers, "einsum_attention", lambda q, k, v, policy: calls.append(1) or jnp.zeros_like(q))
    xla(x, t, y)
    assert not calls  # XLA's attention, not the einsum
    with_policy(model, attention="einsum")(x, t, y)
    assert calls



def test_defaults_are_resolved_from_the_machines_cpu_family():
    # the families from /proc/cpuinfo's flags, as lscpu printed them on the machines the defaults were measured on
    intel_amx = "avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split()
    amd_epyc = "avx2 avx512f avx512_bf16 avx512_vnni".split()
    assert [cpu_family(f) for f in (intel_amx, amd_epyc, ["avx2", "fma"], [])] == \
        ["amx", "avx512_bf16", "generic", "generic"]
    assert cpu_family() == this_machine().cpu_family or jax.default_backend() != "cpu"
    for family in CPU_FAMILIES:
        machine = Machine("cpu", family)
        for dtype in ("float32", "bfloat16"):
            entry = block_default(dtype, machine)
            # a family's own entry, else the CPU entry for every family
            assert entry is BLOCK_DEFAULTS.get(("cpu", family, dtype), BLOCK_DEFAULTS[("cpu", None, dtype)])
            assert resolve_remat(None, dtype, machine) == entry.remat
            assert resolve_scan_unroll(None, 12, dtype=dtype, machine=machine) == (entry.scan_unroll or 12)
    # what was measured: float32 scans its blocks and keeps the products on every family measured, bf16 unrolls
    assert {(block_default("float32", Machine("cpu", f)).remat, block_default("float32", Machine("cpu", f)).scan_unroll)
            for f in CPU_FAMILIES} == {("dots", 1)}
    assert block_default("bfloat16", Machine("cpu", "amx")) is BLOCK_DEFAULTS[("cpu", None, "bfloat16")]
    for backend in ("gpu", "tpu"):  # accelerators: every block unrolled, nothing recomputed
        assert (resolve_remat(None, "bfloat16", Machine(backend)), resolve_scan_unroll(
            None, 28, dtype="bfloat16", machine=Machine(backend))) == ("none", 28)
    assert all(entry.measured_on for entry in BLOCK_DEFAULTS.values())


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
    assert (bf16.policy.remat, bf16.policy.scan_unroll) == ("none", bf16.config.depth)
    assert resolve_scan_unroll(4, 12) == 4 and resolve_scan_unroll(40, 12) == 12
    with pytest.raises(ValueError, match="scan_unroll"):
        resolve_scan_unroll(0, 12)
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (8, 8, 3)), jnp.asarray(0.3), jnp.asarray(2)
    assert model.policy.scan_unroll == resolve_scan_unroll(None, model.config.depth)  # DiT's default goes through it
    unrolled = with_policy(model, scan_unroll=model.config.depth)
    assert unrolled.policy.scan_unroll == model.config.depth
    # the same blocks in the same order; XLA may fuse the unrolled ones differently: float32 rounding only
    np.testing.assert_allclose(unrolled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-6)


def test_dit_remat_policies_give_the_same_gradients(getkey):
    model = perturbed(small_model(getkey()), getkey())
    x, t, y = jr.normal(getkey(), (4, 8, 8, 3)), jr.uniform(getkey(), (4,)), jnp.arange(4)

    def grads(remat):
        m = with_policy(model, remat=resolve_remat(remat))
        params, static = eqx.partition(m, eqx.is_inexact_array)
        loss = lambda p: jnp.mean(jax.vmap(eqx.combine(p, static))(x, t, y) ** 2)
        return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(params))

    ref = grads("none")
    for remat in ("dots", "full", True):
        for a, b in zip(ref, grads(remat)):
            # the same arithmetic, recomputed in another fusion order: float32 rounding only
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        with_policy(model, remat="some")


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
