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
