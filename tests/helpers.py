"""Helpers shared by the test modules."""

import importlib.util
import pathlib
import sys

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest

import rfdit

# What a test that needs a PyTorch reference says when one is missing: the README's test command installs them all.
INSTALL_TEST_DEPS = "pip install -r requirements-test.txt && pip install --no-deps torch-fidelity==0.4.0"


def require(module: str, why: str):
    """`module` imported, or the test skipped with a reason that says what is missing and how to get it."""
    return pytest.importorskip(module, reason=f"{module} is not installed; {why}. Install it with: {INSTALL_TEST_DEPS}")


def load_script(name: str):
    """experiments/<name>.py imported as a module, so tests call its `main(argv)` in-process.

    `name` may start with a subfolder: "benchmarks/bench_train" is experiments/benchmarks/bench_train.py.
    """
    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def small_model(key, **overrides):
    """A two-block DiT on 8x8x3 images, for tests."""
    cfg = rfdit.DiTConfig(**{**dict(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2,
                                    num_heads=4, mlp_ratio=2.0, num_classes=10), **overrides})
    return rfdit.DiT(cfg, key=key)


def perturbed(model, key):
    """`model` with nonzero weights everywhere, so that the forward pass exercises every path."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    keys = jr.split(key, len(leaves))
    leaves = [x + 0.05 * jr.normal(k, x.shape) if eqx.is_inexact_array(x) else x for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def relative_error(a, b) -> float:
    """‖a − b‖ / ‖b‖ over the whole array, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
