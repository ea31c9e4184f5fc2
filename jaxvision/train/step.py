"""The jitted, AOT-compiled train step.

`make_train_step` turns a loss function into one XLA program with explicit input/output
shardings and a donated state, compiled against shape-only inputs before any data is loaded.
The step differentiates only the trainable params (frozen ones arrive as a separate argument),
accumulates gradients over microbatches with a `lax.scan`, applies the Optax chain, keeps the
EMA and the fp16 loss scale, and reports health metrics. A non-finite loss stops training
with `TrainingDivergedError`; the caller restores its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvision.train import sharding as sharding_lib
from jaxvision.train.freeze import merge_params
from jaxvision.train.loss_scale import all_finite, select_tree
from jaxvision.train.optimizers import Optimizer
from jaxvision.train.state import TrainState

PyTree = Any
# loss_fn(params, batch, rng) -> loss, or (loss, aux dict of scalars) with has_aux=True. `params`
# is the full tree (trainable and frozen merged); `loss` an fp32 scalar, the mean over the batch.
LossFn = Callable[[PyTree, PyTree, jax.Array], Any]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; `step` is the step whose update produced it."""

    def __init__(self, step: int, loss: float):
        super().__init__(
            f"training diverged at step {step}: loss is {loss}. The state passed to the step was donated; "
            "restore the last good checkpoint and lower the learning rate (or enable clipping / loss scaling)"
        )
        self.step = step
        self.loss = loss


def raise_if_diverged(metrics: dict[str, jax.Array]) -> None:
    """Raises `TrainingDivergedError` if `metrics["loss"]` is not finite (blocks on the value)."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise TrainingDivergedError(int(metrics["step"]), loss)


@dataclasses.dataclass
class TrainStep:
    """A compiled train step: `state, metrics = step(state, frozen, batch)`.

    Attributes:
      compiled: the AOT-compiled XLA executable (`jax.stages.Compiled`); call it directly to
        skip the per-step divergence check (and its host sync).
      abstract_state, abstract_frozen, batch_spec: what it was compiled for (with shardings).
      lowered: the lowered program (`jax.stages.Lowered`), for backend-independent cost analysis.
      trace_count: how many times the Python step was traced (1 after construction).
      check_finite: whether `__call__` checks the loss.
    """

    compiled: jax.stages.Compiled
    abstract_state: TrainState
    abstract_frozen: PyTree
    batch_spec: PyTree
    lowered: jax.stages.Lowered | None = None
    trace_count: int = 0
    check_finite: bool = True

    def __call__(self, state: TrainState, frozen: PyTree, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        state, metrics = self.compiled(state, frozen, batch)
        if self.check_finite:
            raise_if_diverged(metrics)
        return state, metrics


def _microbatches(batch: PyTree, k: int, mesh: Mesh) -> PyTree:
    """`[B, ...]` → `[k, B // k, ...]` with microbatch i = rows i, i + k, i + 2k, ...

    Strided rows keep every microbatch spread over all data shards exactly as the batch is
    (each device reshapes its own rows), so no data moves between devices.
    """
    batch_axes = sharding_lib.batch_sharding(mesh).spec[0]

    def one(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accumulation_steps={k}")
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, batch_axes)))

    return jax.tree.map(one, batch)


def _train_step_fn(loss_fn: LossFn, optimizer: Optimizer, mesh: Mesh, has_aux: bool, counter: list[int]) -> Callable:
    config = optimizer.config
    k = config.accumulation_steps

    def step_fn(state: TrainState, frozen: PyTree, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        counter[0] += 1
        rng, step_rng = jax.random.split(state.rng)
        scale = state.loss_scale

        def grads_of(params: PyTree, micro: PyTree, micro_rng: jax.Array) -> tuple[PyTree, jax.Array, dict]:
            def objective(p: PyTree) -> tuple[jax.Array, tuple[jax.Array, dict]]:
                out = loss_fn(merge_params(p, frozen), micro, micro_rng)
                loss, aux = out if has_aux else (out, {})
                loss = loss.astype(jnp.float32)
                return (scale.scale_loss(loss) if scale is not None else loss), (loss, aux)

            grads, (loss, aux) = jax.grad(objective, has_aux=True)(params)
            return grads, loss, aux

        if k == 1:
            grads, loss, aux = grads_of(state.params, batch, step_rng)
        else:
            # Sum fp32 gradients over microbatches; only one microbatch's activations are live.
            def body(carry: tuple[PyTree, jax.Array, dict], xs: tuple[PyTree, jax.Array]):
                g, loss, aux = grads_of(state.params, *xs)
                acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry[0], g)
                aux_acc = jax.tree.map(lambda a, b: a + b, carry[2], aux)
                return (acc, carry[1] + loss, aux_acc), None

            micro = _microbatches(batch, k, mesh)
            first = jax.tree.map(lambda x: x[0], micro)
            aux_shape = jax.eval_shape(lambda: grads_of(state.params, first, step_rng)[2])
            zeros = (
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params),
                jnp.zeros((), jnp.float32),
                jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
            )
            (grads, loss, aux), _ = jax.lax.scan(body, zeros, (micro, jax.random.split(step_rng, k)))
            grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, state.params)
            loss = loss / k
            aux = jax.tree.map(lambda a: a / k, aux)

        if scale is not None:
            grads = scale.unscale(grads)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "step": state.step,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(optimizer.schedule(state.step), jnp.float32),
            **aux,
        }
        loss_scale = None
        if scale is not None:
            # fp16 overflow: keep the old params and optimizer state, shrink the scale.
            finite = all_finite(grads)
            params = select_tree(finite, params, state.params)
            opt_state = select_tree(finite, opt_state, state.opt_state)
            updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
            loss_scale = scale.adjust(finite)
            metrics["loss_scale"] = scale.scale
            metrics["skipped"] = ~finite
        ema = state.ema_params
        if ema is not None:
            d = config.ema_decay
            ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
        metrics["update_norm"] = optax.tree.norm(updates)
        metrics["param_norm"] = optax.tree.norm(params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng, ema_params=ema, loss_scale=loss_scale
        )
        return new_state, metrics

    return step_fn


def make_train_step(
    loss_fn: LossFn,
    optimizer: Optimizer,
    mesh: Mesh,
    abstract_state: TrainState,
    abstract_frozen: PyTree,
    batch_spec: PyTree,
    *,
    has_aux: bool = False,
    rules: sharding_lib.Rules = sharding_lib.LOGICAL_AXIS_RULES,
    check_finite: bool = True,
) -> TrainStep:
    """Jits and AOT-compiles one optimizer step.

    Args:
      loss_fn: `(params, batch, rng) -> loss` (or `(loss, aux)` with `has_aux`); `params` is
        the merged trainable + frozen tree, `loss` an fp32 scalar mean over the batch. The
        model's own `dtype` sets the compute precision (bf16 / fp16) over fp32 master params.
      optimizer: from `make_optimizer`; its config sets accumulation, EMA and loss scaling.
      mesh: the device mesh.
      abstract_state, abstract_frozen: from `abstract_train_state` (shapes with shardings).
      batch_spec: the *global* batch as `jax.ShapeDtypeStruct`s, e.g. `{"image": [B, H, W, C],
        "label": [B]}`; shardings are set to `batch_sharding(mesh)`.
      has_aux: `loss_fn` also returns a dict of scalar metrics (averaged over microbatches).
      rules: logical axis rules, active while tracing so `nn.with_logical_constraint` on
        activations resolves against `mesh`.
      check_finite: `__call__` raises `TrainingDivergedError` on a non-finite loss.
    Returns:
      A `TrainStep`; its state argument is donated (do not reuse it after the call).
    """
    batch_sharding = sharding_lib.batch_sharding(mesh)
    batch_spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding), batch_spec)
    state_sh = sharding_lib.shardings_of(abstract_state)
    frozen_sh = sharding_lib.shardings_of(abstract_frozen)
    counter = [0]
    jitted = jax.jit(
        _train_step_fn(loss_fn, optimizer, mesh, has_aux, counter),
        in_shardings=(state_sh, frozen_sh, sharding_lib.shardings_of(batch_spec)),
        out_shardings=(state_sh, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jitted.lower(abstract_state, abstract_frozen, batch_spec)
        compiled = lowered.compile()
    step = TrainStep(compiled, abstract_state, abstract_frozen, batch_spec, lowered, check_finite=check_finite)
    step.trace_count = counter[0]
    return step


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float | int | bool]:
    """Metrics as Python scalars (for logging; blocks on the values)."""
    return {k: np.asarray(v).item() for k, v in metrics.items()}
