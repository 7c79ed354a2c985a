"""Helpers shared by the test modules."""

import importlib.util
import pathlib
import sys

import pytest

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
