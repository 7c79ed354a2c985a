"""Pre-extracted latents against encoding every batch on the fly, on the CPU, with a small VAE.

    python experiments/benchmarks/bench_latents.py  # about 2 minutes on a 2-core CPU

A random VAE (channels 32/64, one layer per block: 8×8×1 digits become 4×4×4 latents) is
saved in diffusers' format; the same small DiT then trains for --steps steps twice through
train_flow: with `--model.use_stable_vae 1` (the VAE encodes every batch) and on latents
that experiments/extract_latents.py wrote once. The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import jax.random as jr
import tyro

from rfdit.data.latents import extract_latents
from rfdit.experiment import main as train
from rfdit.nn.vae import StableVAE, VAEConfig


@dataclasses.dataclass
class Args:
    steps: int = 200
    batch_size: int = 128


def steady_img_per_s(run_dir: pathlib.Path) -> float:
    """Median img/s over the logged intervals after the first (which includes compilation)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["img_per_s"] for r in rows if "img_per_s" in r)[1:] or [0.0]
    return rates[len(rates) // 2]


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        config = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                           latent_channels=4, norm_num_groups=8, sample_size=8)
        vae_dir = StableVAE.random(config, key=jr.key(0)).save_pretrained(tmp / "vae")
        common = ["--max_steps", str(args.steps), "--batch_size", str(args.batch_size), "--steps_per_call", "10",
                  "--log_interval", "20", "--eval_interval", "100000", "--save_interval", "100000",
                  "--num_samples", "0", "--model.hidden_size", "64", "--model.depth", "4", "--model.num_heads", "4",
                  "--model.patch_size", "2", "--model.mlp_ratio", "2"]
        train(common + ["--model.use_stable_vae", "1", "--model.vae_path", str(vae_dir), "--save_dir",
                        str(tmp / "on_the_fly")])
        start = time.perf_counter()
        latents = extract_latents("digits", str(vae_dir), tmp / "latents", batch_size=args.batch_size)
        extract_s = time.perf_counter() - start
        train(common + ["--dataset_name", "latents", "--dataset_path", str(latents), "--save_dir",
                        str(tmp / "pre_extracted")])
        fly, pre = steady_img_per_s(tmp / "on_the_fly"), steady_img_per_s(tmp / "pre_extracted")
    result = {"vae_params": StableVAE.random(config, key=jr.key(0)).num_params, "batch_size": args.batch_size,
              "on_the_fly_img_per_s": round(fly, 1), "pre_extracted_img_per_s": round(pre, 1),
              "speedup": round(pre / fly, 2), "extract_s": round(extract_s, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
