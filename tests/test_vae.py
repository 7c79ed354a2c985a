import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rfdit.nn import count_params
from rfdit.nn.vae import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, AutoencoderKL, StableVAE, VAEConfig
from helpers import relative_error, require

# float32 on both sides; only the summation order of convs and matmuls differs (oneDNN vs XLA), which leaves
# ~1e-6 relative error through these stacks, while any layout or wiring mistake gives O(1). 1e-4 is the
# issue's bar and keeps a wide margin for other CPUs.
PARITY_RTOL = 1e-4

# Two deliberately different small configs: square RGB with SD's 1-layer-per-block shape, and a non-square,
# 3-block, 2-layer VAE with unequal in/out channels and its own scaling factor (so H/W or in/out mix-ups show).
PARITY_CONFIGS = [
    dict(config=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8), image_shape=(2, 16, 16, 3)),
    dict(
        config=dict(block_out_channels=(8, 16, 24), layers_per_block=2, norm_num_groups=4, in_channels=4,
                    out_channels=2, latent_channels=3, scaling_factor=0.5),
        image_shape=(2, 24, 16, 4),
    ),
    # the options the SD VAEs leave on, turned off, in a single block (no downsampling at all)
    dict(
        config=dict(block_out_channels=(8,), norm_num_groups=2, mid_block_add_attention=False, use_quant_conv=False,
                    use_post_quant_conv=False),
        image_shape=(1, 8, 8, 3),
    ),
]

# config.json of stabilityai/sd-vae-ft-mse and -ema as published (written by diffusers 0.4.2: no scaling_factor)
SD_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def diffusers_vae(seed: int, **config):
    """A random diffusers AutoencoderKL whose GroupNorm affines are perturbed away from (1, 0)."""
    torch = require("torch", "the diffusers parity tests run diffusers' PyTorch model")
    diffusers = require("diffusers", "the parity tests compare against diffusers")
    num_blocks = len(config["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * num_blocks, up_block_types=("UpDecoderBlock2D",) * num_blocks,
        **config,
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # default init makes every norm the identity; parity would not see a swap
                param.add_(0.3 * torch.randn_like(param))
    return model


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def nchw(x):
    import torch

    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("case", PARITY_CONFIGS, ids=["rgb-2blocks", "nonsquare-3blocks", "1block-no-attention"])
def test_autoencoderkl_matches_diffusers(case, tmp_path):
    torch = require("torch", "the diffusers parity tests run diffusers' PyTorch model")

    reference = diffusers_vae(0, **case["config"])
    reference.save_pretrained(tmp_path)
    vae = StableVAE.from_pretrained(tmp_path)
    x = images(case["image_shape"])

    with torch.no_grad():
        posterior = reference.encode(nchw(x)).latent_dist
        ref_mean, ref_logvar = nhwc(posterior.mean), nhwc(posterior.logvar)
        ref_images = nhwc(reference.decode(posterior.mean).sample)
    mean, logvar = eqx.filter_jit(lambda model, x: jax.vmap(model.encode_moments)(x))(vae.model, x)
    assert relative_error(mean, ref_mean) < PARITY_RTOL
    assert relative_error(logvar, ref_logvar) < PARITY_RTOL

    scale = case["config"].get("scaling_factor", 0.18215)
    assert vae.config.scaling_factor == scale
    assert relative_error(vae.encode(x), scale * ref_mean) < PARITY_RTOL
    decoded = vae.decode(jnp.asarray(ref_mean) * scale)
    assert decoded.shape == case["image_shape"][:3] + (vae.config.out_channels,)
    assert relative_error(decoded, ref_images) < PARITY_RTOL


def test_stablevae_save_pretrained_loads_in_diffusers(tmp_path, getkey):
    import_diffusers = require("diffusers", "diffusers reads the saved folder")
    torch = require("torch", "diffusers runs on PyTorch")
    vae = StableVAE.random(TINY, key=getkey())
    vae.save_pretrained(tmp_path)
    reference = import_diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    x = images((1, 8, 8, 3))
    with torch.no_grad():
        ref_mean = nhwc(reference.encode(nchw(x)).latent_dist.mean)
        ref_images = nhwc(reference.decode(torch.from_numpy(ref_mean).permute(0, 3, 1, 2)).sample)
    assert relative_error(vae.encode(x), TINY.scaling_factor * ref_mean) < PARITY_RTOL
    assert relative_error(vae.decode(jnp.asarray(ref_mean) * TINY.scaling_factor), ref_images) < PARITY_RTOL


def test_autoencoderkl_full_sd_config_param_count():
    cfg = VAEConfig.from_diffusers_config(SD_VAE_CONFIG_JSON)
    assert cfg == VAEConfig.stable_diffusion()
    model = eqx.filter_eval_shape(AutoencoderKL, cfg, key=jr.key(0))
    assert count_params(model) == 83_653_863  # diffusers' AutoencoderKL with this config, counted by torch

    def roundtrip(x):
        vae = StableVAE.random(cfg, key=jr.key(0))
        latents = vae.encode(x)
        return latents, vae.decode(latents)

    latents, decoded = eqx.filter_eval_shape(roundtrip, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    assert latents.shape == (2, 32, 32, 4)
    assert decoded.shape == (2, 256, 256, 3)


def test_vaeconfig_diffusers_config_round_trip():
    cfg = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=3,
                    shift_factor=0.1, sample_size=(64, 48), mid_block_add_attention=False, use_quant_conv=False)
    assert VAEConfig.from_diffusers_config(json.loads(json.dumps(cfg.to_diffusers_config()))) == cfg
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "AttnDownEncoderBlock2D"),
        (dict(up_block_types=["UpDecoderBlock2D"]), "1 up_block_types but 2 block_out_channels"),
        (dict(act_fn="gelu"), "act_fn \\(='gelu'\\)"),
        (dict(norm_num_groups=3), "norm_num_groups \\(=3\\) must divide"),
        (dict(_class_name="UNet2DConditionModel"), "subfolder='vae'"),
    ],
)
def test_vaeconfig_rejects_unsupported_configs(changes, message):
    raw = {**TINY.to_diffusers_config(), **changes}
    with pytest.raises(ValueError, match=message):
        VAEConfig.from_diffusers_config(raw)


def test_vaeconfig_ignores_irrelevant_keys():
    raw = {**TINY.to_diffusers_config(), "force_upcast": False, "_name_or_path": "x", "latents_mean": None}
    assert VAEConfig.from_diffusers_config(raw) == TINY


def test_stablevae_without_mid_attention_and_quant_convs(getkey):
    cfg = TINY.replace(mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    vae = StableVAE.random(cfg, key=getkey())
    assert vae.model.quant_conv is None and vae.model.encoder.mid_block.attentions == ()
    assert vae.decode(vae.encode(images((1, 8, 8, 3)))).shape == (1, 8, 8, 3)


def test_stablevae_save_load_round_trip(tmp_path, getkey):
    vae = StableVAE.random(TINY, key=getkey())
    vae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert eqx.tree_equal(StableVAE.from_pretrained(tmp_path), vae)
    bf16 = StableVAE.from_pretrained(tmp_path, dtype="bfloat16")
    assert eqx.tree_equal(bf16, vae.with_compute_dtype("bfloat16"))
    assert bf16.model.decoder.mid_block.attentions[0].dtype == "bfloat16"


def test_stablevae_loads_legacy_attention_names_and_conv_weights(tmp_path, getkey):
    vae = StableVAE.random(TINY, key=getkey())
    vae.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, value in state.items():
        for new, old in old_names.items():
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # the 1x1-conv form
        legacy[name] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    save_file(legacy, str(tmp_path / WEIGHTS_NAME))
    assert eqx.tree_equal(StableVAE.from_pretrained(tmp_path), vae)


def test_stablevae_reads_bin_only_folder_with_torch(tmp_path, getkey):
    torch = require("torch", "reading a .bin needs torch")
    vae = StableVAE.random(TINY, key=getkey())
    vae.save_pretrained(tmp_path)
    state = {name: torch.from_numpy(value) for name, value in load_file(tmp_path / WEIGHTS_NAME).items()}
    torch.save(state, tmp_path / PICKLE_WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).unlink()
    assert eqx.tree_equal(StableVAE.from_pretrained(tmp_path), vae)


def test_stablevae_bin_only_folder_without_torch_errors(tmp_path, monkeypatch):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(TINY.to_diffusers_config()))
    (tmp_path / PICKLE_WEIGHTS_NAME).write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="torch is not installed.*diffusion_pytorch_model.safetensors"):
        StableVAE.from_pretrained(tmp_path)


def test_stablevae_hub_id_offline_errors_fast_with_folder_layout(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        StableVAE.from_pretrained("stabilityai/sd-vae-ft-ema")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message
    assert f"<folder>/{CONFIG_NAME}" in message and f"<folder>/{WEIGHTS_NAME}" in message
    assert "hf download stabilityai/sd-vae-ft-ema" in message


def test_stablevae_missing_and_unexpected_keys_error(tmp_path, getkey):
    StableVAE.random(TINY, key=getkey()).save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    del state["encoder.conv_in.bias"]
    state["encoder.conv_in.extra"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing encoder.conv_in.bias; unexpected encoder.conv_in.extra"):
        StableVAE.from_pretrained(tmp_path)


def test_stablevae_config_weights_mismatch_error(tmp_path, getkey):
    StableVAE.random(TINY, key=getkey()).save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(TINY.replace(latent_channels=8).to_diffusers_config()))
    with pytest.raises(ValueError, match="wrong shape.*encoder.conv_out.weight \\(expected \\(16, 16, 3, 3\\)"):
        StableVAE.from_pretrained(tmp_path)


def test_stablevae_corrupt_safetensors_error(tmp_path, getkey):
    StableVAE.random(TINY, key=getkey()).save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:200])  # an interrupted download
    with pytest.raises(ValueError, match="truncated or corrupt"):
        StableVAE.from_pretrained(tmp_path)


def test_stablevae_missing_folder_and_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No folder at"):
        StableVAE.from_pretrained(tmp_path / "nowhere" / "vae")
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}"):
        StableVAE.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(TINY.to_diffusers_config()))
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}"):
        StableVAE.from_pretrained(tmp_path)


def test_stablevae_encode_samples_with_key(getkey):
    vae = StableVAE.random(TINY, key=getkey())
    x = images((3, 8, 8, 3))
    mean, std = vae.encode_distribution(x)
    assert np.array_equal(vae.encode(x), mean)
    key = getkey()
    sample = vae.encode(x, key=key)
    assert np.array_equal(sample, vae.encode(x, key=key))
    assert not np.array_equal(sample, vae.encode(x, key=getkey()))
    noise = (sample - mean) / std  # standardised draws: about N(0, 1)
    assert abs(float(jnp.mean(noise))) < 0.3 and 0.7 < float(jnp.std(noise)) < 1.3
    assert bool(jnp.all(std > 0))


def test_stablevae_bfloat16_close_to_float32(getkey):
    vae = StableVAE.random(TINY, key=getkey())
    vae_bf16 = vae.with_compute_dtype("bfloat16")
    assert vae_bf16.model.encoder.conv_in.dtype == "bfloat16"
    x = images((2, 8, 8, 3))
    latents = vae.encode(x)
    # bf16 keeps 8 mantissa bits (~4e-3 per rounding), accumulated in float32 over a few layers
    assert relative_error(vae_bf16.encode(x), latents) < 3e-2
    assert relative_error(vae_bf16.decode(latents), vae.decode(latents)) < 3e-2


def test_stablevae_rejects_bad_shapes(getkey):
    vae = StableVAE.random(TINY, key=getkey())
    with pytest.raises(ValueError, match="must be divisible by the VAE's downsampling factor 2"):
        vae.encode(images((1, 9, 8, 3)))
    with pytest.raises(ValueError, match="decode expects latents \\(B, h, w, 4\\)"):
        vae.decode(jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="compute dtype"):
        vae.with_compute_dtype("float16")
