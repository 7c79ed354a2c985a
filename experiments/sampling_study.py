"""Sampling study: ODE and SDE solvers' error, sample quality and cost on a trained checkpoint.

    python experiments/sampling_study.py --load_dir runs/digits-default --out runs/sampling-study/main
        # every solver, steps 1..500, tolerances 1e-2..1e-5, 500 digits, the original's Euler table and
        # batch vs per-sample stepping: 21 minutes on a 2-core CPU
    python experiments/sampling_study.py --load_dir runs/digits-default --out runs/sampling-study/guidance \\
        --solvers euler heun --steps 4 8 16 32 --tolerances --cfg_scales 1 2 3 --time_shifts 1 3 \\
        --guidance_interval 0.3 1 --table_steps --stepping_solvers --reference_tol 1e-5
        # the guidance interval's effect and a shifted time grid: 18 minutes
    python experiments/sampling_study.py --load_dir runs/digits-default --out runs/sampling-study/sde \\
        --solvers euler --steps 32 64 128 250 --tolerances --table_steps --stepping_solvers \\
        --diffusions sigma increasing-decreasing --sde_steps 32 64 128 250 --last_step mean --last_step_size 0.04
        # the SDE (Euler-Maruyama) beside the ODE at the same steps; SDE errors against a 4000-step
        # Euler-Maruyama solve on the same Brownian path

Adaptive rows take the PID controller's --pcoeff --icoeff --dtmin --dtmax and --max_steps.
--load_dir takes a run folder, its checkpoints/ or an export folder. Writes DIR/study.csv,
study.json, study.md and the log-log plots error_vs_nfe.png and quality_vs_nfe.png.
`--help` lists every flag; see rfdit.studies for what each column means.
"""

import shlex
import sys

from rfdit.studies import StudyConfig, run_study


def main(argv: list[str] | None = None) -> dict:
    import tyro

    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = tyro.cli(StudyConfig, args=args, use_underscores=True,
                       description="Measure ODE and SDE solvers' error, quality and cost on a checkpoint (rfdit).")
        command = "python experiments/sampling_study.py " + shlex.join(args)
        return run_study(cfg, command=command)
    except ValueError as error:
        if argv is not None:  # in-process (tests): let the caller see it
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
