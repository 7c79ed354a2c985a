"""Import a published SiT or REPA checkpoint as an rfdit export (model.safetensors + config.json).

    python experiments/import_checkpoint.py --format sit --ckpt SiT-XL-2-256x256.pt --out weights/sit-xl-2-256
    python experiments/import_checkpoint.py --format repa --ckpt weights/repa/last.pt --out weights/repa-sit-xl-2-256

About half a minute for SiT-XL/2 on a 2-core CPU, peaking at about 8 GB of memory (2.7 GB of
float32 read and written; measured on a synthetic checkpoint of that size). The export loads
without torch: pass its folder as --load_dir to experiments/sample.py and eval_fid.py.
`--num_heads` is needed only when neither the checkpoint's args nor a DiT/SiT preset of the same
width tell it. The mapping, time conventions and checks are described in rfdit/importers.py.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

import tyro

from rfdit.importers import import_checkpoint


@dataclasses.dataclass
class Args:
    format: Literal["sit", "repa"]
    """whose code trained it: SiT (willisma/SiT) or REPA (sihyun-yu/REPA, which runs time the other way)"""
    ckpt: str
    """a .pt state dict or training checkpoint (its EMA is taken), or a .safetensors state dict"""
    out: str
    """the export folder to write"""
    num_heads: int | None = None
    """attention heads, when neither the checkpoint's args nor a preset of its width give them"""
    image_size: int | None = None
    """the latent size, only for a checkpoint with neither pos_embed nor args"""

def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(Args, args=argv, use_underscores=True,
                    description="Import a SiT or REPA checkpoint as an rfdit export.")
    try:
        _, report = import_checkpoint(args.ckpt, args.format, out_dir=args.out, num_heads=args.num_heads,
                                      image_size=args.image_size)
    except (ValueError, ImportError) as error:
        if argv is not None:  # called in-process (tests): let the caller see the exception
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.summary())
    print(f"wrote {args.out}/model.safetensors and {args.out}/config.json")
    return report.to_dict()


if __name__ == "__main__":
    main()
