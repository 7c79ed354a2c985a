"""Importing SiT / REPA checkpoints: key mapping, parity with a PyTorch reference, time conventions."""

import argparse
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from rfdit.checkpoint import load_export
from rfdit.config import DiTConfig
from rfdit.importers import convert_state_dict, import_checkpoint, published_state_dict
from rfdit.sampling import model_velocity

from helpers import load_script, relative_error, require

# float32 on both sides; only summation orders differ (oneDNN vs XLA), ~1e-7 relative through these small
# models, while any layout or wiring mistake gives O(1). 1e-5 is the bar.
PARITY_RTOL = 1e-5
TIMM_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which timm's Attention(qk_norm=True) uses

# SiT-shaped (learn_sigma, DiT's key names) and REPA-shaped (C outputs, q/k norm, projector heads) references.
SIT_SMALL = dict(image_size=8, patch=2, in_ch=4, hidden=64, depth=2, heads=4, num_classes=10, learn_sigma=True)
REPA_SMALL = dict(image_size=8, patch=2, in_ch=4, hidden=64, depth=2, heads=4, num_classes=10, learn_sigma=False,
                  qk_norm=True, projector=(32, 24))


def reference_model(seed: int, *, image_size, patch, in_ch, hidden, depth, heads, num_classes, learn_sigma,
                    qk_norm=False, projector=None, randomize=True):
    """A SiT in PyTorch, written from the DiT/SiT papers' description (adaLN-Zero DiT, linear-path velocity).

    Module names follow the published checkpoints' keys. Every weight is random (adaLN-Zero's zeros would hide
    wiring mistakes in the blocks and the final layer).
    """
    torch = require("torch", "the PyTorch reference model needs it")
    nn = torch.nn
    out_ch = 2 * in_ch if learn_sigma else in_ch
    grid = image_size // patch
    head_dim = hidden // heads

    def sincos_table() -> np.ndarray:
        # MAE/DiT: the first half of the features encodes the column, the second the row; each half is
        # [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(-k/(D/4)).
        omega = 10000.0 ** (-np.arange(hidden // 4) / (hidden / 4))
        rows, cols = np.divmod(np.arange(grid * grid), grid)  # token n = row·grid + col, as a conv flattens
        half = lambda pos: np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], axis=1)
        return np.concatenate([half(cols.astype(np.float64)), half(rows.astype(np.float64))], axis=1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(hidden, 3 * hidden)
            self.attn.proj = nn.Linear(hidden, hidden)
            if qk_norm:
                self.attn.q_norm = nn.LayerNorm(head_dim, eps=TIMM_LAYER_NORM_EPS)
                self.attn.k_norm = nn.LayerNorm(head_dim, eps=TIMM_LAYER_NORM_EPS)
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(hidden, 4 * hidden)
            self.mlp.fc2 = nn.Linear(4 * hidden, hidden)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

        def forward(self, x, c):
            b, n, d = x.shape
            norm = lambda z: torch.nn.functional.layer_norm(z, (d,), eps=1e-6)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
            h = norm(x) * (1 + scale_a) + shift_a
            q, k, v = self.attn.qkv(h).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            if qk_norm:
                q, k = self.attn.q_norm(q), self.attn.k_norm(k)
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
            attended = (weights @ v).transpose(1, 2).reshape(b, n, d)
            x = x + gate_a * self.attn.proj(attended)
            h = norm(x) * (1 + scale_m) + shift_m
            return x + gate_m * self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(h), approximate="tanh"))

    class SiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = nn.Module()
            self.x_embedder.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)
            self.t_embedder = nn.Module()
            self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden)  # row num_classes: null label
            self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table()).float()[None], requires_grad=False)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            if projector is not None:  # REPA's alignment heads; unused by the denoiser's output
                width, z_dim = projector
                self.projectors = nn.ModuleList([nn.Sequential(
                    nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, z_dim))])
            self.final_layer = nn.Module()
            self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
            self.final_layer.linear = nn.Linear(hidden, patch * patch * out_ch)

        def forward(self, x, t, y):
            tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
            freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
            angles = t[:, None].float() * freqs[None]
            c = self.t_embedder.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))
            c = c + self.y_embedder.embedding_table(y)
            for block in self.blocks:
                tokens = block(tokens, c)
            shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
            normed = torch.nn.functional.layer_norm(tokens, (hidden,), eps=1e-6)
            out = self.final_layer.linear(normed * (1 + scale) + shift)  # (B, N, p·p·O), per token (p, q, c)
            out = out.reshape(-1, grid, grid, patch, patch, out_ch)
            return torch.einsum("bhwpqc->bchpwq", out).reshape(-1, out_ch, image_size, image_size)

    torch.manual_seed(seed)
    model = SiT().eval()
    if not randomize:
        return model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "pos_embed":
                continue
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.1)
    return model


def numpy_state(model) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def torch_tensor(value):
    import torch

    return torch.from_numpy(np.array(value))  # a writable copy


def run_reference(model, x, t, y):
    import torch

    with torch.no_grad():
        out = model(torch_tensor(x).permute(0, 3, 1, 2), torch_tensor(t), torch_tensor(np.asarray(y, np.int64)))
    return out.permute(0, 2, 3, 1).numpy()


def inputs(key, cfg: DiTConfig, batch: int = 3):
    x = jr.normal(key, (batch, cfg.image_size, cfg.image_size, cfg.in_channels))
    t = jnp.asarray([0.0, 0.37, 1.0][:batch], jnp.float32)
    y = jnp.asarray([3, 0, cfg.num_classes][:batch], jnp.int32)  # the last one is the null label
    return x, t, y


batched_forward = eqx.filter_jit(lambda model, x, t, y: jax.vmap(model)(x, t, y))
batched_velocity = eqx.filter_jit(lambda model, x, t, y: jax.vmap(lambda *a: model_velocity(model, *a))(x, t, y))


SMALL_CFG = DiTConfig(image_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                      num_classes=10, learn_sigma=True, time_scale=1.0)


def random_published_state(cfg: DiTConfig, seed: int, depth: int | None = None) -> dict[str, np.ndarray]:
    """Random values under the published names and shapes of `cfg` (its first `depth` blocks only)."""
    shapes = jax.eval_shape(published_state_dict, eqx.filter_eval_shape(rfdit.DiT, cfg, key=jr.key(0)))
    depth = cfg.depth if depth is None else depth
    rng = np.random.default_rng(seed)
    state = {name: rng.standard_normal(s.shape, np.float32) * np.float32(0.02) for name, s in shapes.items()
             if not name.startswith("blocks.") or int(name.split(".")[1]) < depth}
    state["pos_embed"] = np.asarray(rfdit.nn.sincos_pos_embed(cfg.hidden_size, cfg.image_size // cfg.patch_size))[None]
    return state


def small_state(key) -> dict[str, np.ndarray]:
    return random_published_state(SMALL_CFG, int(jr.randint(key, (), 0, 2**30)))


def test_import_xl2_round_trip_preserves_weights_and_outputs(getkey):
    # The published SiT-XL/2 state dict's names and shapes, from rfdit's own configuration under eval_shape.
    cfg = DiTConfig.preset("XL/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True, time_scale=1.0)
    shapes = jax.eval_shape(published_state_dict, eqx.filter_eval_shape(rfdit.DiT, cfg, key=jr.key(0)))
    assert sum(math.prod(s.shape) for s in shapes.values()) == 675_129_632  # "SiT Parameters" as SiT's train.py logs
    assert shapes["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert shapes["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert shapes["final_layer.linear.weight"].shape == (32, 1152)
    assert shapes["blocks.27.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert shapes["pos_embed"].shape == (1, 256, 1152)

    state = random_published_state(cfg, 0, depth=2)  # materialised at depth 2 for speed
    model, report = convert_state_dict(state, "sit")
    assert model.config == cfg.replace(depth=2)
    assert report.num_heads_from.startswith("the XL preset")
    assert report.pos_embed_max_abs_diff == 0.0
    back = jax.tree_util.tree_map(np.asarray, published_state_dict(model))
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)

    # The PyTorch reference takes the same names as they are, and gives the same outputs.
    reference = reference_model(0, image_size=32, patch=2, in_ch=4, hidden=1152, depth=2, heads=16, num_classes=1000,
                                learn_sigma=True, randomize=False)
    np.testing.assert_allclose(reference.pos_embed.numpy(), state["pos_embed"], atol=1e-6)  # its own sin-cos table
    reference.load_state_dict({name: torch_tensor(value) for name, value in state.items()}, strict=True)
    x, t, y = inputs(getkey(), cfg, batch=2)
    out = batched_forward(model, x, t, y)
    assert out.shape == (2, 32, 32, 8)
    assert relative_error(out, run_reference(reference, x, t, y)) < PARITY_RTOL


def test_import_sit_matches_pytorch_reference(getkey):
    reference = reference_model(0, **SIT_SMALL)
    model, report = convert_state_dict(numpy_state(reference), "sit", num_heads=4)
    cfg = model.config
    assert (cfg.learn_sigma, cfg.qk_norm, cfg.time_convention, cfg.time_scale, cfg.num_classes) == (
        True, False, "rfdit", 1.0, 10)
    x, t, y = inputs(getkey(), cfg)
    expected = run_reference(reference, x, t, y)  # (B, H, W, 2C)
    assert relative_error(batched_forward(model, x, t, y), expected) < PARITY_RTOL
    # the velocity is channels [:C] of every pixel (not the first p²C rows of the final linear)
    assert relative_error(batched_velocity(model, x, t, y), expected[..., :4]) < PARITY_RTOL


def test_import_repa_matches_pytorch_reference_with_time_flip(getkey):
    reference = reference_model(1, **REPA_SMALL)
    state = numpy_state(reference)
    model, report = convert_state_dict(state, "repa", num_heads=4)
    cfg = model.config
    assert (cfg.learn_sigma, cfg.qk_norm, cfg.time_convention, cfg.time_scale) == (False, True, "repa", 1.0)
    assert report.ignored == tuple(sorted(k for k in state if k.startswith("projectors.")))
    assert len(report.ignored) == 6
    x, t, y = inputs(getkey(), cfg)
    assert relative_error(batched_forward(model, x, t, y), run_reference(reference, x, t, y)) < PARITY_RTOL
    # in rfdit's time: v(x, s) = -v_repa(x, 1 - s)
    flipped = -run_reference(reference, x, 1 - np.asarray(t), y)
    assert relative_error(batched_velocity(model, x, t, y), flipped) < PARITY_RTOL


def test_import_poisoned_sigma_channels_give_finite_velocity(getkey):
    state = random_published_state(SMALL_CFG, 5)
    clean, _ = convert_state_dict(state, "sit", num_heads=4)
    channels, outputs = 4, 8
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        state[name].reshape(2 * 2, outputs, -1)[:, channels:] = np.nan  # rows (p, q, c): the sigma channels c >= C
    poisoned, report = convert_state_dict(state, "sit", num_heads=4)
    assert any("sigma channels" in note for note in report.notes)

    x, t, y = inputs(getkey(), poisoned.config)
    raw = np.asarray(batched_forward(poisoned, x, t, y))
    assert np.isnan(raw[..., channels:]).all() and np.isfinite(raw[..., :channels]).all()
    velocity = batched_velocity(poisoned, x, t, y)
    np.testing.assert_array_equal(velocity, batched_velocity(clean, x, t, y))
    # ... and through the guided sampler (one pass of 2B, guidance within an interval)
    images, _ = rfdit.sample(poisoned, x, y, cfg_scale=1.5, solver="heun", num_steps=2, guidance_interval=(0.3, 1.0))
    assert bool(jnp.all(jnp.isfinite(images)))

    state["final_layer.linear.bias"].reshape(2 * 2, outputs)[1, 0] = np.nan  # a velocity channel
    with pytest.raises(ValueError, match="non-finite values.*velocity channels"):
        convert_state_dict(state, "sit", num_heads=4)


def test_import_qk_norm_matches_timm_with_small_queries(getkey):
    torch = require("torch", "the PyTorch reference model needs it")

    reference = reference_model(1, **REPA_SMALL)
    with torch.no_grad():
        for block in reference.blocks:  # shrink q and k (the first 2D rows of qkv) so that eps matters
            block.attn.qkv.weight[: 2 * 64] *= 0.1
            block.attn.qkv.bias[: 2 * 64] *= 0.1
    model, _ = convert_state_dict(numpy_state(reference), "repa", num_heads=4)
    x, t, y = inputs(getkey(), model.config)
    assert relative_error(batched_forward(model, x, t, y), run_reference(reference, x, t, y)) < PARITY_RTOL


class GaussianDataField(eqx.Module):
    """The exact flow field of Gaussian data N(mean, std²) from standard normal noise, as a stand-in model.

    rfdit: x_t = (1-t)·noise + t·data, v = E[data - noise | x_t]. REPA: x_t = (1-t)·data + t·noise,
    v = E[noise - data | x_t]. Each is written in its own variables from the Gaussian conditional mean
    E[a | b] = E[a] + Cov(a, b) / Var(b) · (b - E[b]).
    """

    mean: jax.Array
    std: jax.Array
    config: DiTConfig = eqx.field(static=True)

    def __call__(self, x, t, y, *, key=None):
        m, s2 = self.mean, jnp.square(self.std)
        if self.config.time_convention == "rfdit":
            var = jnp.square(1 - t) + jnp.square(t) * s2
            return m + (t * s2 - (1 - t)) / var * (x - t * m)
        var = jnp.square(1 - t) * s2 + jnp.square(t)
        return -m + (t - (1 - t) * s2) / var * (x - (1 - t) * m)


def test_repa_time_flip_gives_the_same_samples_on_gaussian_data(getkey):
    shape = (4, 4, 2)
    mean, std = jr.normal(getkey(), shape), jnp.exp(0.5 * jr.normal(getkey(), shape))
    cfg = DiTConfig(image_size=4, in_channels=2, patch_size=1, hidden_size=8, depth=1, num_heads=2, num_classes=3,
                    time_scale=1.0)
    noise, labels = jr.normal(getkey(), (5, *shape)), jnp.arange(5) % 3
    samples = {}
    for convention in ("rfdit", "repa"):
        field = GaussianDataField(mean, std, cfg.replace(time_convention=convention))
        samples[convention], stats = rfdit.sample(field, noise, labels, solver="dopri5", rtol=1e-7, atol=1e-7)
        assert int(stats["result"]) == 0
    np.testing.assert_allclose(samples["repa"], samples["rfdit"], rtol=1e-5, atol=1e-5)
    # the flow of Gaussian data is affine in the noise: x1 = mean + std · x0
    np.testing.assert_allclose(samples["rfdit"], mean[None] + std[None] * noise, rtol=1e-4, atol=1e-4)


def test_import_checkpoint_cli_takes_ema_and_reports_projectors(tmp_path):
    torch = require("torch", "writing a PyTorch training checkpoint needs it")
    from safetensors.numpy import load_file

    ema = reference_model(1, **REPA_SMALL).state_dict()
    raw = {name: value + 1.0 for name, value in ema.items()}  # the training weights, which must not be taken
    args = argparse.Namespace(model=None, path_type="linear", prediction="v", qk_norm=True, num_classes=10,
                              enc_type="dinov2-vit-b", encoder_depth=1, resolution=64)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args, "steps": 7},
               tmp_path / "0000007.pt")

    summary = load_script("import_checkpoint").main(
        ["--format", "repa", "--ckpt", str(tmp_path / "0000007.pt"), "--out", str(tmp_path / "export"),
         "--num_heads", "4"]
    )
    assert summary["weights"] == "ema" and len(summary["ignored"]) == 6
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["format"] == "rfdit-export"
    assert config["model"]["time_convention"] == "repa" and config["model"]["qk_norm"] is True
    assert config["import"]["ignored"] == summary["ignored"]
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    np.testing.assert_array_equal(tensors["label_table"], ema["y_embedder.embedding_table.weight"].numpy())
    np.testing.assert_array_equal(tensors["blocks.q_norm.weight"][1], ema["blocks.1.attn.q_norm.weight"].numpy())

    with pytest.raises(ValueError, match="format='repa'"):
        load_script("import_checkpoint").main(
            ["--format", "sit", "--ckpt", str(tmp_path / "0000007.pt"), "--out", str(tmp_path / "x"),
             "--num_heads", "4"]
        )


def test_import_export_loads_without_torch_and_keeps_outputs(tmp_path, getkey):
    cfg = SMALL_CFG
    model, report = convert_state_dict(random_published_state(cfg, 3), "sit", num_heads=4)
    rfdit.checkpoint.export_model(model, tmp_path / "export", extra={"import": report.to_dict()})
    loaded, config = load_export(tmp_path / "export")
    assert config["import"]["format"] == "sit"
    x, t, y = inputs(getkey(), cfg)
    np.testing.assert_array_equal(batched_velocity(loaded, x, t, y), batched_velocity(model, x, t, y))


def test_import_reads_safetensors_with_prefixes_and_ema_drift_of_the_position_table(tmp_path, getkey):
    from safetensors.numpy import save_file

    state = small_state(getkey())
    # SiT's/REPA's EMA also averages the frozen table; float32 decay + (1 - decay) != 1 shrinks it by ~1.7e-4
    state["pos_embed"] = state["pos_embed"] * np.float32(1 - 1.7e-4)
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ema.safetensors"))
    model, report = import_checkpoint(tmp_path / "ema.safetensors", "sit", num_heads=4)
    assert report.weights == "state_dict" and model.config == SMALL_CFG
    assert 0 < report.pos_embed_max_abs_diff < 2e-4
    assert report.num_published_params == sum(v.size for v in state.values())


def _set(state, name, value):
    state[name] = value
    return state


@pytest.mark.parametrize(
    "mutate, kwargs, message",
    [
        (lambda s: _set(s, "projectors.0.0.weight", np.zeros((8, 64), np.float32)), dict(num_heads=4),
         "format='repa'"),
        (lambda s: s, dict(format="repa", num_heads=4), "learn_sigma.*format='sit'"),
        (lambda s: s, dict(), "pass num_heads"),
        (lambda s: _set(s, "pos_embed", np.roll(s["pos_embed"], 32, axis=-1)), dict(num_heads=4),
         "not rfdit's fixed 2-D sin-cos table"),
        (lambda s: _set(s, "final_layer.linear.weight", np.zeros((32, 48), np.float32)), dict(num_heads=4),
         "decoder_hidden_size = 48"),
        (lambda s: _set(s, "blocks.1.attn.extra.weight", np.zeros(3, np.float32)), dict(num_heads=4),
         "unexpected blocks.1.attn.extra.weight"),
        (lambda s: _set(s, "blocks.1.mlp.fc2.bias", np.full(64, np.inf, np.float32)), dict(num_heads=4),
         "non-finite.*blocks.1.mlp.fc2.bias"),
        (lambda s: s, dict(num_heads=4, args=dict(num_classes=11)), "no null label"),
        (lambda s: s, dict(num_heads=4, args=dict(path_type="GVP", prediction="velocity")), "linear path"),
        (lambda s: s, dict(args=dict(model="SiT-XL/2")), "args.model"),
        (lambda s: s, dict(num_heads=4, image_size=16), "image_size \\(=16\\) disagrees"),
    ],
)
def test_import_refuses_with_clear_errors(getkey, mutate, kwargs, message):
    kwargs = {"format": "sit", **kwargs}
    with pytest.raises(ValueError, match=message):
        convert_state_dict(mutate(small_state(getkey())), kwargs.pop("format"), **kwargs)
