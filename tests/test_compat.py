"""Run folders, checkpoints and exports written by rfdit 0.1.0 still load, sample and resume, with the same numbers.

`tests/fixtures/run_v1` is a digits run that rfdit 0.1.0 wrote with

    python experiments/train_flow.py --batch_size 32 --model.hidden_size 16 --model.depth 1 --model.num_heads 2 \\
        --model.mlp_ratio 1 --model.denoise_timesteps 4 --eval_interval 100000 --save_interval 100000 \\
        --max_steps 10 --steps_per_call 5 --log_interval 5 --num_samples 10 --save_dir tests/fixtures/run_v1

(its grids removed). `tests/fixtures/run_v1_expected.npz` holds what that rfdit computed from it: samples from its
export, and the losses and samples of a resumed run (`python tests/test_compat.py --record` wrote it then). Never
rewrite either with a later rfdit: they are the reference that later versions are held to.
"""

import json
import pathlib
import shutil
import sys

import jax.random as jr
import numpy as np
import pytest

import rfdit

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "run_v1"
EXPECTED = FIXTURE.parent / "run_v1_expected.npz"
# the export of the same command's run written by rfdit just before DiTConfig's default time_scale changed from
# 1000, and the samples that rfdit drew from it (the same settings as SAMPLE_SETTINGS); never rewrite them either
EXPORT_V2 = FIXTURE.parent / "export_v2"
EXPORT_V2_EXPECTED = FIXTURE.parent / "export_v2_expected.npz"
FLAGS = ["--batch_size", "32", "--model.hidden_size", "16", "--model.depth", "1", "--model.num_heads", "2",
         "--model.mlp_ratio", "1", "--model.denoise_timesteps", "4", "--eval_interval", "100000",
         "--save_interval", "100000", "--steps_per_call", "5", "--log_interval", "5",
         "--model.time_scale", "1000", "--dequantize", "0"]  # the defaults of 0.1.0, which wrote the fixture
# the same key, labels and settings in every version; images compared to a float32 tolerance, not bit for bit
SAMPLE_SETTINGS = dict(solver="euler", num_steps=4, cfg_scale=1.0, batch_size=10, progress=False)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _samples(load_dir) -> np.ndarray:
    from rfdit.generation import generate, load_for_sampling

    model, _, vae = load_for_sampling(load_dir)
    assert vae is None
    images, _ = generate(model, labels=np.arange(10), key=jr.key(0), vae=vae, **SAMPLE_SETTINGS)
    return images


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _resume(tmp_path: pathlib.Path) -> pathlib.Path:
    """The fixture copied and resumed in place through the CLI, for 10 more steps and a final evaluation."""
    from rfdit.experiment import main

    run_dir = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run_dir)
    summary = main(FLAGS + ["--max_steps", "20", "--num_samples", "10", "--save_dir", str(run_dir),
                            "--load_dir", str(run_dir)])
    assert summary["step"] == 20
    return run_dir


@pytest.fixture(scope="module")
def expected():
    with np.load(EXPECTED) as data:
        return dict(data)


def test_compat_v1_config_is_what_the_flags_resolve_to(capsys):
    from rfdit.experiment import main

    main(FLAGS + ["--max_steps", "10", "--num_samples", "10", "--dry_run"])
    now, saved = json.loads(capsys.readouterr().out), json.loads((FIXTURE / "config.json").read_text())
    # sampler settings that 0.1.0 did not have resolve to their defaults; everything else as 0.1.0 wrote it
    added = set(now["sampler"]) - set(saved["sampler"])
    assert {name: now["sampler"][name] for name in added} == \
        {name: getattr(rfdit.SamplerConfig(), name) for name in added}
    assert {**now, "sampler": {name: now["sampler"][name] for name in saved["sampler"]}} == saved


def test_compat_v1_export_loads_and_samples(expected):
    np.testing.assert_allclose(_samples(FIXTURE / "export"), expected["export_samples"], **TOLERANCE)


def test_compat_exports_sample_with_the_time_scale_they_were_trained_with():
    from rfdit.checkpoint import load_model

    model, config = load_model(EXPORT_V2)
    assert model.config.time_scale == config["model"]["time_scale"] == 1000.0 != rfdit.DiTConfig().time_scale
    with np.load(EXPORT_V2_EXPECTED) as data:
        np.testing.assert_allclose(_samples(EXPORT_V2), data["export_samples"], **TOLERANCE)


def test_compat_v1_run_folder_loads_the_exported_ema(expected):
    import equinox as eqx
    import jax
    from safetensors.numpy import load_file

    from rfdit.checkpoint import load_model

    model, config = load_model(FIXTURE)
    leaves = {jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(leaf)
              for path, leaf in jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]}
    exported = load_file(str(FIXTURE / "export" / "model.safetensors"))
    assert leaves.keys() == exported.keys() and config["model"]["hidden_size"] == 16
    for name, leaf in leaves.items():
        np.testing.assert_array_equal(leaf, exported[name], err_msg=name)
    np.testing.assert_allclose(_samples(FIXTURE), expected["export_samples"], **TOLERANCE)


def test_compat_v1_sample_cli_reads_the_run_folder(tmp_path, expected):
    from helpers import load_script

    report = load_script("sample").main(["--load_dir", str(FIXTURE), "--num_samples", "3",
                                         "--out", str(tmp_path / "samples")])
    assert report["sampler"]["num_steps"] == 4 and report["nfe_total"] == 4  # the run's saved sampler


def test_compat_v1_resumes_with_the_same_numbers(tmp_path, expected):
    run_dir = _resume(tmp_path)
    losses = _losses(run_dir)
    assert sorted(losses) == [5, 10, 15, 20]  # the fixture's rows, then the resumed run's
    np.testing.assert_allclose([losses[15], losses[20]], expected["resumed_losses"], **TOLERANCE)
    with np.load(run_dir / "samples.npz") as samples:
        np.testing.assert_allclose(samples["images"], expected["resumed_samples"], **TOLERANCE)
        np.testing.assert_array_equal(samples["labels"], np.arange(30) % 10)
    assert json.loads((run_dir / "export" / "config.json").read_text())["run"]["max_steps"] == 20


def test_compat_v1_fresh_run_repeats_the_fixture(tmp_path):
    from safetensors.numpy import load_file

    from rfdit.experiment import main

    main(FLAGS + ["--max_steps", "10", "--num_samples", "0", "--save_dir", str(tmp_path)])
    fresh, saved = _losses(tmp_path), _losses(FIXTURE)
    assert sorted(fresh) == sorted(saved) == [5, 10]
    np.testing.assert_allclose([fresh[5], fresh[10]], [saved[5], saved[10]], **TOLERANCE)
    a, b = load_file(str(tmp_path / "export" / "model.safetensors")), load_file(str(FIXTURE / "export" /
                                                                                     "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], err_msg=name, **TOLERANCE)


def _record(tmp_path: pathlib.Path) -> None:
    run_dir = _resume(tmp_path)
    losses = _losses(run_dir)
    with np.load(run_dir / "samples.npz") as samples:
        resumed_samples = samples["images"]
    np.savez_compressed(EXPECTED, export_samples=_samples(FIXTURE / "export"),
                        resumed_losses=np.asarray([losses[15], losses[20]]), resumed_samples=resumed_samples)


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _record(pathlib.Path(tmp))
