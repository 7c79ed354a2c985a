"""Sampling study: ODE solvers' error, sample quality and cost on a trained checkpoint.

    python experiments/sampling_study.py --load_dir runs/digits --out runs/digits/study
        # every solver, steps 1..500, tolerances 1e-2..1e-5, 500 digits: about 40 minutes on a 2-core CPU
    python experiments/sampling_study.py --load_dir runs/digits --out runs/digits/guidance \\
        --solvers euler --steps 32 --cfg_scales 1 2 3 --guidance_interval 0.3 1 --table_steps --stepping_solvers
        # the guidance interval's effect (a few minutes)

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
                       description="Measure ODE solvers' error, quality and cost on a checkpoint (rfdit).")
        command = "python experiments/sampling_study.py " + shlex.join(args)
        return run_study(cfg, command=command)
    except ValueError as error:
        if argv is not None:  # in-process (tests): let the caller see it
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
