"""The training run behind `experiments/train_flow.py`: `main(argv)`; the run itself lives in `rfdit.run`."""

from .run import RunConfig, TrainArgs, main, parse_args, resolve, train

__all__ = ["RunConfig", "TrainArgs", "main", "parse_args", "resolve", "train"]
