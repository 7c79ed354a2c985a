"""The run's parts on their own: hooks and their intervals, the run config's sections and layout, the keys."""

import json
import pathlib

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from rfdit import DiTConfig, SamplerConfig, TrainState
from rfdit.run.config import DATASETS, DatasetDefaults, RunConfig, parse_args, resolve
from rfdit.run.hooks import Hooks, StepInfo
from rfdit.run.parts import MODEL_SPACE_STREAM, RunKeys, model_space

FIXTURE_CONFIG = pathlib.Path(__file__).resolve().parent / "fixtures" / "run_v1" / "config.json"


def run_hooks(hooks: Hooks, steps: list[int], last: int) -> None:
    state = TrainState.create(eqx.nn.Linear(1, 1, key=jr.key(0)), optax.sgd(0.1), key=jr.key(1))
    for step in steps:
        if hooks.run(StepInfo(step, state, {}, last=step == last)):
            break


def test_hooks_run_every_n_steps_and_at_the_end_in_order():
    calls = []
    hooks = Hooks()
    hooks.add(lambda info: calls.append(("log", info.step)), every=10, at_end=True)
    hooks.add(lambda info: calls.append(("eval", info.step)), every=20)
    hooks.add(lambda info: calls.append(("export", info.step)), at_end=True)
    run_hooks(hooks, [5, 10, 15, 20, 25, 30, 35, 40], last=40)
    assert calls == [("log", 10), ("log", 20), ("eval", 20), ("log", 30), ("log", 40), ("export", 40)]


def test_hooks_a_hook_returning_true_stops_the_run():
    calls = []
    hooks = Hooks()
    hooks.add(lambda info: calls.append(("save", info.step)), every=5, at_end=True)
    hooks.add(lambda info: info.step == 10, every=5, at_end=True)
    hooks.add(lambda info: calls.append(("export", info.step)), at_end=True)
    run_hooks(hooks, [5, 10, 15, 20], last=20)
    assert calls == [("save", 5), ("save", 10)]
    with pytest.raises(ValueError, match="never run"):
        hooks.add(print)
    with pytest.raises(ValueError, match="every \\(=0\\)"):
        hooks.add(print, every=0)


def test_run_config_has_sections_and_keeps_the_flat_layout():
    run = resolve(parse_args(["--model.cfg_scale", "1.5", "--precision", "bf16", "--max_steps", "50"]))
    assert isinstance(run.model, DiTConfig) and isinstance(run.sampler, SamplerConfig)
    assert run.sampler.cfg_scale == 1.5 and run.execution.precision == "bf16" and run.schedule.max_steps == 50
    assert run.data.name == "digits" and run.data.batch_size == 128 and run.execution.steps_per_call == 10
    flat = run.to_dict()
    assert flat["sampler"]["cfg_scale"] == 1.5 and flat["precision"] == "bf16"
    assert flat["optim"] == run.optimizer.to_dict()
    assert RunConfig.from_dict(json.loads(json.dumps(flat))) == run
    saved = json.loads(FIXTURE_CONFIG.read_text())  # written by rfdit 0.1.0
    again = RunConfig.from_dict(saved).to_dict()
    # settings that 0.1.0 did not have come back with their defaults; the rest as saved
    new_sampler_fields = set(again["sampler"]) - set(saved["sampler"])
    assert {name: again["sampler"][name] for name in new_sampler_fields} == \
        {name: getattr(SamplerConfig(), name) for name in new_sampler_fields}
    assert {**again, "sampler": {k: again["sampler"][k] for k in saved["sampler"]}} == saved
    with pytest.raises(ValueError, match="a run config needs"):
        RunConfig.from_dict({"model": flat["model"]})


def test_dataset_defaults_are_keywords_with_the_large_data_sets_defaults():
    with pytest.raises(TypeError):
        DatasetDefaults(32, 3, 10, 128)
    cifar = DATASETS["cifar10"]
    assert (cifar.image_size, cifar.num_classes, cifar.preset, cifar.max_steps, cifar.cfg_scale) == (
        32, 10, "big", 1_000_000, 4.0)
    assert DATASETS["imagenet256"].use_stable_vae and not DATASETS["digits"].use_stable_vae


def test_run_keys_are_derived_from_the_seed_alone():
    keys = RunKeys.from_seed(3)
    model, state, sample = jr.split(jr.key(3), 3)
    for got, want in [(keys.model, model), (keys.state, state), (keys.sample, sample),
                      (keys.model_space, jr.fold_in(jr.key(3), MODEL_SPACE_STREAM))]:
        assert (jr.key_data(got) == jr.key_data(want)).all()


@pytest.mark.parametrize("dataset, width", [("digits", 2 / 16), ("cifar10", 2 / 255)])
def test_dequantize_adds_one_level_of_the_data_sets_own_quantisation(dataset, width):
    run = resolve(parse_args(["--dataset_name", dataset, "--dequantize", "1"]))
    add_noise = model_space(run, None, jr.key(0))
    images = jnp.zeros((2, 4096, 1))
    noise = np.asarray(add_noise(images, 3))
    assert np.abs(noise).max() <= width / 2 and np.abs(noise).max() > 0.99 * width / 2  # uniform over one level
    assert abs(noise.std() - width / np.sqrt(12)) < 0.03 * width


def test_dequantize_defaults_to_the_data_sets_then_to_the_resumed_runs(tmp_path):
    assert resolve(parse_args([])).data.dequantize  # digits: one level of its 17
    assert not resolve(parse_args(["--dataset_name", "cifar10"])).data.dequantize
    assert not resolve(parse_args(["--dataset_name", "imagenet256"])).data.dequantize  # latents: no pixel levels
    assert not resolve(parse_args(["--model.use_stable_vae", "1", "--image_size", "32"])).data.dequantize
    # a run started before the default changed resumes as it was trained, without the flag
    (tmp_path / "checkpoints").mkdir()
    for saved, expected in [({"dequantize": False}, False), ({"dequantize": True}, True), ({}, False)]:
        (tmp_path / "config.json").write_text(json.dumps(saved))
        assert resolve(parse_args(["--load_dir", str(tmp_path)])).data.dequantize is expected, saved
    assert resolve(parse_args(["--load_dir", str(tmp_path), "--dequantize", "1"])).data.dequantize


def test_dequantize_is_refused_on_latent_runs():
    with pytest.raises(ValueError, match="latents, which have no pixel levels"):
        resolve(parse_args(["--dataset_name", "imagenet256", "--dequantize", "1"]))


def test_time_scale_defaults_to_the_resumed_runs_then_to_the_dit_configs(tmp_path):
    # a run started before a change of the default resumes with the value it was trained with, without the flag
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model": {"time_scale": 37.0}}))
    assert resolve(parse_args(["--load_dir", str(tmp_path)])).model.time_scale == 37.0
    assert resolve(parse_args(["--load_dir", str(tmp_path / "checkpoints")])).model.time_scale == 37.0
    assert resolve(parse_args(["--load_dir", str(tmp_path), "--model.time_scale", "5"])).model.time_scale == 5.0
    assert resolve(parse_args([])).model.time_scale == DiTConfig().time_scale
    assert resolve(parse_args(["--model.time_scale", "10000"])).model.time_scale == 10000.0  # the original's
