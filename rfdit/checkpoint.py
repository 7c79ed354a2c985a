"""Checkpoints (Orbax: complete training state, atomic, last K kept) and exports (safetensors): saving them,
and loading what a run left behind (`load_model`, `restore_run`).

A checkpoint holds everything needed to continue: model, EMA, optimizer state, step,
key (as raw key data), the data position and the resolved config. Orbax writes each
step into a temporary folder and renames it when complete, so a save killed midway
never replaces the last good checkpoint. Its metadata holds two checksums per array (`leaf_checksums`,
the same however the array is sharded), checked on every restore: flipped bytes are found, not trained on.

An export is the EMA model alone: `export/model.safetensors` (tensor names are the
pytree paths joined by ".") and `export/config.json` ("format": "rfdit-export", a
"version", and everything needed to rebuild the model).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib
import re
import sys
import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from .config import DiTConfig, OptimConfig
from .nn.dit import DiT
from .train import TrainState, make_optimizer
from .weights import fill, leaf_name, read_safetensors, write_tensors

EXPORT_FORMAT = "rfdit-export"
EXPORT_VERSION = 1

for _name in ("absl", "orbax"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def _flatten(tree) -> tuple[list[str], list[Any]]:
    """Named array leaves of a pytree; PRNG keys become their raw uint32 data."""
    names, leaves = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not eqx.is_array(leaf):
            continue
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jr.key_data(leaf)
        names.append(leaf_name(path))
        leaves.append(leaf)
    return names, leaves


def _closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _quiet_orbax_leftovers() -> None:
    """When a write fails (a full disk), orbax's pending tensorstore callbacks reach its closed event loop from
    other threads and report "Event loop is closed" as unraisable errors, then or at any later moment. The
    write's own error is what the user needs: keep those quiet (only those) for the rest of the process."""
    previous = sys.unraisablehook
    if getattr(previous, "_rfdit_quiet", False):
        return

    def hook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            previous(unraisable)

    hook._rfdit_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or made for another configuration."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files are damaged: truncated, garbled, or not what their checksums say."""


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (one per element, two for 8-byte types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width) if x.dtype != width else x
    return bits.astype(jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """(len(leaves), 2) uint32: two position-weighted sums of each leaf's bits, modulo 2**32.

    Every weight is odd, so any one flipped bit changes the sums. They are reductions over the global array, so
    they come out the same however the array is sharded (FSDP, many processes): every process joins, and
    process 0 writes them with the metadata.
    """
    out = []
    for x in leaves:
        bits = _as_uint32(x).ravel()
        i = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        first = jnp.sum(bits * (jnp.uint32(2) * i + jnp.uint32(1)), dtype=jnp.uint32)
        second = jnp.sum(bits * ((i * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)), dtype=jnp.uint32)
        out.append(jnp.stack([first, second]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def checksums(leaves: list[Any]) -> list[list[int]]:
    return np.asarray(_checksums(list(leaves))).tolist()


def _verify(step: int, directory: pathlib.Path, meta: dict[str, Any], names: list[str], leaves: list[Any]) -> None:
    saved = meta.get("leaf_checksums")
    if saved is None:  # written before checksums (rfdit 0.1.0)
        return
    bad = [name for name, got, want in zip(names, checksums(leaves), saved) if got != want]
    if bad:
        raise _unreadable(step, directory, ValueError(f"checksum mismatch in {len(bad)} arrays, e.g. {bad[:3]}"))


def _unreadable(step: int, directory: pathlib.Path, error: Exception) -> CheckpointError:
    # TensorStore appends its whole spec (many lines) to the reason; the reason alone, on one line, is what helps.
    detail = re.split(r"\[tensorstore_spec|See full TensorStore details", str(error))[0]
    detail = " ".join(detail.split())[:400].rstrip(" .")
    return UnreadableCheckpoint(
        f"checkpoint {step} in {directory} is unreadable ({type(error).__name__}: {detail}); it may be corrupt or "
        "incomplete. Delete it to fall back to an earlier one (or pass --load_fallback 1 to do that), or pass "
        "another --load_dir."
    )


class Checkpointer:
    """Save and restore complete training states under `directory` with Orbax."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        _quiet_orbax_leftovers()
        self.directory = pathlib.Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint folder at {self.directory}; pass a run folder or its checkpoints/.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only, enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Save `state` (any pytree of arrays) at `step` with JSON metadata; blocks until written."""
        ocp = self._ocp
        names, leaves = _flatten(state)
        meta = {**meta, "leaf_names": names, "leaf_shapes": [list(x.shape) for x in leaves],
                "leaf_dtypes": [str(x.dtype) for x in leaves], "leaf_checksums": checksums(leaves)}
        arrays = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.CRITICAL)  # orbax logs a failed write's traceback; the error below says it
        try:
            self.manager.save(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as error:  # a full disk, a file-size limit, a lost mount: orbax raises many kinds
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # orbax's unretrieved futures of the same error
            detail = str(error).split("[tensorstore_spec")[0][:300]
            raise CheckpointError(
                f"could not save checkpoint {step} in {self.directory} ({type(error).__name__}: {detail}); is the "
                "disk full? The earlier checkpoints are kept."
            ) from None
        finally:
            absl_logger.setLevel(level)

    def read_meta(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}.")
        try:
            meta = self.manager.restore(step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many kinds of errors for damaged files
            raise _unreadable(step, self.directory, error) from None
        return step, dict(meta["meta"])

    def restore_named(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Every saved array by its pytree path, without a template (for inspection)."""
        step, meta = self.read_meta(step)
        try:
            arrays = self.manager.restore(step, args=self._ocp.args.Composite(arrays=self._ocp.args.StandardRestore()))
        except Exception as error:
            raise _unreadable(step, self.directory, error) from None
        named = {name: np.asarray(arrays["arrays"][f"leaf_{i:05d}"]) for i, name in enumerate(meta["leaf_names"])}
        _verify(step, self.directory, meta, list(named), list(named.values()))
        return named

    def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore into the structure of `template` (its shapes, dtypes and shardings)."""
        step, meta = self.read_meta(step)
        names, leaves = _flatten(template)
        saved = list(zip(meta.get("leaf_names", []), map(tuple, meta.get("leaf_shapes", []))))
        expected = list(zip(names, [tuple(x.shape) for x in leaves]))
        if saved != expected:
            diffs = [f"{n}: saved {s}, expected {e}" for (n, s), (_, e) in zip(saved, expected) if s != e]
            missing = sorted(set(names) - {n for n, _ in saved})
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not match this configuration: "
                f"{len(saved)} saved arrays vs {len(expected)} expected; "
                f"{(diffs + [f'missing {m}' for m in missing])[:5]}. Use the config the run was saved with "
                "(its config.json), or start a new run."
            )
        abstract = {
            f"leaf_{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            for i, x in enumerate(leaves)
        }
        try:
            restored = self.manager.restore(
                step, args=self._ocp.args.Composite(arrays=self._ocp.args.StandardRestore(abstract))
            )["arrays"]
        except Exception as error:
            raise _unreadable(step, self.directory, error) from None
        restored_leaves = [restored[f"leaf_{i:05d}"] for i in range(len(leaves))]
        _verify(step, self.directory, meta, names, restored_leaves)
        new_leaves = iter(restored_leaves)
        template_leaves, treedef = jax.tree_util.tree_flatten(template)
        out = []
        for leaf in template_leaves:
            if not eqx.is_array(leaf):
                out.append(leaf)
                continue
            value = next(new_leaves)
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                value = jr.wrap_key_data(value)
            out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out), meta

    def close(self) -> None:
        self.manager.close()
        # Collect orbax's leftover asyncio objects now: their finalisers can raise "Event loop is closed", and
        # CPython 3.11 fails with a SystemError if that happens during a later compile() (e.g. in tyro's parsing).
        gc.collect()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_model(model: DiT, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> pathlib.Path:
    """Write `model` as safetensors plus a versioned config.json into `directory`."""
    directory = pathlib.Path(directory)
    config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": model.config.to_dict(), **(extra or {})}
    try:
        write_tensors(directory / "model.safetensors", dict(zip(*_flatten(model))))
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    except OSError as error:
        raise CheckpointError(f"could not write the export in {directory} ({error}); is the disk full?") from None
    return directory


def load_export(directory: str | os.PathLike) -> tuple[DiT, dict[str, Any]]:
    """Load an export folder: the model and its config.json (no torch needed)."""
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{directory} is not an rfdit export: expected config.json and model.safetensors in it."
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}); export the model again.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{config_path} has no \"model\" section; it is not an rfdit export's config.json.")
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{config_path} has format {config.get('format')!r}; expected {EXPORT_FORMAT!r}.")
    if config.get("version", 0) > EXPORT_VERSION:
        raise CheckpointError(
            f"{config_path} is export version {config['version']}; this rfdit reads up to {EXPORT_VERSION}. "
            "Upgrade rfdit."
        )
    try:
        _check_types(DiTConfig, config["model"])
        cfg = DiTConfig.from_dict(config["model"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{config_path}'s \"model\" section does not describe a model: {error}") from None
    skeleton = eqx.filter_eval_shape(DiT, cfg, key=jr.key(0))
    try:
        model = fill(skeleton, read_safetensors(weights_path), source=str(weights_path),
                     target=f"the model that {config_path} describes",
                     advice="The config.json must be the one exported with these weights; export the model again.")
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    return model, config


def _check_types(cls, data: dict[str, Any]) -> None:
    """A TypeError naming each value of `data` whose type is not its field's in the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    bad = []
    for name, value in data.items():
        hint = hints.get(name)
        allowed = tuple(a for a in (typing.get_args(hint) or (hint,)) if isinstance(a, type))
        if float in allowed:
            allowed += (int,)
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            bad.append(f"{name} = {value!r} (expected {' or '.join(a.__name__ for a in allowed)})")
    if bad:
        raise TypeError("; ".join(bad))


def checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoints/ folder of a run folder, or `path` itself when it is one."""
    path = pathlib.Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def load_model(path: str | os.PathLike) -> tuple[DiT, dict[str, Any]]:
    """The EMA model of a run folder, a checkpoints/ folder or an export folder, and its config.

    The config is the export's config.json, or for a checkpoint its run config with the model's config
    under "model".
    """
    path = pathlib.Path(path)
    if (path / "model.safetensors").is_file():
        return load_export(path)
    if (path / "export" / "model.safetensors").is_file() and not (path / "checkpoints").is_dir():
        return load_export(path / "export")
    with Checkpointer(checkpoint_dir(path), read_only=True) as checkpointer:
        _, meta = checkpointer.read_meta()
        cfg = DiTConfig.from_dict(meta["run"]["model"])
        template = DiT(cfg, key=jr.key(0))
        optimizer = make_optimizer(OptimConfig.from_dict(meta["run"]["optim"]))
        with jax.numpy_dtype_promotion("standard"):
            state = TrainState.create(template, optimizer, key=jr.key(0))
        state, meta = checkpointer.restore(state)
    return state.ema, {"model": meta["run"]["model"], **meta["run"]}


def restore_run(load_dir: str | os.PathLike, template: PyTree, model: DiTConfig, *,
                check: Callable[[dict[str, Any]], None] | None = None, fallback: bool = False) -> tuple[PyTree, int]:
    """The training state saved in a run folder (or its checkpoints/), to resume from, and its data step.

    `template` gives the state's structure, shapes and shardings; a checkpoint made for another model
    than `model` is refused with a `CheckpointError` that says what to pass, and `check` (given the saved run
    config) refuses other differences. With `fallback`, damaged checkpoints are renamed `unreadable-<step>` and
    the newest good one is restored.
    """
    with Checkpointer(checkpoint_dir(load_dir), read_only=True) as source:
        steps = sorted(source.manager.all_steps(), reverse=True) if fallback else [None]
        for i, step in enumerate(steps):
            try:
                step, meta = source.read_meta(step)
                saved_model = meta.get("run", {}).get("model")
                if saved_model != model.to_dict():
                    raise CheckpointError(
                        f"the checkpoint in {load_dir} was made for model {saved_model}; this run resolves to "
                        f"{model.to_dict()}. Pass the same flags as the saved run (see its config.json)."
                    )
                if check is not None:
                    check(meta.get("run", {}))
                state, meta = source.restore(template, step)
                break
            except UnreadableCheckpoint as error:
                if i == len(steps) - 1:
                    raise
                (source.directory / str(step)).rename(source.directory / f"unreadable-{step}")
                print(f"{error}".split(" Delete it")[0] + f" Renamed it unreadable-{step}; trying the one before.")
    return state, int(meta["data_step"])
