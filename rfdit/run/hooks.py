"""What runs between training steps: hooks registered with their intervals, and the run's own hooks.

    hooks = Hooks()
    hooks.add(checkpoints.save, every=2000, at_end=True)   # at steps 2000, 4000, ... and after the last step
    hooks.add(export, at_end=True)                          # after the last step only
    for info in train_steps(...):
        if hooks.run(info):                                 # a hook returned True: stop here
            break

The run's hooks: `TrainingLog` (losses and throughput into metrics.jsonl and wandb, the progress bar),
`Checkpoints` (the complete state with the run config and data position), `StopOnSignal` (SIGINT/SIGTERM
save at the next chunk boundary and end the run) and `Export` (the EMA weights for sharing). The
evaluation's hooks are in `evaluation.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import Checkpointer, export_model
from ..distributed import local_copy
from ..train import TrainState
from .config import RunConfig


class NonFiniteError(ValueError):
    """The loss or the training state became NaN or infinite; nothing from that point on is saved."""


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def is_finite(tree) -> bool:
    """Whether every floating-point array in `tree` is finite (one compiled reduction; every process joins)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if eqx.is_inexact_array(x)]
    return not leaves or bool(_all_finite(leaves))


def check_finite(tree, what: str, step: int) -> None:
    if not is_finite(tree):
        raise NonFiniteError(f"the {what} holds NaN or infinite values at step {step}; not saving it.")


@dataclasses.dataclass
class StepInfo:
    """The run after one compiled call of the training step."""

    step: int
    """training steps done"""
    state: TrainState
    metrics: dict[str, jax.Array]
    """the call's metrics, one value per step it ran ((steps_per_call,) each); empty if it ran none"""
    last: bool
    """the schedule's last step: nothing follows"""

    @functools.cached_property
    def ema(self):
        """The EMA model, fully present on this process. Every process must ask for it at the same steps:
        sharded arrays are gathered collectively."""
        return local_copy(self.state.ema)


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], bool | None]
    every: int | None
    at_end: bool


class Hooks:
    """Functions of a `StepInfo`, each run after every `every`-th step before the last, and after the last
    when `at_end`; in the order they were added. One that returns True stops the run (the rest are skipped)."""

    def __init__(self):
        self.hooks: list[Hook] = []

    def add(self, fn: Callable[[StepInfo], bool | None], *, every: int | None = None, at_end: bool = False) -> None:
        if every is None and not at_end:
            raise ValueError(f"hook {fn} would never run: give every=N, at_end=True or both.")
        if every is not None and every < 1:
            raise ValueError(f"every (={every}) must be a positive number of steps.")
        self.hooks.append(Hook(fn, every, at_end))

    def run(self, info: StepInfo) -> bool:
        """Run the hooks due after `info.step`; True when one of them stopped the run."""
        for hook in self.hooks:
            due = hook.at_end if info.last else hook.every is not None and info.step % hook.every == 0
            if due and hook.fn(info):
                return True
        return False


class Logger:
    """metrics.jsonl always; wandb when asked for. Process 0 only (`enabled`)."""

    def __init__(self, run_dir: pathlib.Path, run: RunConfig, *, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        mode = run.wandb["mode"]
        if enabled and mode != "disabled":
            try:
                import wandb
            except ImportError as error:
                raise ValueError(
                    f"--wandb.mode {mode} needs wandb: `pip install wandb`, or use --wandb.mode disabled."
                ) from error
            self.wandb = wandb.init(project=run.wandb["project"], name=run.wandb["name"], mode=mode,
                                    config=run.to_dict(), dir=str(run_dir))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class TrainingLog:
    """Hooks: `collect` each call's metrics (and move the progress bar), `write` their means since the last
    row with the throughput and the data's counters. Its clock starts when the `with` block is entered."""

    def __init__(self, logger: Logger, run: RunConfig, data_stats: Callable[[], dict[str, int]], *, start_step: int):
        self.logger, self.run, self.data_stats, self.start_step = logger, run, data_stats, start_step

    def __enter__(self) -> "TrainingLog":
        self.pending: list[dict[str, jax.Array]] = []
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.progress = tqdm(total=self.run.schedule.max_steps, initial=self.start_step, desc="train",
                             dynamic_ncols=True, disable=not self.logger.enabled,
                             mininterval=0.5 if sys.stderr.isatty() else 10.0)
        return self

    def collect(self, info: StepInfo) -> None:
        if info.metrics:
            k = self.run.execution.steps_per_call
            self.pending.append(info.metrics)
            self.interval_steps += k
            self.progress.update(k)

    def write(self, info: StepInfo) -> None:
        if self.pending:
            values = {name: float(np.mean([np.mean(np.asarray(m[name])) for m in self.pending]))
                      for name in self.pending[0]}
            elapsed = time.perf_counter() - self.interval_start
            values["img_per_s"] = self.interval_steps * self.run.data.batch_size / elapsed
            values.update({f"data/{name}": count for name, count in self.data_stats().items()})
            since = info.step - self.interval_steps
            self.pending, self.interval_start, self.interval_steps = [], time.perf_counter(), 0
            self.logger.log(info.step, values)
            if not np.isfinite(values["loss"]):
                raise NonFiniteError(f"the loss became {values['loss']} at step {info.step} (the mean of steps "
                                     f"{since + 1} to {info.step}).")
            check_finite(info.state, "training state", info.step)
            self.progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['img_per_s']:.0f}")
        if info.last:
            self.progress.close()  # before what the end prints

    def __exit__(self, *exc) -> None:
        self.progress.close()


class Checkpoints:
    """Hook: save the complete training state with the run config and the data position (once per step)."""

    def __init__(self, checkpointer: Checkpointer, run: RunConfig):
        self.checkpointer, self.run, self.saved_step = checkpointer, run, None

    def save(self, info: StepInfo) -> None:
        if info.step != self.saved_step:
            check_finite(info.state, "training state", info.step)
            self.checkpointer.save(info.step, info.state, {"run": self.run.to_dict(), "data_step": info.step})
            self.saved_step = info.step


class StopOnSignal:
    """Hook, active inside its `with` block: after SIGINT or SIGTERM it saves (`save`) and stops the run.
    After the last step it hands the signals back, so what follows (export, evaluation) interrupts as usual."""

    def __init__(self, save: Callable[[StepInfo], None], directory: pathlib.Path):
        self.save, self.directory = save, directory
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __call__(self, info: StepInfo) -> bool:
        if self.signal is None:
            if info.last:
                self._restore()
            return False
        self.save(info)
        print(f"stopped by signal {self.signal} at step {info.step}; saved a checkpoint in {self.directory}")
        return True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


class Export:
    """Hook: the EMA weights and the config that rebuilds the model, in `directory` (process 0 writes)."""

    def __init__(self, directory: pathlib.Path, run: RunConfig, *, enabled: bool):
        self.directory, self.run, self.enabled = directory, run, enabled

    def __call__(self, info: StepInfo) -> None:
        check_finite(info.state.ema, "EMA model", info.step)
        ema = info.ema  # every process joins the gather
        if self.enabled:
            export_model(ema, self.directory, {"run": self.run.to_dict(), "sampler": self.run.sampler.to_dict()})
