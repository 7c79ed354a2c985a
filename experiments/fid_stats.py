"""Reference FID statistics (Inception pool3 mean and covariance) of a data set, as an ADM-style npz.

    python experiments/fid_stats.py --dataset_name digits --out stats/digits_train.npz
    python experiments/fid_stats.py --dataset_name imagenet256 --dataset_path /data/imagenet \\
        --num_images 50000 --batch_size 256 --out stats/imagenet256_train_50k.npz

Time: the Inception takes about 0.45 s per image on a 2-core CPU (measured), so the digits training split
(1,216 images in one pass at batch 64) takes about 9 minutes; at docs/fid.md's ~2,400 images/s on one H200,
50,000 ImageNet images need about 20 s of Inception time plus data loading (estimated, not measured).

Images come from `rfdit.data.load_dataset` in [-1, 1]; grayscale is repeated to 3 channels. The npz holds
`mu`, `sigma` (what `eval_fid.py --fid_stats` and `train_flow.py --fid_stats` read) and the name of the
feature extractor. `--random_inception` uses random weights (seed 0) for smoke tests: such statistics are
refused by anything using the real Inception, and their FIDs mean nothing.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Literal

from rfdit.generation import RANDOM_INCEPTION_WARNING, dataset_statistics, inception_features, save_fid_statistics


@dataclasses.dataclass
class FidStatsArgs:
    """Compute reference FID statistics (mu, sigma) of a data set."""

    dataset_name: str
    """a name that rfdit.data.load_dataset knows (digits, cifar10, imagenet256, ...)"""
    out: str
    """output .npz"""
    dataset_path: str | None = None
    """a local copy of the data set, where the data set needs one"""
    image_size: int | None = None
    """image side, for data sets that resize"""
    tfds_data_dir: str | None = None
    split: Literal["train", "eval"] = "train"
    """training images (the usual reference), or the held-out ones"""
    num_images: int | None = None
    """images to use; default one pass over the split"""
    batch_size: int = 64
    seed: int = 0
    """order of the training batches"""
    inception_weights: str | None = None
    """FID Inception weights (.pth or .safetensors); default: the documented location (docs/fid.md)"""
    random_inception: bool = False
    """random Inception weights: a smoke test, not comparable with anything real"""


def parse_args(argv: list[str] | None) -> FidStatsArgs:
    import tyro

    return tyro.cli(FidStatsArgs, args=argv, use_underscores=True, description=__doc__.split("\n")[0])


def run(args: FidStatsArgs) -> dict[str, Any]:
    feature_fn, extractor = inception_features(args.inception_weights,
                                               random_seed=0 if args.random_inception else None)
    if args.random_inception:
        print(f"WARNING: {RANDOM_INCEPTION_WARNING}")
    start = time.perf_counter()
    mu, sigma, count = dataset_statistics(
        args.dataset_name, feature_fn, num_images=args.num_images, batch_size=args.batch_size, split=args.split,
        dataset_path=args.dataset_path, image_size=args.image_size, tfds_data_dir=args.tfds_data_dir, seed=args.seed,
    )
    seconds = time.perf_counter() - start
    path = save_fid_statistics(args.out, mu, sigma, feature_extractor=extractor, dataset_name=args.dataset_name,
                               split=args.split, num_images=count)
    print(f"{args.dataset_name} ({args.split}, {count} images) with {extractor}: mu {mu.shape}, sigma {sigma.shape} "
          f"in {seconds:.1f} s -> {path}")
    return {"out": str(path), "num_images": count, "feature_extractor": extractor, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as error:
        if argv is not None:  # called in-process (tests): let the caller see the exception
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
