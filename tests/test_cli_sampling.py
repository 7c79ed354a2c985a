"""Sampling and FID command-line tools (sample.py, fid_stats.py, eval_fid.py) and rfdit.generation behind them.

One tiny digits run (20 steps) is trained once for the module. The FID tests use random Inception weights
on a handful of images: the Inception costs ~0.45 s per image on a 2-core CPU, and scipy's square root of a
2048² matrix (the Fréchet distance) ~70 s, so the CLI tests swap `frechet_distance` for a recorder; its
numerics are tested against independent references in test_fid.py.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import rfdit
from rfdit.sampling import SolveFailed
from rfdit import generation
from rfdit.checkpoint import export_model
from rfdit.generation import INCEPTION_ID, resolve_sampler, vae_source
from rfdit.nn.vae import StableVAE, VAEConfig

from helpers import load_script

NUM_FID_IMAGES = "4"  # Inception images per FID test: enough for a covariance, cheap on a CPU


@pytest.fixture(scope="module")
def digits_run(tiny_digits_run):
    return tiny_digits_run[0]


@pytest.fixture(scope="module")
def random_reference(tmp_path_factory):
    """Reference statistics of digits under random Inception weights, made by fid_stats.py."""
    out = tmp_path_factory.mktemp("fid_stats") / "digits_random.npz"
    with jax.numpy_dtype_promotion("strict"):
        summary = load_script("fid_stats").main(
            ["--dataset_name", "digits", "--out", str(out), "--num_images", NUM_FID_IMAGES, "--batch_size",
             NUM_FID_IMAGES, "--random_inception"]
        )
    return out, summary


class RecordingFrechet:
    """Stands in for frechet_distance: records its inputs, returns the mean term ‖mu1 - mu2‖²."""

    def __init__(self):
        self.calls = []

    def __call__(self, mu1, sigma1, mu2, sigma2):
        self.calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((np.asarray(mu1) - np.asarray(mu2)) ** 2))


@pytest.fixture(scope="module")
def digits_model(digits_run):
    """The digits run's EMA model, loaded once (from its export)."""
    model, _, vae = generation.load_for_sampling(digits_run / "export")
    assert vae is None
    return model


@pytest.fixture(scope="module")
def latent_assets(tmp_path_factory):
    """A tiny random latent DiT (4×4×4 latents, 3 classes) and a tiny random VAE saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("latent")
    model_key, vae_key = jr.split(jr.key(3))
    cfg = rfdit.DiTConfig(image_size=4, in_channels=4, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                          mlp_ratio=2.0, num_classes=3)
    vae_cfg = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4)
    # One compiled initialisation each instead of dozens of eager per-shape compiles.
    model = eqx.filter_jit(lambda key: rfdit.DiT(cfg, key=key))(model_key)
    vae = eqx.filter_jit(lambda key: StableVAE.random(vae_cfg, key=key))(vae_key)
    vae.save_pretrained(folder / "vae")
    return model, vae, folder / "vae"


# --- sample.py ----------------------------------------------------------------------------------------------------


def test_sample_cli_run_folder_writes_grid_npz_and_nfe(digits_run, tmp_path, capsys):
    out = tmp_path / "euler"
    report = load_script("sample").main(
        ["--load_dir", str(digits_run), "--labels", "0", "1", "2", "9", "--solver", "euler", "--num_steps", "8",
         "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "NFE per batch: 8" in printed and "time taken" in printed
    with np.load(out / "samples.npz") as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.float32
    assert np.abs(images).max() <= 1.0 and np.isfinite(images).all()
    np.testing.assert_array_equal(labels, [0, 1, 2, 9])
    assert (out / "grid.png").is_file()
    saved = json.loads((out / "sample.json").read_text())
    assert saved["nfe_per_batch"] == [8] and report["nfe_total"] == 8


def test_sample_cli_stops_a_solve_that_runs_out_of_steps_and_takes_controller_settings(digits_run, tmp_path):
    sample = load_script("sample")
    base = ["--load_dir", str(digits_run / "checkpoints"), "--num_samples", "4", "--solver", "dopri5",
            "--batch_size", "4"]
    with pytest.raises(SolveFailed, match=r"dopri5 solve \(rtol=1e-13, atol=1e-13, max_steps=3\) stopped before t=1"):
        sample.main(base + ["--rtol", "1e-13", "--atol", "1e-13", "--max_steps", "3", "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()  # nothing written for a failed solve
    report = sample.main(base + ["--rtol", "1e-2", "--pcoeff", "0.3", "--icoeff", "0.4", "--dtmax", "0.05",
                                "--out", str(tmp_path / "b")])
    assert report["sampler"]["pcoeff"] == 0.3 and report["sampler"]["dtmax"] == 0.05
    assert report["nfe_total"] >= 6 * 20 + 1  # dtmax 0.05: at least 20 steps of Dopri5's 6 new stages


def test_sample_cli_sde_is_independent_of_the_batch(digits_run, tmp_path):
    sample = load_script("sample")
    args = ["--load_dir", str(digits_run / "checkpoints"), "--labels", "0", "1", "2", "3", "--solver", "euler",
            "--num_steps", "7", "--diffusion", "sigma", "--last_step", "mean", "--last_step_size", "0.04"]
    whole = sample.main(args + ["--batch_size", "4", "--out", str(tmp_path / "whole")])
    halves = sample.main(args + ["--batch_size", "2", "--out", str(tmp_path / "halves")])
    assert whole["nfe_per_batch"] == [8] and halves["nfe_per_batch"] == [8, 8]  # 7 Euler-Maruyama steps + the last
    assert whole["sampler"]["diffusion"] == "sigma" and whole["sampler"]["last_step"] == "mean"
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(tmp_path / "halves" / "samples.npz") as b:
        np.testing.assert_allclose(a["images"], b["images"], atol=1e-6)  # each sample's own noise and path
    sample.main(args[:-6] + ["--batch_size", "4", "--out", str(tmp_path / "ode")])
    with np.load(tmp_path / "whole" / "samples.npz") as a, np.load(tmp_path / "ode" / "samples.npz") as b:
        assert np.abs(a["images"] - b["images"]).max() > 0.1


def test_sample_cli_dopri5_adaptive_reports_nfe(digits_run, tmp_path, capsys):
    report = load_script("sample").main(
        ["--load_dir", str(digits_run / "checkpoints"), "--num_samples", "6", "--solver", "dopri5", "--rtol", "1e-2",
         "--cfg_scale", "1.5", "--batch_size", "4", "--out", str(tmp_path / "dopri5")]
    )
    printed = capsys.readouterr().out
    nfe = report["nfe_per_batch"]
    assert len(nfe) == 2 and report["nfe_total"] == sum(nfe)
    # Dopri5 is FSAL with 7 stages: one evaluation at the start, then 6 per attempted step.
    assert all(n > 1 and (n - 1) % 6 == 0 for n in nfe)
    assert f"total NFE {sum(nfe)}" in printed
    assert report["sampler"] == rfdit.SamplerConfig(solver="dopri5", num_steps=None, rtol=0.01, atol=0.01,
                                                    cfg_scale=1.5).to_dict()
    assert report["labels"] == "uniform over 10 classes"


def test_sample_cli_export_folder_matches_run_folder(digits_run, tmp_path):
    script = load_script("sample")
    args = ["--num_samples", "4", "--solver", "euler", "--num_steps", "8"]
    script.main(["--load_dir", str(digits_run), *args, "--out", str(tmp_path / "run")])
    script.main(["--load_dir", str(digits_run / "export"), *args, "--out", str(tmp_path / "export")])
    with np.load(tmp_path / "run" / "samples.npz") as a, np.load(tmp_path / "export" / "samples.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])  # the export holds the same EMA weights


def test_sample_cli_refuses_labels_with_num_samples_and_bad_labels(digits_run, tmp_path):
    script = load_script("sample")
    with pytest.raises(ValueError, match="not both"):
        script.main(["--load_dir", str(digits_run), "--labels", "1", "--num_samples", "3"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        script.main(["--load_dir", str(digits_run), "--labels", "10", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="euler has no error estimate"):
        script.main(["--load_dir", str(digits_run), "--rtol", "1e-3", "--solver", "euler"])
    with pytest.raises(ValueError, match="pixel space"):
        script.main(["--load_dir", str(digits_run), "--vae", str(tmp_path)])


def test_generate_padded_batches_match_one_solve(digits_model):
    labels = np.asarray([3, 1, 4, 1, 5], np.int32)
    images, stats = generation.generate(digits_model, labels=labels, key=jr.key(7), solver="euler", num_steps=8,
                                        cfg_scale=1.0, batch_size=4, progress=False)  # 4 + 1 padded to 4
    assert images.shape == (5, 8, 8, 1) and stats["nfe_per_batch"] == [8, 8] and stats["nfe_total"] == 16
    # Sample i starts from normal(fold_in(key, i)) whatever the batching: one solve of all five agrees.
    noise = jnp.stack([jr.normal(jr.fold_in(jr.key(7), i), (8, 8, 1)) for i in range(5)])
    direct, _ = rfdit.sample(digits_model, noise, jnp.asarray(labels), cfg_scale=1.0, num_steps=8)
    np.testing.assert_allclose(images, np.clip(np.asarray(direct), -1, 1), atol=1e-6)


def test_resolve_sampler_explicit_beats_saved_beats_default():
    saved = {"sampler": {"solver": "heun", "num_steps": 12, "rtol": None, "atol": None, "cfg_scale": 1.5,
                         "time_shift": 2.0}}
    assert resolve_sampler(saved) == rfdit.SamplerConfig(solver="heun", num_steps=12, cfg_scale=1.5, time_shift=2.0)
    assert resolve_sampler({}) == rfdit.SamplerConfig(solver="euler", num_steps=32, cfg_scale=1.0, time_shift=1.0)
    adaptive = resolve_sampler(saved, solver="dopri5", atol=1e-6, cfg_scale=0)
    assert (adaptive.num_steps, adaptive.rtol, adaptive.atol, adaptive.cfg_scale, adaptive.time_shift) == (
        None, 1e-6, 1e-6, 0.0, 1.0)
    with pytest.raises(ValueError, match="not both"):
        resolve_sampler(saved, num_steps=8, rtol=1e-3)
    with pytest.raises(ValueError, match="fixed-step grids only"):
        resolve_sampler(saved, solver="tsit5", rtol=1e-3, time_shift=3.0)
    with pytest.raises(ValueError, match="valid solvers"):
        resolve_sampler(saved, solver="rk4")
    # the guidance interval and channels and the SDE's settings: explicit, else saved, else the default
    sde = rfdit.SamplerConfig(solver="shark", num_steps=20, guidance_interval=(0.2, 0.8), cfg_channels=3,
                              diffusion="sigma", diffusion_norm=0.5, last_step="mean", last_step_size=0.02)
    restored = {"sampler": json.loads(json.dumps(sde.to_dict()))}
    assert resolve_sampler(restored) == sde
    assert resolve_sampler(restored, guidance_interval=(0.1, 0.9), cfg_channels=1, diffusion_norm=2.0) == \
        sde.replace(guidance_interval=(0.1, 0.9), cfg_channels=1, diffusion_norm=2.0)


def test_vae_source_reads_config_key_names():
    assert vae_source({"model": {}}) == (False, None)
    assert vae_source({"use_stable_vae": True, "vae_path": "w/vae"}) == (True, "w/vae")  # a checkpoint's run config
    assert vae_source({"run": {"use_stable_vae": True, "vae_path": None}}) == (True, None)  # a training export
    assert vae_source({"vae": "stabilityai/sd-vae-ft-ema"}) == (True, "stabilityai/sd-vae-ft-ema")  # an import
    assert vae_source({"vae": {"hub_id": "stabilityai/sd-vae-ft-mse"}}) == (True, "stabilityai/sd-vae-ft-mse")


def test_generate_rejects_bad_guidance_options(digits_model):
    model = digits_model
    kwargs = dict(labels=np.zeros(2, np.int32), key=jr.key(0), solver="euler", num_steps=2, cfg_scale=2.0,
                  batch_size=2, progress=False)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        generation.generate(model, guidance_interval=(0.7, 0.3), **kwargs)
    with pytest.raises(ValueError, match=r"cfg_channels \(=3\) must lie in \[1, 1\]"):
        generation.generate(model, cfg_channels=3, **kwargs)


# --- latent models ------------------------------------------------------------------------------------------------


def test_sample_cli_latent_export_decodes_through_vae(latent_assets, tmp_path, capsys):
    model, vae, vae_dir = latent_assets
    export_model(model, tmp_path / "export", extra={"vae": str(vae_dir)})  # the key an imported export uses
    out = tmp_path / "samples"
    report = load_script("sample").main(
        ["--load_dir", str(tmp_path / "export"), "--labels", "0", "1", "2", "--cfg_scale", "2.0", "--cfg_channels",
         "3", "--guidance_interval", "0.3", "1.0", "--num_steps", "3", "--seed", "5", "--out", str(out)]
    )
    assert "NFE per batch: 3" in capsys.readouterr().out
    with np.load(out / "samples.npz") as data:
        images = data["images"]
    assert images.shape == (3, 8, 8, 3) and report["vae"] == "from the config"
    # Independently: the same noise through rfdit.sample, then the VAE's decoder, then clipping.
    _, noise_key = jr.split(jr.key(5))
    noise = jnp.stack([jr.normal(jr.fold_in(noise_key, i), (4, 4, 4)) for i in range(3)])
    latents, _ = rfdit.sample(model, noise, jnp.asarray([0, 1, 2]), cfg_scale=jnp.asarray(2.0), num_steps=3,
                              guidance_interval=(0.3, 1.0), cfg_channels=3)
    np.testing.assert_allclose(images, np.clip(np.asarray(vae.decode(latents)), -1, 1), atol=1e-5)


def test_load_for_sampling_latent_without_vae_is_a_clear_error(latent_assets, tmp_path):
    model, _, vae_dir = latent_assets
    export_model(model, tmp_path / "export", extra={"run": {"use_stable_vae": True, "vae_path": None}})
    with pytest.raises(ValueError, match="names no VAE; pass --vae"):
        generation.load_for_sampling(tmp_path / "export")
    export_model(model, tmp_path / "imported", extra={"import": {"format": "sit"}})  # 4 channels, no VAE named
    with pytest.raises(ValueError, match="names no VAE; pass --vae"):
        generation.load_for_sampling(tmp_path / "imported")
    _, _, vae = generation.load_for_sampling(tmp_path / "export", vae=vae_dir)  # --vae fills the gap
    assert vae.config.latent_channels == 4


# --- FID ----------------------------------------------------------------------------------------------------------


def test_fid_stats_cli_digits_random_inception(random_reference):
    path, summary = random_reference
    with np.load(path) as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert str(data["feature_extractor"]) == "random-inception-seed0" and int(data["num_images"]) == 4
        np.testing.assert_array_equal(data["sigma"], data["sigma"].T)
    assert summary["feature_extractor"] == "random-inception-seed0"
    mu, sigma = rfdit.metrics.load_statistics(path)  # reads as any ADM-style npz
    assert np.isfinite(mu).all() and np.trace(sigma) > 0
    with pytest.raises(ValueError, match="across feature extractors"):
        generation.load_reference(path, INCEPTION_ID)  # never compared with real Inception features


def test_eval_fid_cli_smoke_random_inception_is_labelled(digits_run, random_reference, tmp_path, monkeypatch,
                                                         capsys):
    reference, _ = random_reference
    script = load_script("eval_fid")
    recorder = RecordingFrechet()
    monkeypatch.setattr(script, "frechet_distance", recorder)
    out = tmp_path / "fid"
    report = script.main(
        ["--load_dir", str(digits_run), "--fid_stats", str(reference), "--random_inception", "--num_samples",
         NUM_FID_IMAGES, "--batch_size", NUM_FID_IMAGES, "--denoise_timesteps", "8", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "RANDOM Inception weights, NOT comparable" in printed and "NFE per batch: 8" in printed
    saved = json.loads((out / "fid.json").read_text())
    assert saved["comparable_with_published"] is False and "NOT comparable" in saved["warning"]
    assert saved["fid"] == report["fid"] and saved["nfe_total"] == 8 and saved["images_per_s"] > 0

    # Frechet got the saved sample statistics and the reference, in that order.
    (mu1, sigma1, mu2, sigma2), = recorder.calls
    with np.load(out / "sample_stats.npz") as data:
        np.testing.assert_array_equal(data["mu"], mu1)
        np.testing.assert_array_equal(data["sigma"], sigma1)
        assert str(data["feature_extractor"]) == "random-inception-seed0"
    np.testing.assert_array_equal(rfdit.metrics.load_statistics(reference)[0], mu2)

    # The statistics are of the samples as generated, in [-1, 1] (no `2x - 1`): sample.py with the same seed
    # draws the same labels and noise, and its images' features average to the same mu.
    load_script("sample").main(["--load_dir", str(digits_run), "--num_samples", NUM_FID_IMAGES, "--num_steps", "8",
                                "--out", str(tmp_path / "same")])
    with np.load(tmp_path / "same" / "samples.npz") as data:
        images = data["images"]
    features, _ = generation.inception_features(random_seed=0)
    np.testing.assert_allclose(np.asarray(features(images)).mean(axis=0), mu1, rtol=1e-4, atol=1e-4)


def test_eval_fid_cli_without_fid_stats_uses_the_run_data_set(digits_run, random_reference, tmp_path, monkeypatch):
    reference, _ = random_reference
    script = load_script("eval_fid")
    recorder = RecordingFrechet()
    monkeypatch.setattr(script, "frechet_distance", recorder)
    report = script.main(
        ["--load_dir", str(digits_run), "--random_inception", "--num_samples", NUM_FID_IMAGES, "--denoise_timesteps",
         "8", "--out", str(tmp_path)]
    )
    assert report["reference"].startswith("digits training images (4)")
    # The same first training batch as fid_stats.py's (seed 0, batch 4), so the same statistics.
    with np.load(tmp_path / "reference_stats.npz") as computed, np.load(reference) as made:
        np.testing.assert_allclose(computed["mu"], made["mu"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(computed["mu"], recorder.calls[0][2])


def test_generation_and_fid_stop_a_solve_that_runs_out_of_steps(digits_run, digits_model, random_reference,
                                                                tmp_path):
    exhausted = rfdit.SamplerConfig(solver="dopri5", num_steps=None, rtol=1e-13, atol=1e-13, max_steps=3)
    message = r"dopri5 solve \(rtol=1e-13, atol=1e-13, max_steps=3\) stopped before t=1"
    with pytest.raises(SolveFailed, match=message):  # what sample.py, the run's evaluation and FID call
        generation.generate(digits_model, labels=np.arange(4), key=jr.key(0), batch_size=4,
                            **generation.generate_kwargs(exhausted))
    features, _ = generation.inception_features(random_seed=0)
    with pytest.raises(SolveFailed, match=message):  # FID at the run's eval intervals
        generation.fid_during_training(digits_model, random_reference[0], sampler=exhausted, num_samples=4,
                                       batch_size=4, key=jr.key(0), feature_fn=features)
    with pytest.raises(SolveFailed, match=message):
        load_script("eval_fid").main(
            ["--load_dir", str(digits_run), "--fid_stats", str(random_reference[0]), "--random_inception",
             "--num_samples", "4", "--batch_size", "4", "--solver", "dopri5", "--rtol", "1e-13", "--atol", "1e-13",
             "--max_steps", "3", "--out", str(tmp_path / "fid")])
    assert not (tmp_path / "fid" / "fid.json").exists()


def test_fid_during_training_uses_the_given_sampler(digits_model, random_reference, monkeypatch):
    reference, _ = random_reference
    recorder = RecordingFrechet()
    monkeypatch.setattr(generation, "frechet_distance", recorder)
    features, _ = generation.inception_features(random_seed=0)
    figures = generation.fid_during_training(digits_model, reference, sampler=rfdit.SamplerConfig(num_steps=8),
                                             num_samples=int(NUM_FID_IMAGES), batch_size=int(NUM_FID_IMAGES),
                                             key=jr.key(0), feature_fn=features)
    assert set(figures) == {"fid", "fid_num_samples", "fid_nfe", "fid_time_s"}
    assert figures["fid_nfe"] == 8 and figures["fid_num_samples"] == 4 and figures["fid"] >= 0
    assert len(recorder.calls) == 1
