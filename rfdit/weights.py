"""Weights files and the pytrees they fill: read, name, check, write.

Every loader in rfdit (exports, the SiT/REPA importer, the Stable Diffusion VAE, the FID
Inception) goes through this module, so they read the same files the same way and fail with
the same messages:

- `read_tensors(path)`: a `.safetensors` file (no torch needed; bfloat16 included) or a
  PyTorch pickle (`.bin`, `.pt`, `.pth`, `.ckpt`; needs torch) as `{name: numpy array}`.
  Pickles are read with `torch.load(weights_only=True)`: unpickling arbitrary objects can
  run code. `torch_load` returns a pickle's object itself (a training checkpoint's dict),
  `torch_to_numpy` its tensors as numpy.
- `leaf_name(path)` / `named_leaves(tree)`: a pytree leaf's name is its path joined by ".",
  attribute names and sequence indices alike (`blocks.qkv.weight`,
  `encoder.down_blocks.0.resnets.1.conv1.weight`).
- `check_tensors(expected, tensors, ...)`: the one "missing / unexpected / wrong shape"
  report, raised as a ValueError.
- `fill(skeleton, tensors, ...)`: a pytree (e.g. from `eqx.filter_eval_shape`) whose array
  leaves are replaced by the tensors of the same names, after `check_tensors`.
- `write_tensors(path, tensors)`: a `.safetensors` file, written atomically.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DEFAULT_TORCH_ADVICE = (
    "Install torch (its CPU build is enough), or convert the file to .safetensors where torch is installed "
    "and use that."
)


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def _unreadable(path: pathlib.Path, how: str, error: Exception, what_else: str) -> ValueError:
    detail = " ".join(str(error).split())[:400] or type(error).__name__
    return ValueError(
        f"Could not read {path} {how}: {detail}. The file is truncated or corrupt (an interrupted download?)"
        f"{what_else}; download or write it again."
    )


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` file as `{name: numpy array}`, bfloat16 tensors included (no torch needed)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors read too)
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    try:
        return dict(load_file(str(path)))
    except Exception as error:  # safetensors raises its own SafetensorError (and others) on bad files
        raise _unreadable(path, "as safetensors", error, "") from error


def torch_load(
    path: str | os.PathLike, *, allowed_classes: Iterable[type] = (), torch_advice: str | None = None
) -> Any:
    """The object a PyTorch pickle holds, read with `torch.load(weights_only=True)` on the CPU.

    `allowed_classes`: plain classes beyond tensors and containers that the pickle may hold
    (e.g. `argparse.Namespace` for a training checkpoint's arguments). Without torch, an
    ImportError that ends with `torch_advice` (what to do instead).
    """
    path = pathlib.Path(path)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"Reading {path} (a PyTorch pickle) needs torch, but torch is not installed. "
            f"{torch_advice or DEFAULT_TORCH_ADVICE}"
        ) from error
    allowed_classes = list(allowed_classes)
    try:
        # weights_only: unpickling arbitrary objects can run code
        if not allowed_classes:
            return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(allowed_classes):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        allowed = "".join(f", {cls.__module__}.{cls.__qualname__}" for cls in allowed_classes)
        raise _unreadable(
            path, "with torch.load(weights_only=True)", error,
            f", or it pickles objects other than tensors, containers{allowed}",
        ) from error


def torch_to_numpy(state: Mapping[str, Any], *, source: str) -> dict[str, np.ndarray]:
    """A state dict of torch tensors as numpy arrays, keeping dtypes (bfloat16 through `ml_dtypes`)."""
    import ml_dtypes
    import torch

    arrays = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{source}: {name!r} is not a tensor but a {type(tensor).__name__}; expected a state dict (a "
                "mapping of names to tensors)."
            )
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            arrays[str(name)] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            arrays[str(name)] = tensor.float().numpy()  # float8 and friends: no numpy dtype
        else:
            arrays[str(name)] = tensor.numpy()
    return arrays


def read_tensors(path: str | os.PathLike, *, torch_advice: str | None = None) -> dict[str, np.ndarray]:
    """`{name: numpy array}` from a `.safetensors` file or a PyTorch state-dict pickle.

    Args:
        path: a `.safetensors` file (read without torch) or a `.bin`, `.pt`, `.pth`, `.ckpt`
            pickle of a flat state dict (read with `torch.load(weights_only=True)`).
        torch_advice: what the ImportError says to do when a pickle comes and torch is missing.

    Raises a ValueError, saying what to do, for an unknown suffix, a truncated or corrupt file,
    or a pickle that is not a flat mapping of names to tensors.
    """
    path = pathlib.Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"Unknown weights format {path.suffix!r} ({path}); expected {SAFETENSORS_SUFFIX} or a PyTorch pickle "
            f"({', '.join(TORCH_SUFFIXES)})."
        )
    state = torch_load(path, torch_advice=torch_advice)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(state).__name__}; expected a state dict (a mapping of names to tensors)."
        )
    return torch_to_numpy(state, source=str(path))


def write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None
) -> pathlib.Path:
    """Write `tensors` (numpy-convertible arrays) as a `.safetensors` file, atomically; returns the path.

    The file appears under its name only once complete, so a reader never finds half of it.
    """
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(np.asarray(jax.device_get(value))) for name, value in tensors.items()}
    partial = path.with_name(path.name + ".part")
    save_file(arrays, str(partial), metadata=dict(metadata) if metadata is not None else None)
    os.replace(partial, path)
    return path


def leaf_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as a tensor name: attribute names, dict keys and sequence indices joined by "."."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def named_leaves(tree: PyTree, *, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Every leaf of `tree` by its `leaf_name`, in flattening order (`is_leaf` as in `jax.tree_util`)."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _is_array_like(leaf: Any) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, Any],
    *,
    source: str,
    target: str,
    advice: str,
) -> None:
    """Raise a ValueError unless `tensors` has exactly the names of `expected`, with those shapes.

    The message lists what is missing, what is unexpected and what has the wrong shape
    ("name (expected E, got G)"), in the source's layout; `source` says where the tensors
    came from, `target` what they were to fill, and `advice` what to do about it.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{name} (expected {tuple(expected[name])}, got {tuple(np.shape(tensors[name]))})"
        for name in expected
        if name in tensors and tuple(np.shape(tensors[name])) != tuple(expected[name])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = [
        f"{label} {_few(names, limit)}"
        for label, names, limit in (("missing", missing, 5), ("unexpected", unexpected, 5),
                                    ("wrong shape", wrong, 3))
        if names
    ]
    raise ValueError(f"The tensors in {source} do not fit {target}: {'; '.join(parts)}. {advice}")


def fill(
    skeleton: PyTree,
    tensors: Mapping[str, Any],
    *,
    source: str,
    target: str,
    advice: str,
) -> PyTree:
    """`skeleton` with each array leaf replaced by the tensor of its `leaf_name`, cast to the leaf's dtype.

    `skeleton` is a pytree whose array leaves (arrays or `jax.ShapeDtypeStruct`s, as
    `eqx.filter_eval_shape` gives) set the names, shapes and dtypes; its other leaves are kept.
    The tensors must match those names and shapes exactly (`check_tensors` reports otherwise).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    expected = {leaf_name(path): tuple(leaf.shape) for path, leaf in flat if _is_array_like(leaf)}
    check_tensors(expected, tensors, source=source, target=target, advice=advice)
    leaves = [
        jnp.asarray(tensors[leaf_name(path)], dtype=leaf.dtype) if _is_array_like(leaf) else leaf
        for path, leaf in flat
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)
