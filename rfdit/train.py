"""Training state, optimizer, EMA and the one compiled training step."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import FlowConfig, OptimConfig
from .flow import draw, loss_given_draws
from .nn.dit import DiT, with_policy


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Adam (AdamW when weight decay is set) with optional linear warm-up and clipping."""
    lr = cfg.lr if cfg.warmup_steps == 0 else optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.weight_decay > 0:
        adam = optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        adam = optax.adam(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    if cfg.grad_clip is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)


def ema_decay_at(step: Int[Array, ""], decay: float, warmup: bool) -> Float[Array, ""]:
    """The EMA's decay at `step`: `min(decay, (1+n)/(10+n))` with warm-up, else `decay`."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1 + n) / (10 + n))


class TrainState(eqx.Module):
    """Everything that changes during training. The optimizer itself lives outside."""

    model: eqx.Module
    ema: eqx.Module
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray

    @classmethod
    def create(cls, model: eqx.Module, optimizer: optax.GradientTransformation, *, key: PRNGKeyArray) -> "TrainState":
        params = eqx.filter(model, eqx.is_inexact_array)
        # The EMA is a separate copy: the step donates the state's buffers.
        ema = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, model)
        return cls(model, ema, optimizer.init(params), jnp.zeros((), jnp.int32), key)


_tree_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


def _global_norm(tree) -> Float[Array, ""]:
    return _tree_norm(eqx.filter(tree, eqx.is_inexact_array))


# On CPUs a step runs faster when the widest activation of one micro-batch fits in the caches:
# DiT hidden 256 / depth 4 at batch 64 (a 16 MiB MLP activation) took 5-7% less time per step in 4
# micro-batches (BENCHMARKS.md, bench_variants and bench_vs_original); small models gain nothing
# and are left whole.
CPU_MICRO_BATCH_BYTES = 4 * 2**20


def resolve_grad_accum(grad_accum: int | None, model, batch_size: int) -> int:
    """Micro-batches per step: `grad_accum` when given; for None, 1 except on a single CPU device,
    where a DiT's batch is split so that its widest float32 activation (MLP hidden or qkv) per
    micro-batch stays within CPU_MICRO_BATCH_BYTES, with at least 8 examples per micro-batch.
    `model` is a DiT or its DiTConfig."""
    if grad_accum is not None:
        if grad_accum < 1:
            raise ValueError(f"grad_accum (={grad_accum}) must be >= 1.")
        return grad_accum
    cfg = getattr(model, "config", model)
    if cfg is None or not hasattr(cfg, "mlp_width") or jax.default_backend() != "cpu" or jax.device_count() > 1:
        return 1
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    widest = batch_size * tokens * max(cfg.mlp_width, 3 * cfg.hidden_size) * 4
    n = 1
    for candidate in range(1, batch_size // 8 + 1):
        if batch_size % candidate == 0:
            n = candidate
            if widest / candidate <= CPU_MICRO_BATCH_BYTES:
                break
    return n


class TrainStep:
    """One compiled training step (or `steps_per_call` steps scanned in one call).

    The filtered-jit pattern: the state's leaves are split into arrays and static parts
    once; `jax.jit` compiles a function of the arrays alone, donating the old state's
    buffers. Each call flattens the state to its leaves and passes the arrays as a flat
    list, which costs about a seventh of `eqx.partition` and `eqx.combine` on the host
    (BENCHMARKS.md, "the step's host overhead"). Nothing synchronises with the host:
    metrics come back as device arrays, and only logging should call `.item()` on them.

    Call it as `state, metrics = step(state, images, labels)`. With `steps_per_call=K`
    images and labels carry a leading axis of K batches, and each metric has shape (K,).
    """

    def __init__(
        self,
        optimizer: optax.GradientTransformation,
        flow: FlowConfig,
        optim: OptimConfig,
        *,
        num_classes: int,
        steps_per_call: int = 1,
        grad_accum: int | None = None,
        max_traces: int | None = None,
    ):
        """`grad_accum=N` splits each batch into N micro-batches whose gradients are averaged:
        the same update as the large batch (the randomness is drawn for the whole batch
        first), with the activation memory of one micro-batch. None (the default) is 1, except
        on a single CPU device, where large activations are split to fit the caches
        (`resolve_grad_accum`). `max_traces` makes the step raise if it is traced more often
        (a test hook)."""
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call (={steps_per_call}) must be >= 1.")
        resolve_grad_accum(grad_accum, None, 1)  # a bad value fails here, not at the first call
        self.optimizer, self.flow, self.optim = optimizer, flow, optim
        self.num_classes, self.steps_per_call, self.grad_accum = num_classes, steps_per_call, grad_accum
        self._treedef = None  # the state's structure, its array mask and static leaves: fixed by the first call
        self._is_array: list[bool] = []
        self._static_leaves: list = []
        self._shardings = None
        fn = self._arrays_step
        if max_traces is not None:
            fn = eqx.debug.assert_max_traces(fn, max_traces=max_traces)
        self._jitted = jax.jit(fn, donate_argnums=0)

    def _one_step(self, state: TrainState, images, labels) -> tuple[TrainState, dict[str, Array]]:
        key, loss_key = jr.split(state.key)
        params, model_static = eqx.partition(state.model, eqx.is_inexact_array)
        draws = draw(loss_key, images, labels, self.flow, self.num_classes)

        def loss_fn(params, x1, draws):  # bf16 products keep bf16 operands in the backward pass too
            model = eqx.combine(params, model_static)
            if isinstance(model, DiT):  # on CPUs, the bf16 products' backward rules (rfdit.nn.grad_rules)
                model = with_policy(model, bf16_backward=True)
            return loss_given_draws(model, x1, draws, self.flow)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n = self.micro_batches(state.model, images.shape[0])
        if n == 1:
            (loss, aux), grads = grad_fn(params, images, draws)
        else:
            if images.shape[0] % n:
                raise ValueError(f"the batch (={images.shape[0]}) must be divisible by grad_accum (={n}).")
            split = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])

            def micro_step(total, micro):
                (loss, aux), grads = grad_fn(params, *micro)
                summed = (grads, loss, aux["v_abs_mean"], aux["v_pred_abs_mean"])
                return jax.tree_util.tree_map(jnp.add, total, summed), None

            zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), *(jnp.zeros((), jnp.float32),) * 3)
            total, _ = jax.lax.scan(micro_step, zeros, (split(images), jax.tree_util.tree_map(split, draws)))
            grads, loss, v_abs, v_pred = jax.tree_util.tree_map(lambda x: x / n, total)
            aux = {"v_abs_mean": v_abs, "v_pred_abs_mean": v_pred}
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes weak and strong dtypes
            updates, opt_state = self.optimizer.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = ema_decay_at(state.step, self.optim.ema_decay, self.optim.ema_warmup)
        ema_params, ema_static = eqx.partition(state.ema, eqx.is_inexact_array)
        ema_params = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
        new_state = TrainState(
            model=eqx.combine(params, model_static),
            ema=eqx.combine(ema_params, ema_static),
            opt_state=opt_state,
            step=state.step + 1,
            key=key,
        )
        metrics = {
            "loss": loss,
            "grad_norm": _global_norm(grads),
            "update_norm": _global_norm(updates),
            "param_norm": _global_norm(params),
            "v_abs_mean": aux["v_abs_mean"],
            "v_pred_abs_mean": aux["v_pred_abs_mean"],
        }
        return new_state, metrics

    def micro_batches(self, model, batch_size: int) -> int:
        """How many micro-batches this step splits a batch of `batch_size` into (`resolve_grad_accum`)."""
        return resolve_grad_accum(self.grad_accum, model, batch_size)

    def arrays(self, state: TrainState) -> list:
        """The state's array leaves in order: what the compiled step (`lower(...).compile()`) takes and returns
        in the state's place. The first state fixes the structure every later one must have."""
        leaves, treedef = jax.tree_util.tree_flatten(state)
        if self._treedef is None:
            self._treedef = treedef
            self._is_array = [eqx.is_array(x) for x in leaves]
            self._static_leaves = [x for x, a in zip(leaves, self._is_array) if not a]
        elif treedef != self._treedef:
            raise ValueError("this TrainStep was first called with a state of another structure (a different model, "
                             "optimizer or dtype); make a new TrainStep for it.")
        return [x for x, a in zip(leaves, self._is_array) if a]

    def _state(self, arrays: list) -> TrainState:
        """The state whose array leaves are `arrays` (the inverse of `arrays`)."""
        arrays, static = iter(arrays), iter(self._static_leaves)
        leaves = [next(arrays) if is_array else next(static) for is_array in self._is_array]
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def _arrays_step(self, arrays, images, labels):
        state = self._state(arrays)
        if self.steps_per_call == 1:
            state, metrics = self._one_step(state, images, labels)
        else:
            def body(state, batch):
                return self._one_step(state, *batch)

            state, metrics = jax.lax.scan(body, state, (images, labels))
        arrays = self.arrays(state)
        if self._shardings is not None:  # keep the state where it was: replicated or FSDP-sharded
            arrays = [jax.lax.with_sharding_constraint(x, s) if s is not None else x
                      for x, s in zip(arrays, self._shardings)]
        return arrays, metrics

    def lower(self, state: TrainState, images, labels):
        """The step lowered for these inputs (e.g. `.compile().memory_analysis()`), without running it."""
        return self._jitted.lower(self.arrays(state), images, labels)

    def compile(self, state: TrainState, images, labels, *, compiler_options: dict | None = None):
        """The step compiled ahead of time for these inputs' shapes, with XLA `compiler_options` for
        this executable alone (e.g. `{"xla_cpu_enable_fast_math": True}`). Call it as the step
        itself, `state, metrics = compiled(state, images, labels)`; it donates the state's buffers."""
        compiled = self.lower(state, images, labels).compile(compiler_options=compiler_options or None)

        def compiled_step(state: TrainState, images, labels) -> tuple[TrainState, dict[str, Array]]:
            new_arrays, metrics = compiled(self.arrays(state), images, labels)
            return self._state(new_arrays), metrics

        return compiled_step

    def __call__(
        self, state: TrainState, images: Float[Array, "..."], labels: Int[Array, "..."]
    ) -> tuple[TrainState, dict[str, Array]]:
        arrays = self.arrays(state)
        if self._shardings is None:
            self._shardings = [x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else None
                               for x in arrays]
        expected = images.ndim == (5 if self.steps_per_call > 1 else 4)
        if not expected:
            raise ValueError(
                f"images must have shape {'(K, B, H, W, C)' if self.steps_per_call > 1 else '(B, H, W, C)'} "
                f"for steps_per_call={self.steps_per_call}; got {images.shape}."
            )
        new_arrays, metrics = self._jitted(arrays, images, labels)
        return self._state(new_arrays), metrics
