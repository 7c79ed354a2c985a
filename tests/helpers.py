"""Helpers shared by the test modules."""

import importlib.util
import pathlib
import sys


def load_script(name: str):
    """experiments/<name>.py imported as a module, so tests call its `main(argv)` in-process."""
    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
