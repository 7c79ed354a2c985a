"""The training loop: a generator of training steps, and the driver that runs the hooks between them."""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ..checkpoint import Checkpointer
from ..cli import RunStopped, run_cli
from ..data import Prefetcher
from ..distributed import global_batch, initialize
from .config import RunConfig, TrainArgs, parse_args, resolve
from .evaluation import Evaluation
from .hooks import Checkpoints, Export, Hooks, Logger, NonFiniteError, StepInfo, StopOnSignal, TrainingLog
from .folder import RunFolder, agree_on_run_dir, choose_run_dir, new_run_dir
from .parts import Parts, RunKeys, build


def train_steps(parts: Parts, *, max_steps: int) -> Iterator[StepInfo]:
    """The training steps from `parts.start_step` to `max_steps`, one compiled call (steps_per_call steps) each.

    The last item has `last=True` (one with no steps when nothing is left to do); the data's prefetching
    stops before it is handed out, and when the generator is closed early.
    """
    k = parts.step_fn.steps_per_call
    state, step, mesh = parts.state, parts.start_step, parts.mesh
    batches = Prefetcher(parts.data.batches(step), depth=2 * k)
    try:
        if step >= max_steps:
            batches.close()
            yield StepInfo(step, state, {}, last=True)
        while step < max_steps:
            chunk = [next(batches) for _ in range(k)]
            images = np.stack([c[0] for c in chunk]) if k > 1 else chunk[0][0]
            labels = np.stack([c[1] for c in chunk]) if k > 1 else chunk[0][1]
            images = parts.to_model_space(global_batch(images, mesh, steps_axis=k > 1), step)
            state, metrics = parts.step_fn(state, images, global_batch(labels, mesh, steps_axis=k > 1))
            step += k
            if step >= max_steps:
                batches.close()
            yield StepInfo(step, state, metrics, last=step >= max_steps)
    finally:
        batches.close()


def train(run: RunConfig, run_dir: pathlib.Path, *, load_dir: str | None = None, allow_change: str | None = None,
          load_fallback: bool = False, started: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train as `run` says into the run folder `run_dir`; resume from the run folder `load_dir` when given.

    `allow_change` and `load_fallback` are as in `build`. `started` is called once the run is built (the state restored, config.json written) and before anything else
    is written. Returns a summary: the last step, the run folder, and the final evaluation's report (or `stopped`).
    """
    is_main, keys = jax.process_index() == 0, RunKeys.from_seed(run.seed)
    schedule, k = run.schedule, run.execution.steps_per_call
    parts = build(run, run_dir, keys, load_dir=load_dir, is_main=is_main, allow_change=allow_change,
                  load_fallback=load_fallback)
    if started is not None:
        started()
    with Checkpointer(run_dir / "checkpoints", max_to_keep=schedule.keep_checkpoints) as checkpointer:
        with Logger(run_dir, run, enabled=is_main) as logger:
            evaluation = Evaluation(run, run_dir, parts.data, parts.vae, key=keys.sample, log=logger.log,
                                    enabled=is_main)
            checkpoints = Checkpoints(checkpointer, run)
            with TrainingLog(logger, run, parts.data.stats, start_step=parts.start_step) as log, \
                    StopOnSignal(checkpoints.save, checkpointer.directory) as stop, \
                    contextlib.closing(train_steps(parts, max_steps=schedule.max_steps)) as steps:
                hooks = Hooks()
                hooks.add(log.collect, every=k, at_end=True)
                hooks.add(log.write, every=schedule.log_interval, at_end=True)
                # saved before it is evaluated: an evaluation that fails (SolveFailed, a full disk) loses no training
                hooks.add(checkpoints.save, every=schedule.save_interval, at_end=True)
                hooks.add(evaluation.at_interval, every=schedule.eval_interval)
                hooks.add(stop, every=k, at_end=True)
                hooks.add(Export(run_dir / "export", run, enabled=is_main), at_end=True)
                hooks.add(evaluation.at_end, at_end=True)
                try:
                    for info in steps:
                        if hooks.run(info):
                            break
                except NonFiniteError as error:
                    last = checkpointer.latest_step()
                    good = (f"The last good checkpoint is step {last} in {checkpointer.directory}; continue from it "
                            "with a lower --model.lr or a longer --model.warmup_steps (--load_dir with "
                            "--allow_change model.lr)." if last is not None else "No checkpoint was saved.")
                    raise NonFiniteError(f"training diverged: {error} {good}") from None
    summary: dict[str, Any] = {"step": info.step, "run_dir": str(run_dir)}
    if stop.signal is not None:
        return {**summary, "stopped": True, "signal": stop.signal}
    return summary if evaluation.report is None else {**summary, "eval": evaluation.report}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """experiments/train_flow.py: parse the flags, print the resolved config (--dry_run) or train.

    A run stopped by SIGINT or SIGTERM raises `rfdit.cli.RunStopped` (from a terminal: exit status 130 or 143).
    """

    def run(args: TrainArgs) -> dict[str, Any]:
        if not args.dry_run:
            initialize(args.coordinator_address, args.num_processes, args.process_id)  # before JAX's backend starts
        config = resolve(args)
        if args.dry_run:
            print(json.dumps(config.to_dict(), indent=2))
            return {"config": config.to_dict()}
        is_main, fresh = jax.process_index() == 0, []

        def choose() -> pathlib.Path:
            path = choose_run_dir(args.save_dir, args.load_dir, overwrite=bool(args.overwrite))
            if path is None:
                fresh.append(True)
                path = new_run_dir()
            return path

        run_dir = agree_on_run_dir(choose)  # process 0 chooses; the others follow
        with RunFolder(run_dir, lock=is_main, overwrite=bool(args.overwrite) and is_main,
                       created=bool(fresh)) as folder:
            summary = train(config, run_dir, load_dir=args.load_dir, allow_change=args.allow_change,
                            load_fallback=bool(args.load_fallback), started=folder.started)
        if summary.get("stopped"):
            raise RunStopped(summary["signal"], summary["step"], summary["run_dir"])
        return summary

    return run_cli(parse_args, run, argv)
