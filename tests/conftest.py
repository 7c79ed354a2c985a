"""Shared test configuration: offline Hub, strict promotion, a compile cache, small fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import itertools
import pathlib

import jax
import jax.random as jr
import pytest

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than the cores this process may use (at most 4, `--maxprocesses`). Much of a
    test's time is compiling, on one thread, so a spare worker fills the cores: `pytest -n 3` took 11 min 6 s
    against `pytest -n 2`'s 11 min 52 s on a fresh clone (2-core AMD EPYC, cold compile cache, 2026-12-07)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
    # rfdit's own code runs under strict promotion; the train step relaxes it around optax only.
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def getkey():
    """A function returning a fresh key on every call."""
    counter = itertools.count()
    return lambda: jr.key(next(counter))


# A tiny digits configuration for CLI runs: one block of width 32, four Euler steps for the grids (fewer compiles).
TINY_RUN = ["--batch_size", "32", "--model.hidden_size", "32", "--model.depth", "1", "--model.num_heads", "2",
            "--model.mlp_ratio", "1", "--model.denoise_timesteps", "4", "--eval_interval", "100000",
            "--save_interval", "100000"]


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory):
    """One 20-step digits run through the CLI, shared by every test that only reads its outputs."""
    from rfdit.experiment import main

    run_dir = tmp_path_factory.mktemp("tiny_digits_run")
    summary = main(TINY_RUN + ["--max_steps", "20", "--steps_per_call", "5", "--log_interval", "10",
                               "--num_samples", "30", "--save_dir", str(run_dir)])
    return run_dir, summary
