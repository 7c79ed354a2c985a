import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rfdit.checkpoint import Checkpointer, CheckpointError
from rfdit.experiment import main, parse_args, resolve

ROOT = pathlib.Path(__file__).resolve().parent.parent
from conftest import TINY_RUN as TINY


def resolved(*argv):
    return resolve(parse_args(list(argv)))


def test_flags_original_commands_parse():
    run = resolved("--dataset_name", "cifar10", "--batch_size", "128", "--model.preset", "big",
                   "--model.patch_size", "8", "--model.use_stable_vae", "0")
    assert run.model.patch_size == 8 and run.model.hidden_size == 768  # the flag beats the preset
    assert run.model.num_classes == 10 and run.model.image_size == 32 and not run.data.use_stable_vae
    run = resolved("--dataset_name", "imagenet256", "--wandb.name", "DiT-B", "--model.depth", "12",
                   "--model.hidden_size", "768", "--model.patch_size", "2", "--model.num_heads", "16",
                   "--model.mlp_ratio", "4", "--batch_size", "512")
    assert run.data.use_stable_vae and (run.model.image_size, run.model.in_channels) == (32, 4)
    assert run.model.num_heads == 16 and run.wandb["name"] == "DiT-B"
    run = resolved("--dataset_name", "celebahq256", "--model.patch_size", "8", "--use_stable_vae", "0")
    assert not run.data.use_stable_vae and (run.model.image_size, run.model.in_channels) == (256, 3)


def test_flags_defaults_come_from_the_data_set():
    run = resolved()
    assert run.data.name == "digits" and run.model.image_size == 8 and run.model.in_channels == 1
    assert run.model.patch_size == 2 and run.model.num_classes == 10
    assert run.flow.t_sampler == "uniform" and run.optimizer.lr == 1e-3 and run.optimizer.ema_warmup  # digits' own
    cifar = resolved("--dataset_name", "cifar10")
    assert cifar.flow.t_sampler == "log-normal" and cifar.optimizer.lr == 1e-4  # the original's defaults
    assert resolved("--model.lr", "3e-4").optimizer.lr == 3e-4
    assert resolved("--model.num_classes", "12").model.num_classes == 12
    assert resolved("--model.preset", "debug").model.patch_size == 8  # preset beats the data set's default


def test_flags_bad_values_list_choices(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model.use_stable_vae", "3"])
    assert "Expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model.preset", "huge"])
    assert "debug" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model.lrr", "1"])
    assert "--model.lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="patch_size \\(=3\\) must divide image_size \\(=8\\)"):
        resolved("--model.patch_size", "3")


def test_flags_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ["--dataset_name", "--batch_size", "--max_steps", "--seed", "--log_interval", "--eval_interval",
                 "--save_interval", "--save_dir", "--load_dir", "--fid_stats", "--debug_overfit", "--model.preset",
                 "--model.lr", "--model.beta1", "--model.beta2", "--model.hidden_size", "--model.patch_size",
                 "--model.depth", "--model.num_heads", "--model.mlp_ratio", "--model.class_dropout_prob",
                 "--model.num_classes", "--model.denoise_timesteps", "--model.cfg_scale",
                 "--model.target_update_rate", "--model.t_sampler", "--model.t_conditioning",
                 "--model.use_stable_vae", "--wandb.project", "--wandb.name", "--wandb.mode", "--dry_run"]:
        assert flag in text, flag


def test_dry_run_prints_resolved_config(capsys):
    main(["--dataset_name", "cifar10", "--batch_size", "128", "--model.preset", "big", "--model.patch_size", "8",
          "--model.use_stable_vae", "0", "--dry_run"])
    config = json.loads(capsys.readouterr().out)
    assert config["model"]["patch_size"] == 8 and config["batch_size"] == 128
    assert config["attention"] is None  # the backend's default
    assert config["residual_dtype"] == "float32"  # as under PyTorch's autocast
    main(["--attention", "xla", "--residual_dtype", "bfloat16", "--dry_run"])
    config = json.loads(capsys.readouterr().out)
    assert config["attention"] == "xla" and config["residual_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):  # not one of the implementations: the parser says which are
        main(["--attention", "flash", "--dry_run"])


@pytest.fixture(scope="session")
def smoke_run(tiny_digits_run):
    return tiny_digits_run


def test_cli_smoke_run_leaves_the_documented_layout(smoke_run):
    run_dir, summary = smoke_run
    for name in ["config.json", "metrics.jsonl", "samples.npz", "eval.json", "export/model.safetensors",
                 "export/config.json", "grids/loss_curve.png"]:
        assert (run_dir / name).is_file(), name
    assert any(run_dir.glob("grids/*_cfg0_steps1.png")) and any(run_dir.glob("grids/*reconstructions.png"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()
    samples = np.load(run_dir / "samples.npz")
    assert samples["images"].shape == (90, 8, 8, 1) and samples["labels"].tolist() == [i % 10 for i in range(90)]
    report = json.loads((run_dir / "eval.json").read_text())  # three sets of 30, averaged
    assert {"class_acc", "fd_feat", "precision", "recall", "references", "std"} <= set(report)
    assert len(report["per_set"]) == 3
    assert report["recall"] == pytest.approx(np.mean([r["recall"] for r in report["per_set"]]))
    export = json.loads((run_dir / "export/config.json").read_text())
    assert export["format"] == "rfdit-export" and export["version"] >= 1 and export["model"]["patch_size"] == 2
    with Checkpointer(run_dir / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == 20


def export_tensors(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(pathlib.Path(run_dir) / "export" / "model.safetensors"))


def test_resume_is_bit_exact(tmp_path):
    common = TINY + ["--steps_per_call", "5", "--log_interval", "5", "--num_samples", "0", "--seed", "3"]
    main(common + ["--max_steps", "20", "--save_dir", str(tmp_path / "full")])
    main(common + ["--max_steps", "10", "--save_dir", str(tmp_path / "half")])
    main(common + ["--max_steps", "20", "--save_dir", str(tmp_path / "resumed"), "--load_dir", str(tmp_path / "half")])
    full, resumed = export_tensors(tmp_path / "full"), export_tensors(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert np.array_equal(full[name], resumed[name]), name
    # the raw model, the optimizer state and the key (not only the EMA) are identical too
    with Checkpointer(tmp_path / "full" / "checkpoints", read_only=True) as a, \
            Checkpointer(tmp_path / "resumed" / "checkpoints", read_only=True) as b:
        state_a, state_b = a.restore_named(), b.restore_named()
    assert state_a.keys() == state_b.keys() and any(name.startswith("opt_state") for name in state_a)
    for name in state_a:
        assert np.array_equal(state_a[name], state_b[name]), name


def test_resume_rejects_a_mismatched_config(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    with pytest.raises(CheckpointError, match="Pass the same flags"):
        main(TINY + ["--model.hidden_size", "64", "--max_steps", "30", "--steps_per_call", "5",
                     "--save_dir", str(tmp_path), "--load_dir", str(run_dir)])


def tree_snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_corrupt_checkpoint_gives_clear_error_and_touches_nothing(smoke_run, tmp_path):
    import shutil

    run_dir, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    for f in (copy / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d" and "arrays" in str(f):
            f.write_bytes(b"\x00garbage" * 4)
    before = tree_snapshot(copy)
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        main(TINY + ["--max_steps", "40", "--steps_per_call", "5", "--save_dir", str(tmp_path / "new"),
                     "--load_dir", str(copy)])
    assert tree_snapshot(copy) == before
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        main(TINY + ["--max_steps", "40", "--save_dir", str(tmp_path / "new2"), "--load_dir",
                     str(tmp_path / "missing")])


KILL_DURING_SAVE = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp
    from rfdit.checkpoint import Checkpointer
    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, {"w": jnp.arange(1000.0)}, {"note": "good"})
    rename = os.rename
    def stall(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)).isdigit():  # the commit of a step folder: hang there
            print("committing", flush=True)
            time.sleep(600)
        return rename(src, dst, *args, **kwargs)
    os.rename = stall
    checkpointer.save(2, {"w": jnp.arange(1000.0) * 2}, {"note": "interrupted"})
""")


def test_kill_during_save_keeps_the_last_good_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(directory)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert child.stdout.readline().strip() == "committing"
    child.kill()
    child.wait()
    assert any(p.name.startswith("2.") for p in directory.iterdir())  # the half-written step is there...
    import jax.numpy as jnp

    with Checkpointer(directory, read_only=True) as checkpointer:
        assert checkpointer.latest_step() == 1  # ...but never counts as a checkpoint
        state, meta = checkpointer.restore({"w": jnp.zeros(1000)})
    assert meta["note"] == "good" and float(state["w"][-1]) == 999.0


def test_sigterm_saves_and_exits_143(tmp_path):
    argv = TINY + ["--max_steps", "100000", "--steps_per_call", "5", "--log_interval", "5", "--num_samples", "0",
                   "--save_dir", str(tmp_path)]
    child = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "train_flow.py"), *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, output  # so that `train && sample` stops here
    assert "stopped by signal" in output and f"--load_dir {tmp_path}" in output
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as checkpointer:
        step = checkpointer.latest_step()
    assert step is not None and step % 5 == 0 and 0 < step < 100000


def test_digits_evaluator_references_are_ordered():
    from rfdit.metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator()
    refs = evaluator.references
    noise = evaluator.evaluate(np.random.default_rng(0).uniform(-1, 1, (500, 8, 8, 1)), np.arange(500) % 10)
    floor, gaussian = refs["real_train"], refs["gaussian_per_class"]
    assert floor["fd_feat"] < gaussian["fd_feat"] < noise["fd_feat"]
    assert floor["recall"] > gaussian["recall"] > noise["recall"]
    assert floor["class_acc"] > 0.97 and noise["class_acc"] < 0.2
    assert evaluator.test_accuracy > 0.95  # the classifier itself is good on held-out real digits


@pytest.fixture(scope="session")
def tiny_vae_folder(tmp_path_factory):
    """A random VAE in diffusers' format: 8×8×1 digits become 4×4×4 latents."""
    import jax.random as jr

    from rfdit.nn.vae import StableVAE, VAEConfig

    config = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       latent_channels=4, norm_num_groups=4, sample_size=8)
    return StableVAE.random(config, key=jr.key(0)).save_pretrained(tmp_path_factory.mktemp("vae"))


def test_latent_space_cli_run(tiny_vae_folder, tmp_path):
    summary = main(TINY + ["--max_steps", "10", "--steps_per_call", "5", "--log_interval", "5", "--num_samples", "20",
                           "--model.use_stable_vae", "1", "--model.vae_path", str(tiny_vae_folder),
                           "--save_dir", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_stable_vae"] and (config["model"]["image_size"], config["model"]["in_channels"]) == (4, 4)
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (20, 8, 8, 1)  # decoded to pixels
    assert any(tmp_path.glob("grids/*_cfg1_steps4.png")) and summary["step"] == 10


def test_extracted_latents_train_through_the_cli(tiny_vae_folder, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_latents", ROOT / "experiments" / "extract_latents.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["extract_latents"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    out = module.main(["--dataset_name", "digits", "--vae", str(tiny_vae_folder), "--out", str(tmp_path / "lat"),
                       "--batch_size", "64", "--num_images", "256"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 256 and meta["latent_shape"] == [4, 4, 4] and meta["num_classes"] == 10
    mean, std = np.load(out / "mean.npy"), np.load(out / "std.npy")
    assert mean.shape == std.shape == (256, 4, 4, 4) and (std > 0).all()
    main(TINY + ["--dataset_name", "latents", "--dataset_path", str(out), "--max_steps", "10", "--steps_per_call",
                 "5", "--log_interval", "5", "--num_samples", "20", "--save_dir", str(tmp_path / "run")])
    samples = np.load(tmp_path / "run" / "samples.npz")
    assert samples["images"].shape == (20, 8, 8, 1)  # decoded with the VAE named in meta.json


def test_fid_at_eval_intervals_uses_the_run_sampler(tmp_path, monkeypatch):
    import rfdit.run.evaluation
    import rfdit.run.parts

    calls = []

    def fid(model, path, **kwargs):
        calls.append((path, kwargs))
        return {"fid": 1.0, "fid_num_samples": kwargs["num_samples"]}

    monkeypatch.setattr(rfdit.run.parts, "inception_features", lambda: None)  # no Inception weights offline
    monkeypatch.setattr(rfdit.run.evaluation, "fid_during_training", fid)
    reference = tmp_path / "reference.npz"
    np.savez(reference, mu=np.zeros(4), sigma=np.eye(4))
    main(TINY + ["--max_steps", "10", "--steps_per_call", "5", "--eval_interval", "5", "--num_samples", "0",
                 "--fid_stats", str(reference), "--save_dir", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval/fid"]) for r in rows if "eval/fid" in r] == [(5, 1.0)]  # not at the end: no samples
    assert any("eval/class_acc" in r for r in rows)
    (path, kwargs), = calls
    assert path == str(reference) and kwargs["sampler"].num_steps == 4 and kwargs["batch_size"] == 32
