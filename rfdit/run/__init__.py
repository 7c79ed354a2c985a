"""The training run behind `experiments/train_flow.py`, built from parts.

| module | owns |
| --- | --- |
| `config` | the flags (`TrainArgs`), the data sets' defaults, and their resolution into a `RunConfig` of sections |
| `folder` | the run folder: never another run's, locked while in use, removed again when the start fails |
| `parts` | the run's keys and what it is built from: state (restored when resuming), data, VAE, compiled step |
| `hooks` | `Hooks` (run every N steps and at the end) and the run's own: log, checkpoints, stop signal, export |
| `evaluation` | pictures and figures at eval intervals and at the end (samples.npz, eval.json) |
| `loop` | the generator of training steps, the driver `train`, and `main` |
"""

from .config import DATASETS, RunConfig, TrainArgs, parse_args, resolve
from .loop import main, train, train_steps

__all__ = ["DATASETS", "RunConfig", "TrainArgs", "main", "parse_args", "resolve", "train", "train_steps"]
