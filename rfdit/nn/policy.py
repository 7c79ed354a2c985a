"""How a model runs, as opposed to what it computes: one frozen execution policy per model.

`ExecutionPolicy` holds every setting that changes speed or memory but not the function a model
computes, up to rounding: the products' compute dtype, the residual stream's dtype, what a block keeps
for its backward pass, how many blocks a scan unrolls, the attention implementation and whether the
training step's bf16 products get their CPU backward rules (`rfdit.nn.grad_rules`). `resolve_policy`
is the one place where defaults that depend on the hardware are chosen, from what the machine has
(`this_machine`: the backend and, on CPUs, the family its feature flags put it in) and the table
`BLOCK_DEFAULTS`, whose entries name the machines they were measured on; BENCHMARKS.md ("Execution
defaults") has the measurements. A CPU family without an entry of its own takes the measured CPU
default, and an entry is changed only by a measurement on its family.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Iterable

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")

# What a block keeps for its backward pass: "none" does not wrap it in jax.checkpoint.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the linear layers' outputs
    "full": jax.checkpoint_policies.nothing_saveable,
}

ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


CPU_FAMILIES = ("amx", "avx512_bf16", "generic")
"""CPU families by the bf16 arithmetic their flags promise: Intel's AMX tiles (amx_bf16, amx_tile), AVX512
with bf16 dot products (avx512_bf16: AMD Zen 4 and later, Intel Cooper Lake), and any other CPU."""


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux's /proc/cpuinfo ("model name", "flags", ...); empty where that
    cannot be read."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them in /proc/cpuinfo; empty where that cannot be read
    (then the CPU counts as "generic")."""
    info = cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())  # x86, ARM


def cpu_family(flags: Iterable[str] | None = None) -> str:
    """The CPU_FAMILIES entry of a CPU with these flags (default: this one's, `cpu_flags`)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if {"amx_bf16", "amx_tile"} <= flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "generic"


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the defaults depend on: the backend ("cpu", "gpu", "tpu") and, on CPUs, the CPU family."""

    backend: str
    cpu_family: str | None = None

    def __str__(self) -> str:
        return self.backend if self.cpu_family is None else f"{self.backend} ({self.cpu_family})"


def this_machine() -> Machine:
    """The machine JAX runs on now."""
    backend = jax.default_backend()
    return Machine(backend, cpu_family() if backend == "cpu" else None)


@dataclasses.dataclass(frozen=True)
class BlockDefault:
    """How blocks run by default on some machines, for one compute dtype, and what it was measured on."""

    remat: str
    scan_unroll: int | None  # None: the model's depth (every block unrolled)
    measured_on: str


BLOCK_DEFAULTS: dict[tuple[str, str | None, str], BlockDefault] = {
    # (backend, CPU family or None for every family without its own entry, compute dtype)
    ("cpu", "amx", "float32"): BlockDefault(
        "dots", 1, "2-core Intel Xeon with AMX, 2026-12-06 (\"CPU: float32 against the original, profiled\")"),
    ("cpu", "avx512_bf16", "float32"): BlockDefault(
        "dots", 1, "2-core AMD EPYC with AVX512-BF16, 2026-12-06 and -07 (\"CPU: the step's host overhead\")"),
    ("cpu", "avx512_bf16", "bfloat16"): BlockDefault(
        "none", None, "2-core AMD EPYC with AVX512-BF16, 2026-12-05 (\"CPU: the bf16 step unrolled\")"),
    ("cpu", None, "float32"): BlockDefault("dots", 1, "2-core x86-64, 2026-11-26 (\"CPU: the training step\")"),
    ("cpu", None, "bfloat16"): BlockDefault("none", None, "AVX512-BF16's default, not measured on other families"),
    ("gpu", None, "float32"): BlockDefault("none", None, "the bf16 figures' default, not measured in float32"),
    ("gpu", None, "bfloat16"): BlockDefault(
        "none", None, "H100 and H200, 2026-11-26 (\"GPU: one NVIDIA H100\", \"GPU: the residual stream in bf16\")"),
}
"""The blocks' default remat and scan_unroll by machine and compute dtype (BENCHMARKS.md, "Execution
defaults"). Lookup: the machine's own CPU family, else the backend's entry for every family; a backend
without an entry (a TPU) takes the GPU's."""


def block_default(dtype: str = "float32", machine: Machine | None = None) -> BlockDefault:
    """The BLOCK_DEFAULTS entry for a model with products in `dtype` on `machine` (default: this one)."""
    machine = this_machine() if machine is None else machine
    dtype = "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"
    backend = machine.backend if machine.backend == "cpu" else "gpu"
    return BLOCK_DEFAULTS.get((backend, machine.cpu_family, dtype)) or BLOCK_DEFAULTS[(backend, None, dtype)]


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How a model's arithmetic runs. Frozen and hashable: a model holds it as one static field.

    Attributes:
        compute_dtype: the dtype of the products' operands ("float32" or "bfloat16"); parameters
            stay float32 and products accumulate in float32.
        residual_dtype: the dtype of the tokens between and inside the blocks ("float32" or
            "bfloat16"). LayerNorm's statistics, the softmax and the conditioning's gradient sums stay
            float32 either way.
        remat: what a block keeps for the backward pass, one of REMAT_POLICIES: "none" keeps every
            activation, "dots" the linear layers' outputs, "full" only the block's input.
        scan_unroll: blocks unrolled per iteration of the scan over the depth.
        attention: one of ATTENTION_IMPLEMENTATIONS, or None for the backend's choice when the model
            runs (`attention_for`): a default cuDNN attention that does not apply falls back to XLA's.
        bf16_backward: the training step's form of the products on CPUs (`rfdit.nn.grad_rules`): bf16
            products' backward passes multiply bf16 operands as well, and the patch embedding's weight
            gradient transposes the patches, attention's backward pass works on the packed heads and
            LayerNorm takes its statistics in one pass (`cpu_training_rules`, float32 too). It rules out
            forward-mode autodiff and per-example gradients of shared weights; `rfdit.TrainStep` sets it
            for its loss.
        products_write_float32: whether bf16 products write float32 results (on CPUs) rather than
            bf16 ones (on accelerators). By default, whether the backend is the CPU.
    """

    compute_dtype: str = "float32"
    residual_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    attention: str | None = None
    bf16_backward: bool = False
    products_write_float32: bool = dataclasses.field(default_factory=_on_cpu)

    def __post_init__(self):
        for name in ("compute_dtype", "residual_dtype"):
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise ValueError(f"{name} (={getattr(self, name)!r}) must be one of {COMPUTE_DTYPES}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat (={self.remat!r}) must be one of {list(REMAT_POLICIES)}.")
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ValueError(f"scan_unroll (={self.scan_unroll!r}) must be an int >= 1.")
        if self.attention is not None and self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention (={self.attention!r}) must be one of {ATTENTION_IMPLEMENTATIONS}, "
                             "or None for the backend's default.")

    def replace(self, **changes) -> ExecutionPolicy:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def bf16(self) -> bool:
        """Whether the products take bf16 operands."""
        return jnp.dtype(self.compute_dtype) == jnp.bfloat16

    @property
    def bf16_cpu_backward(self) -> bool:
        """Whether the CPU backward rules of `rfdit.nn.grad_rules` apply to bf16 products."""
        return self.bf16_backward and self.bf16 and self.products_write_float32

    @property
    def cpu_training_rules(self) -> bool:
        """Whether the training step's CPU rules for float32 and bf16 alike apply (in the training step on
        CPUs): the patch embedding's weight gradient in `rfdit.nn.grad_rules.patch_product`'s form, the
        einsum attention's packed backward pass, `packed_attention`, and LayerNorm's one-pass statistics
        (`rfdit.nn.layers.layer_norm`)."""
        return self.bf16_backward and self.products_write_float32

    @property
    def wide_dtype(self) -> str:
        """The dtype of results that go on to elementwise work (the GELU, the gated residuals): float32
        where bf16 products write float32, since XLA's CPU backend rounds every bf16 elementwise op
        through float32; the compute dtype elsewhere."""
        return "float32" if self.products_write_float32 else self.compute_dtype

    def attention_for(self, dtype, head_dim: int) -> str:
        """The attention implementation for heads of this dtype and width (`resolve_attention`)."""
        return resolve_attention(self.attention, dtype, head_dim)


def resolve_remat(remat: bool | str | None, dtype: str = "float32", machine: Machine | None = None) -> str:
    """A `remat` setting as one of REMAT_POLICIES' names: True and False mean "full" and "none", None
    the machine's default for this dtype (`block_default`: "dots" for float32 on CPUs, "none" for bf16
    on CPUs and on accelerators)."""
    if remat is None:
        return block_default(dtype, machine).remat
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat (={remat!r}) must be one of {list(REMAT_POLICIES)} (or a bool).")
    return remat


def resolve_scan_unroll(
    scan_unroll: int | None, depth: int, *, sharded_params: bool = False, dtype: str = "float32",
    machine: Machine | None = None,
) -> int:
    """Blocks unrolled per scan iteration. None is 1 with sharded parameters (FSDP, where a scan gathers
    one block's weights at a time), else the machine's default for this dtype (`block_default`: 1 for
    float32 on CPUs, the full depth for bf16 on CPUs and on accelerators)."""
    if scan_unroll is None:
        if sharded_params:
            return 1
        default = block_default(dtype, machine).scan_unroll
        return depth if default is None else min(default, depth)
    if scan_unroll < 1:
        raise ValueError(f"scan_unroll (={scan_unroll}) must be >= 1.")
    return min(scan_unroll, depth)


def resolve_attention(attention: str | None, dtype, head_dim: int) -> str:
    """An attention implementation: the one given, else the backend's default for these heads: rfdit's
    einsum on CPUs; cuDNN's fused attention on GPUs for bf16/fp16 heads it supports; XLA's
    (`jax.nn.dot_product_attention`) otherwise (BENCHMARKS.md, "Execution defaults")."""
    if attention is not None:
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention (={attention!r}) must be one of {ATTENTION_IMPLEMENTATIONS}, "
                             "or None for the backend's default.")
        return attention
    if _on_cpu():
        return "einsum"
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn" if head_dim % 8 == 0 and head_dim <= 128 else "xla"
    return "xla"


def resolve_policy(
    depth: int,
    *,
    compute_dtype: str = "float32",
    residual_dtype: str = "float32",
    remat: bool | str | None = None,
    scan_unroll: int | None = None,
    attention: str | None = None,
    sharded_params: bool = False,
    bf16_backward: bool = False,
) -> ExecutionPolicy:
    """The execution policy for a model of `depth` blocks on this backend: settings left as None take
    the backend's defaults (`resolve_remat`, `resolve_scan_unroll`; attention stays None, the
    backend's choice when the model runs)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype (={compute_dtype!r}) must be one of {COMPUTE_DTYPES}.")
    if attention is not None:
        resolve_attention(attention, compute_dtype, 1)  # a bad name fails here, not when the model runs
    return ExecutionPolicy(
        compute_dtype=compute_dtype,
        residual_dtype=residual_dtype,
        remat=resolve_remat(remat, compute_dtype),
        scan_unroll=resolve_scan_unroll(scan_unroll, depth, sharded_params=sharded_params, dtype=compute_dtype),
        attention=attention,
        bf16_backward=bf16_backward,
    )
