"""Import published PyTorch SiT and REPA checkpoints as rfdit models and exports.

`import_checkpoint(path, "sit" | "repa", out_dir=...)` reads a checkpoint with
`torch.load(..., weights_only=True)` (or a `.safetensors` file without torch), infers the
architecture from the tensor shapes, maps the weights onto `rfdit.DiT` and optionally
writes an rfdit export (`model.safetensors` + `config.json`) that loads without torch.

Accepted files: a bare state dict (SiT's `SiT-XL-2-256x256.pt`), or a training
checkpoint dict holding `model`, `ema`, `opt`, `args` (SiT's and REPA's `train.py`; the
`ema` weights are taken). A `module.` or `_orig_mod.` prefix on every key is stripped, and
REPA's legacy `decoder_blocks.N` keys are renumbered into `blocks.N`.

Key mapping (PyTorch layout on the left; `i` is the block index, D the width, C the input
channels, O the output channels, p the patch size, K the number of classes, hd = D / heads):

| published key                               | torch shape    | rfdit leaf            | transform               |
| ------------------------------------------- | -------------- | --------------------- | ----------------------- |
| `x_embedder.proj.weight` (a conv)           | (D, C, p, p)   | `patch_embed.weight`  | to (D, p, p, C)         |
| `x_embedder.proj.bias`                      | (D,)           | `patch_embed.bias`    |                         |
| `pos_embed`                                 | (1, N, D)      | none: computed        | checked, see below      |
| `t_embedder.mlp.0.{weight,bias}`            | (D, 256), (D,) | `t_fc1`               |                         |
| `t_embedder.mlp.2.{weight,bias}`            | (D, D), (D,)   | `t_fc2`               |                         |
| `y_embedder.embedding_table.weight`         | (K + 1, D)     | `label_table`         | row K: the null label   |
| `blocks.i.attn.qkv.*`                       | (3D, D), (3D,) | `blocks.qkv[i]`       | rows q, k, v            |
| `blocks.i.attn.{q,k}_norm.*` (REPA)         | (hd,)          | `blocks.{q,k}_norm[i]`| only with `qk_norm`     |
| `blocks.i.attn.proj.*`                      | (D, D), (D,)   | `blocks.proj[i]`      |                         |
| `blocks.i.mlp.fc1.*`                        | (4D, D), (4D,) | `blocks.fc1[i]`       |                         |
| `blocks.i.mlp.fc2.*`                        | (D, 4D), (D,)  | `blocks.fc2[i]`       |                         |
| `blocks.i.adaLN_modulation.1.*`             | (6D, D), (6D,) | `blocks.modulation[i]`| 6 chunks, DiT's order   |
| `final_layer.adaLN_modulation.1.*`          | (2D, D), (2D,) | `final_modulation`    | shift, scale            |
| `final_layer.linear.*`                      | (p²O, D)       | `final_linear`        | rows (p, q, c), c last  |
| `projectors.*` (REPA)                       |                | ignored, reported     |                         |

`*` is `weight` and `bias`; N = (H/p)² tokens. Both sides use the same orders (q, k, v
rows with the heads inside each; the modulation chunks shift_msa, scale_msa, gate_msa,
shift_mlp, scale_mlp, gate_mlp; the unpatchify order), so every matrix is copied as is and
the per-block tensors are stacked along a leading depth axis.

Position table. rfdit computes DiT's fixed 2-D sin-cos table; a stored `pos_embed` must
match it to `POS_EMBED_ATOL`. SiT's and REPA's EMA also averages this frozen table, and in
float32 decay + (1 - decay) != 1, so a published EMA table can be ~1.7e-4 smaller; the
import accepts that and reports the largest difference. Another layout is refused.

Output channels. SiT's models learn a variance (`learn_sigma`): O = 2C, and the final
linear's rows interleave velocity and sigma per pixel, (p, q, c) with c fastest. The rows
are kept whole: the imported model outputs 2C channels and `rfdit.sampling.model_velocity`
keeps channels `[:C]` of each pixel (taking the first p²C rows of the weight would be
wrong). A matmul row only feeds its own output channel and nothing after the final linear
mixes channels, so non-finite sigma weights cannot reach the velocity. REPA's models have
C outputs, and a final layer of width `decoder_hidden_size`, which must equal the width.

Time. Both feed the raw t in [0, 1] to DiT's sinusoidal embedding (`time_scale = 1`, not
DiT's 1000). SiT's linear interpolant runs our way (t = 0 noise, v = data - noise):
`time_convention = "rfdit"`. REPA runs time the other way, x_t = (1 - t)·x + t·ε, and
predicts ε - x: `time_convention = "repa"`, which the samplers turn into ours as
`v(x, s) = -v_repa(x, 1 - s)`.

Number of heads. Shapes don't fix it: it comes from the `num_heads` argument, else the
checkpoint's `args.model` (e.g. "SiT-XL/2"), else the DiT/SiT preset with the same width
(and depth, where one matches), else a ValueError asking for it.

q/k norm. REPA's `--qk-norm` uses timm's `Attention(qk_norm=True)`: a LayerNorm with weight
and bias over head_dim, applied to q and k after the split into heads; such checkpoints
load into rfdit's `qk_norm=True`. timm's LayerNorm uses eps 1e-5 (torch's default);
rfdit's q/k LayerNorm uses 1e-6, a relative difference of about 4.5e-6 / Var(q) in the
normalised q and k, reported as a note on import.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array

from .checkpoint import export_model
from .config import PRESETS, DiTConfig
from .nn.dit import NUM_FREQUENCIES, DiT, sincos_pos_embed
from .weights import check_tensors, fill, named_leaves, read_safetensors, torch_load, torch_to_numpy

FORMATS = ("sit", "repa")

DEFAULT_IMPORT_VAE = "stabilityai/sd-vae-ft-ema"
logger = logging.getLogger(__name__)

_TOP_KEYS = (  # published key -> rfdit leaf name
    ("x_embedder.proj.weight", "patch_embed.weight"),
    ("x_embedder.proj.bias", "patch_embed.bias"),
    ("t_embedder.mlp.0.weight", "t_fc1.weight"),
    ("t_embedder.mlp.0.bias", "t_fc1.bias"),
    ("t_embedder.mlp.2.weight", "t_fc2.weight"),
    ("t_embedder.mlp.2.bias", "t_fc2.bias"),
    ("y_embedder.embedding_table.weight", "label_table"),
    ("final_layer.adaLN_modulation.1.weight", "final_modulation.weight"),
    ("final_layer.adaLN_modulation.1.bias", "final_modulation.bias"),
    ("final_layer.linear.weight", "final_linear.weight"),
    ("final_layer.linear.bias", "final_linear.bias"),
)
_BLOCK_KEYS = (  # blocks.i.<published> -> blocks.<rfdit>[i]
    ("attn.qkv.weight", "qkv.weight"),
    ("attn.qkv.bias", "qkv.bias"),
    ("attn.q_norm.weight", "q_norm.weight"),
    ("attn.q_norm.bias", "q_norm.bias"),
    ("attn.k_norm.weight", "k_norm.weight"),
    ("attn.k_norm.bias", "k_norm.bias"),
    ("attn.proj.weight", "proj.weight"),
    ("attn.proj.bias", "proj.bias"),
    ("mlp.fc1.weight", "fc1.weight"),
    ("mlp.fc1.bias", "fc1.bias"),
    ("mlp.fc2.weight", "fc2.weight"),
    ("mlp.fc2.bias", "fc2.bias"),
    ("adaLN_modulation.1.weight", "modulation.weight"),
    ("adaLN_modulation.1.bias", "modulation.bias"),
)
_CONV_KEY = "x_embedder.proj.weight"
_IGNORED_PREFIXES = {"repa": ("projectors.",), "sit": ()}  # REPA's alignment heads: training only
# EMA rounding moves a stored table by ~1.7e-4 (module docstring); another layout moves it by O(1).
POS_EMBED_ATOL = 1e-3
_PRESET_SIZES = {name: PRESETS[name] for name in PRESETS if "/" in name}  # the DiT paper's S/B/L/XL presets


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What `import_checkpoint` read, inferred, ignored and checked."""

    format: str
    source: str
    weights: str
    """"ema", "model" (a training checkpoint without EMA) or "state_dict" (a bare state dict)"""
    config: dict[str, Any]
    num_heads_from: str
    ignored: tuple[str, ...]
    num_published_params: int
    """the checkpoint's parameter count as PyTorch counts it (position table included, ignored keys excluded)"""
    pos_embed_max_abs_diff: float | None
    source_dtypes: tuple[str, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def summary(self) -> str:
        cfg = self.config
        lines = [
            f"imported {self.format} checkpoint {self.source} ({self.weights} weights, "
            f"{self.num_published_params:,} parameters, stored as {', '.join(self.source_dtypes)})",
            f"  architecture: hidden {cfg['hidden_size']}, depth {cfg['depth']}, heads {cfg['num_heads']} "
            f"(from {self.num_heads_from}), patch {cfg['patch_size']}, {cfg['image_size']}x{cfg['image_size']}x"
            f"{cfg['in_channels']} input, {cfg['num_classes']} classes + null, learn_sigma={cfg['learn_sigma']}, "
            f"qk_norm={cfg['qk_norm']}",
            f"  time: time_scale={cfg['time_scale']}, time_convention={cfg['time_convention']!r}",
        ]
        if self.pos_embed_max_abs_diff is not None:
            lines.append(f"  pos_embed: max |stored - computed| = {self.pos_embed_max_abs_diff:.2e}")
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} tensors: {_few(list(self.ignored))}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _few(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def published_state_dict(model: DiT) -> dict[str, Array]:
    """`model`'s weights under SiT's/REPA's key names and PyTorch layouts (the inverse of the import).

    Works under `jax.eval_shape` (every step is a jnp op), so it also gives the published
    shapes of a configuration without materialising it. `pos_embed` is rfdit's fixed table.
    """
    cfg = model.config
    leaves = named_leaves(model)
    grid = cfg.image_size // cfg.patch_size
    state = {"pos_embed": jnp.asarray(sincos_pos_embed(cfg.hidden_size, grid))[None]}
    for published, ours in _TOP_KEYS:
        value = leaves[ours]
        state[published] = jnp.transpose(value, (0, 3, 1, 2)) if published == _CONV_KEY else value
    for i in range(cfg.depth):
        for published, ours in _BLOCK_KEYS:
            if f"blocks.{ours}" in leaves:
                state[f"blocks.{i}.{published}"] = leaves[f"blocks.{ours}"][i]
    return state


def _strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(name.startswith(prefix) for name in state):
            state = {name[len(prefix):]: value for name, value in state.items()}
    return state


def _renumber_legacy_blocks(state: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """REPA's early checkpoints stored blocks after the encoder depth as `decoder_blocks.N`."""
    if not any(name.startswith("decoder_blocks.") for name in state):
        return state
    encoder_depth = len({int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, state) if m})
    notes.append(f"legacy REPA keys: decoder_blocks.N renumbered as blocks.(N + {encoder_depth})")
    out = {}
    for name, value in state.items():
        match = re.fullmatch(r"decoder_blocks\.(\d+)\.(.*)", name)
        out[f"blocks.{int(match.group(1)) + encoder_depth}.{match.group(2)}" if match else name] = value
    return out


def _require(state: Mapping[str, np.ndarray], name: str, source: str) -> np.ndarray:
    if name not in state:
        raise ValueError(
            f"{source} is not a SiT/REPA state dict: it has no {name!r}. Its keys: {_few(sorted(state))}."
        )
    return state[name]


def _arg(args: Mapping[str, Any] | None, *names: str) -> Any:
    for name in names:
        if args is not None and args.get(name) is not None:
            return args[name]
    return None


def _preset_heads(model_name: Any, hidden: int, depth: int, patch: int) -> tuple[int, str] | None:
    """Heads from the checkpoint's `args.model`, else from the presets with this width (and depth)."""
    if isinstance(model_name, str):
        preset = _PRESET_SIZES.get(model_name.split("-", 1)[-1])  # "SiT-XL/2" -> "XL/2"
        if preset is not None:
            if (preset["hidden_size"], preset["patch_size"]) != (hidden, patch):
                raise ValueError(
                    f"the checkpoint's args.model (={model_name!r}) means hidden {preset['hidden_size']}, patch "
                    f"{preset['patch_size']}, but its tensors have hidden {hidden}, patch {patch}."
                )
            return preset["num_heads"], f"args.model={model_name!r}"
    same_width = [(n, p) for n, p in _PRESET_SIZES.items() if p["hidden_size"] == hidden]
    exact = [(n, p) for n, p in same_width if p["depth"] == depth]
    for candidates, detail in ((exact, "width and depth"), (same_width, "width")):
        heads = {p["num_heads"] for _, p in candidates}
        if len(heads) == 1:
            name = candidates[0][0].split("/")[0]
            return heads.pop(), f"the {name} preset's {detail} (hidden {hidden})"
    return None


def _check_args(format: str, args: Mapping[str, Any] | None, state: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse checkpoints whose recorded training setup is not a linear-path velocity model."""
    if args is None:
        return
    if format == "sit":
        path_type, prediction = _arg(args, "path_type"), _arg(args, "prediction")
        if path_type not in (None, "Linear") or prediction not in (None, "velocity"):
            raise ValueError(
                f"{source} was trained with path_type={path_type!r}, prediction={prediction!r}; rfdit imports SiT "
                "models trained with the linear path and velocity prediction (SiT's defaults) only."
            )
        if _arg(args, "enc_type", "proj_coeff", "encoder_depth") is not None:
            raise ValueError(f"{source} has REPA's training arguments (enc_type, proj_coeff); import it with "
                             "format='repa' (REPA runs time the other way).")
    else:
        path_type, prediction = _arg(args, "path_type"), _arg(args, "prediction")
        if path_type not in (None, "linear") or prediction not in (None, "v"):
            raise ValueError(
                f"{source} was trained with path_type={path_type!r}, prediction={prediction!r}; rfdit imports REPA "
                "models trained with path_type='linear' and prediction='v' only (the cosine path is not a "
                "rectified flow)."
            )
    qk_norm = _arg(args, "qk_norm")
    has_qk_norm = "blocks.0.attn.q_norm.weight" in state
    if qk_norm is not None and bool(qk_norm) != has_qk_norm:
        raise ValueError(
            f"{source}'s args say qk_norm={qk_norm}, but its tensors {'have' if has_qk_norm else 'lack'} "
            "blocks.N.attn.q_norm weights."
        )


def _infer_config(
    state: Mapping[str, np.ndarray],
    format: str,
    args: Mapping[str, Any] | None,
    *,
    num_heads: int | None,
    image_size: int | None,
    source: str,
    notes: list[str],
) -> tuple[DiTConfig, str]:
    conv = _require(state, _CONV_KEY, source)
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise ValueError(f"{source}: {_CONV_KEY} has shape {conv.shape}; expected (hidden, C, p, p).")
    hidden, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    depth_ids = sorted({int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, state) if m})
    if not depth_ids or depth_ids != list(range(len(depth_ids))):
        raise ValueError(f"{source}: the transformer blocks are numbered {depth_ids[:8]}...; expected 0..depth-1.")
    depth = len(depth_ids)
    mlp_width = _require(state, "blocks.0.mlp.fc1.weight", source).shape[0]

    table_rows = _require(state, "y_embedder.embedding_table.weight", source).shape[0]
    args_classes = _arg(args, "num_classes")
    if args_classes is not None and table_rows == args_classes:
        raise ValueError(
            f"{source} has {table_rows} label embeddings for {args_classes} classes: no null label (it was trained "
            "without label dropout), so classifier-free guidance is impossible; rfdit needs the null row."
        )
    if args_classes is not None and table_rows != args_classes + 1:
        raise ValueError(f"{source}: args.num_classes={args_classes} but the label table has {table_rows} rows.")
    num_classes = table_rows - 1

    final = _require(state, "final_layer.linear.weight", source)
    final_mod = _require(state, "final_layer.adaLN_modulation.1.weight", source)
    if final.shape[1] != hidden or final_mod.shape != (2 * hidden, hidden):
        decoder = final.shape[1]
        raise ValueError(
            f"{source}: the final layer's width (decoder_hidden_size = {decoder}; adaLN {final_mod.shape}) differs "
            f"from the transformer width {hidden}. rfdit's DiT needs them equal (REPA's SiT-S presets leave "
            "decoder_hidden_size at its default 768, a model that cannot run)."
        )
    outputs, per_patch = final.shape[0], patch * patch
    if outputs == per_patch * 2 * in_channels:
        learn_sigma = True
    elif outputs == per_patch * in_channels:
        learn_sigma = False
    else:
        raise ValueError(
            f"{source}: final_layer.linear has {outputs} outputs; expected p²·C = {per_patch * in_channels} or "
            f"p²·2C = {per_patch * 2 * in_channels} (learn_sigma)."
        )
    if format == "repa" and learn_sigma:
        raise ValueError(f"{source} has 2C outputs (learn_sigma), which REPA's SiT never has; import it with "
                         "format='sit'.")

    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[-2]
        grid = int(round(tokens ** 0.5))
        if grid * grid != tokens:
            raise ValueError(f"{source}: pos_embed has {tokens} tokens, not a square grid.")
        inferred = grid * patch
        if image_size is not None and image_size != inferred:
            raise ValueError(f"image_size (={image_size}) disagrees with {source}'s pos_embed, which means "
                             f"{inferred}x{inferred} inputs.")
        image_size = inferred
    elif image_size is None:
        resolution = _arg(args, "image_size", "resolution")
        if resolution is None:
            raise ValueError(f"{source} has no pos_embed and no args to tell the input size; pass image_size "
                             "(the latent size: 32 for 256x256 images with the SD VAE).")
        image_size = int(resolution) // 8  # SiT's and REPA's args give the pixel resolution of SD-VAE latents

    if num_heads is not None:
        heads_from = "the num_heads argument"
    else:
        found = _preset_heads(_arg(args, "model"), hidden, depth, patch)
        if found is None:
            raise ValueError(
                f"{source}: the number of attention heads can't be read from the shapes (hidden {hidden}, depth "
                f"{depth}) and no DiT/SiT preset has this width; pass num_heads (--num_heads)."
            )
        num_heads, heads_from = found
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    if qk_norm:
        notes.append("q/k LayerNorm: timm uses eps 1e-5, rfdit 1e-6 (a relative change of ~4.5e-6 / Var(q) in "
                     "the normalised q and k)")
    cfg = DiTConfig(
        image_size=image_size, in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_width / hidden, num_classes=num_classes, learn_sigma=learn_sigma,
        time_scale=1.0, time_convention="rfdit" if format == "sit" else "repa", t_conditioning=True, qk_norm=qk_norm,
    )
    if cfg.mlp_width != mlp_width:
        raise ValueError(f"{source}: MLP width {mlp_width} is not a multiple of the width {hidden} that rfdit "
                         "can express as mlp_ratio.")
    t_in = _require(state, "t_embedder.mlp.0.weight", source).shape
    if t_in[1:] != (NUM_FREQUENCIES,):
        raise ValueError(f"{source}: t_embedder.mlp.0 takes {t_in[1:]} features; rfdit's DiT uses "
                         f"{NUM_FREQUENCIES} sinusoidal features.")
    return cfg, heads_from


def _check_pos_embed(stored: np.ndarray, cfg: DiTConfig, source: str) -> float:
    ours = sincos_pos_embed(cfg.hidden_size, cfg.image_size // cfg.patch_size)
    if stored.size != ours.size:
        raise ValueError(f"{source}: pos_embed has shape {stored.shape}; expected (1, {ours.shape[0]}, "
                         f"{ours.shape[1]}).")
    stored = np.asarray(stored, np.float32).reshape(ours.shape)
    diff = float(np.max(np.abs(stored - ours)))
    if not diff <= POS_EMBED_ATOL:  # NaN fails too
        raise ValueError(
            f"{source}'s pos_embed is not rfdit's fixed 2-D sin-cos table: max |stored - computed| = {diff:.3g} "
            f"(tolerance {POS_EMBED_ATOL}). rfdit computes the table (first half of the features encodes the "
            "column, second half the row, as DiT/MAE) and cannot keep another one."
        )
    return diff


def convert_state_dict(
    state: Mapping[str, Any],
    format: str,
    *,
    args: Mapping[str, Any] | None = None,
    num_heads: int | None = None,
    image_size: int | None = None,
    source: str = "the state dict",
    weights: str = "state_dict",
) -> tuple[DiT, ImportReport]:
    """An `rfdit.DiT` holding a SiT/REPA state dict (name -> array in PyTorch layout, any float dtype).

    `args`: the checkpoint's training arguments as a dict, when it has them (they name the
    model, and are checked against the tensors). `num_heads` and `image_size` (the latent
    size) override what is read from `args` or the presets. Raises a ValueError naming any
    missing, unexpected or wrongly shaped tensor.
    """
    if format not in FORMATS:
        raise ValueError(f"format (={format!r}) must be one of {FORMATS}.")
    notes: list[str] = []
    state = _strip_prefixes({str(k): v for k, v in state.items()})
    state = _renumber_legacy_blocks(state, notes)
    if format == "sit" and any(k.startswith("projectors.") for k in state):
        raise ValueError(f"{source} holds REPA's projector weights (projectors.*); import it with format='repa' "
                         "(REPA runs time the other way).")
    ignored = tuple(sorted(k for k in state if k.startswith(_IGNORED_PREFIXES[format])))
    state = {k: v for k, v in state.items() if k not in ignored}
    if format == "repa" and not ignored:
        notes.append("no projector weights (projectors.*): a REPA checkpoint normally has them")
    _check_args(format, args, state, source)
    dtypes = tuple(sorted({str(np.asarray(v).dtype) for v in state.values()}))
    state = {k: np.asarray(v, np.float32) for k, v in state.items()}

    cfg, heads_from = _infer_config(state, format, args, num_heads=num_heads, image_size=image_size, source=source,
                                    notes=notes)
    pos_diff = _check_pos_embed(state["pos_embed"], cfg, source) if "pos_embed" in state else None
    if pos_diff is None:
        notes.append("no pos_embed stored; rfdit's fixed sin-cos table is used")
    present = {k: v for k, v in state.items() if k != "pos_embed"}

    skeleton = eqx.filter_eval_shape(DiT, cfg, key=jr.key(0))
    expected = jax.eval_shape(published_state_dict, skeleton)
    expected.pop("pos_embed")
    check_tensors({name: leaf.shape for name, leaf in expected.items()}, present, source=source,
                  target=f"the inferred {cfg}", advice="Check --format, or pass num_heads / image_size.")
    notes.extend(_finiteness_notes(present, cfg, source))

    def value_for(name: str) -> np.ndarray:
        for published, ours in _TOP_KEYS:
            if ours == name:
                value = present[published]
                return value.transpose(0, 2, 3, 1) if published == _CONV_KEY else value
        for published, ours in _BLOCK_KEYS:
            if f"blocks.{ours}" == name:
                return np.stack([present[f"blocks.{i}.{published}"] for i in range(cfg.depth)])
        raise AssertionError(f"no published key maps to {name}")  # the shape check above rules this out

    ours = {name: value_for(name) for name, leaf in named_leaves(skeleton).items()
            if isinstance(leaf, jax.ShapeDtypeStruct)}
    model = fill(skeleton, ours, source=source, target=f"the inferred {cfg}",
                 advice="This is a bug in the key mapping; please report it.")

    report = ImportReport(
        format=format, source=source, weights=weights, config=cfg.to_dict(), num_heads_from=heads_from,
        ignored=ignored, num_published_params=sum(int(np.prod(v.shape)) for v in state.values()),
        pos_embed_max_abs_diff=pos_diff, source_dtypes=dtypes, notes=tuple(notes),
    )
    return model, report


def _finiteness_notes(state: Mapping[str, np.ndarray], cfg: DiTConfig, source: str) -> list[str]:
    """Refuse non-finite weights, except in the sigma channels that rfdit never reads."""
    bad, sigma_bad = [], []
    for name, value in state.items():
        if name.startswith("final_layer.linear."):
            rows = value.reshape(cfg.patch_size ** 2, cfg.out_channels, -1)  # (p, q, c) order, c fastest
            if not np.all(np.isfinite(rows[:, : cfg.in_channels])):
                bad.append(f"{name} (velocity channels)")
            elif not np.all(np.isfinite(rows[:, cfg.in_channels:])):
                sigma_bad.append(name)
        elif not np.all(np.isfinite(value)):
            bad.append(name)
    if bad:
        raise ValueError(f"{source} holds non-finite values (NaN/inf) in {_few(sorted(bad))}.")
    if sigma_bad:
        return [f"non-finite values in the sigma channels of {', '.join(sorted(sigma_bad))}: sampling never reads "
                "them (the velocity is channels [:C]), but gradients through final_linear would be NaN, so don't "
                "fine-tune this model as is"]
    return []


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str]:
    """(state dict as float arrays, training args or None, which weights: "ema" | "model" | "state_dict")."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint file at {path}.")
    if path.suffix == ".safetensors":
        return read_safetensors(path), None, "state_dict"
    # The training args are an argparse.Namespace, a plain attribute bag, so that one class is allowed.
    obj = torch_load(path, allowed_classes=[argparse.Namespace], torch_advice=(
        "Install torch (the CPU build is enough), or save the state dict as .safetensors elsewhere and pass that."))
    import torch  # torch_load succeeded, so torch is there

    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a state dict or a checkpoint dict.")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    args = dict(args) if isinstance(args, Mapping) else None
    if isinstance(obj.get("ema"), Mapping):
        state, weights = obj["ema"], "ema"
    elif isinstance(obj.get("model"), Mapping):
        state, weights = obj["model"], "model"
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, weights = obj, "state_dict"
    else:
        raise ValueError(f"{path} is neither a state dict nor a checkpoint with 'ema' or 'model'; its keys: "
                         f"{_few(sorted(map(str, obj)))}.")
    return torch_to_numpy(state, source=f"{path} ({weights} weights)"), args, weights


def import_checkpoint(
    path: str | os.PathLike,
    format: str = "sit",
    *,
    out_dir: str | os.PathLike | None = None,
    num_heads: int | None = None,
    image_size: int | None = None,
) -> tuple[DiT, ImportReport]:
    """Read a SiT or REPA checkpoint (`format` "sit" or "repa") into an `rfdit.DiT`.

    With `out_dir`, also write an rfdit export there (`model.safetensors`, `config.json`
    with the time convention and this report under "import"), which `load_export` and the
    experiment scripts' `--load_dir` read without torch. See the module docstring for the
    key mapping and the time conventions.
    """
    state, args, weights = read_checkpoint(path)
    model, report = convert_state_dict(
        state, format, args=args, num_heads=num_heads, image_size=image_size, source=str(path), weights=weights,
    )
    if weights == "model":
        report = dataclasses.replace(report, notes=report.notes + ("the checkpoint has no EMA weights; the raw "
                                                                   "training weights were taken",))
    logger.info(report.summary())
    if out_dir is not None:
        # SiT and REPA were trained on latents of the SD VAE (ft-ema); samplers decode with it by default.
        export_model(model, out_dir, extra={"import": report.to_dict(), "vae": DEFAULT_IMPORT_VAE})
    return model, report
