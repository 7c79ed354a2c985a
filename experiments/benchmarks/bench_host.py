"""The training step's host-side work per call: what the Python around the compiled step costs.

    python experiments/benchmarks/bench_host.py --config debug

Times, per call, on the training state of a core config (model, EMA, Adam state, step, key):
splitting the state into arrays and rebuilding it the filtered-jit way (`eqx.partition` and
`eqx.combine`), the same by `TrainStep` (`TrainStep.arrays`, flattening the state once, and its
inverse), and the dispatch of a jitted identity over the state's arrays with their buffers donated,
as the step's call donates them. Medians over `--rounds` rounds of `--calls` calls. The last line
is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from typing import Literal

import equinox as eqx
import jax
import jax.random as jr
import tyro

import rfdit
from rfdit.benchmarking import CORE_CONFIGS, time_calls


@dataclasses.dataclass
class Args:
    config: Literal["debug", "hidden256"] = "debug"
    calls: int = 1000
    """calls timed per round"""
    rounds: int = 5


def _us_per_call(fn, calls: int, rounds: int) -> float:
    return 1e6 * statistics.median(time_calls(fn, calls, rounds))


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True)
    spec = {k: v for k, v in CORE_CONFIGS[args.config].items() if k != "batch_size"}
    optim = rfdit.OptimConfig()
    optimizer = rfdit.make_optimizer(optim)
    state = rfdit.TrainState.create(rfdit.DiT(rfdit.DiTConfig(**spec), key=jr.key(0)), optimizer, key=jr.key(1))
    step = rfdit.TrainStep(optimizer, rfdit.FlowConfig(), optim, num_classes=spec["num_classes"])
    arrays, static = eqx.partition(state, eqx.is_array)
    flat = step.arrays(state)

    identity = jax.jit(lambda xs: xs, donate_argnums=0)
    held = [identity([x.copy() for x in flat])]

    def dispatch():
        held[0] = identity(held[0])

    result = {
        "config": args.config,
        "leaves": len(jax.tree_util.tree_leaves(state)),
        "us_per_call": {
            "eqx.partition": _us_per_call(lambda: eqx.partition(state, eqx.is_array), args.calls, args.rounds),
            "eqx.combine": _us_per_call(lambda: eqx.combine(arrays, static), args.calls, args.rounds),
            "TrainStep.arrays": _us_per_call(lambda: step.arrays(state), args.calls, args.rounds),
            "TrainStep rebuild": _us_per_call(lambda: step._state(flat), args.calls, args.rounds),
            "jit dispatch, donated": _us_per_call(dispatch, args.calls, args.rounds),
        },
    }
    jax.block_until_ready(held[0])
    for name, us in result["us_per_call"].items():
        print(f"{name:24s} {us:8.1f} us per call")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
