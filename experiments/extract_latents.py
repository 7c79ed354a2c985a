"""Encode a data set once with the SD VAE, for fast latent-space training.

    python experiments/extract_latents.py --dataset_name imagenet256 --dataset_path /data/imagenet/train \\
        --vae stabilityai/sd-vae-ft-mse --out latents/imagenet256
    python experiments/train_flow.py --dataset_name latents --dataset_path latents/imagenet256

It stores each image's latent distribution (mean and std, × the scaling factor), so
training draws a fresh latent every epoch as on-the-fly encoding does.
"""

from __future__ import annotations

import dataclasses
import sys

import tyro

from rfdit.data.latents import extract_latents


@dataclasses.dataclass
class Args:
    dataset_name: str
    out: str
    """the latents folder to write (mean.npy, std.npy, labels.npy, meta.json)"""
    dataset_path: str | None = None
    vae: str = "stabilityai/sd-vae-ft-mse"
    """a diffusers-format VAE folder or a Hub id"""
    image_size: int | None = None
    batch_size: int = 64
    num_images: int | None = None
    """stop after this many images (default: one epoch)"""
    vae_dtype: str = "float32"


def main(argv: list[str] | None = None):
    args = tyro.cli(Args, args=argv, use_underscores=True)
    out = extract_latents(args.dataset_name, args.vae, args.out, dataset_path=args.dataset_path,
                          image_size=args.image_size, batch_size=args.batch_size, num_images=args.num_images,
                          vae_dtype=args.vae_dtype)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
