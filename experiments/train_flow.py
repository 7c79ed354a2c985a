"""Train a rectified-flow DiT. The flags mirror the Flax original's (kvfrans/jax-flow).

    python experiments/train_flow.py                      # embedded digits: about 4 minutes on a 2-core CPU
    python experiments/train_flow.py --dry_run            # print the resolved configuration
    python experiments/train_flow.py --dataset_name cifar10 --batch_size 128 --model.preset big \\
        --model.patch_size 8 --model.use_stable_vae 0

Output (config.json, metrics.jsonl, grids/, checkpoints/, export/, samples.npz, eval.json)
goes to --save_dir, by default a new runs/<timestamp>; a folder that holds a run is refused (--load_dir DIR
continues it, --overwrite 1 starts over). Ctrl-C or SIGTERM saves and exits 130 or 143. `--help` lists every flag;
docs/reliability.md says what a run guarantees.
"""

from rfdit.experiment import main

if __name__ == "__main__":
    main()
