"""The time_scale sweep: how the sinusoidal time embedding's scale shapes the digits model's velocity in t.

    python experiments/time_scale_sweep.py --root runs/time-scale-sweep
        # 5 time scales x 2 seeds: trains the runs the folder lacks (about 3 minutes each on a 2-core
        # CPU), then measures each (about 1 minute): sweep.md and sweep.json in --root
    python experiments/time_scale_sweep.py --root runs/time-scale-long --time_scales 1 1000 --seeds 0 \\
        --train_args="--max_steps 10000"
        # does the ripple shrink with longer training?

Per run: the digits evaluator's figures (eval.json), each solver's observed order between 16, 32 and
64 steps and dopri5's global error against its tolerance (a sampling study against a float64 dopri8
reference at 1e-7), the reference's NFE, the loss by t (the last evaluation) and the velocity's
roughness along straight paths (rfdit.smoothness). The table gives medians over seeds.
"""

import pathlib
import sys

from rfdit.experiment import main as train_flow
from rfdit.smoothness import SweepConfig, time_scale_sweep


def main(argv: list[str] | None = None) -> dict:
    import tyro

    cfg = tyro.cli(SweepConfig, args=sys.argv[1:] if argv is None else argv, use_underscores=True,
                   description="Sweep the DiT's time_scale on digits (rfdit).")
    result = time_scale_sweep(cfg, train=train_flow)
    print((pathlib.Path(cfg.root) / "sweep.md").read_text())
    return result


if __name__ == "__main__":
    main()
