"""The train state and its sharded creation.

`TrainState` holds exactly what a step updates and a checkpoint must restore: the step, the
*trainable* params (fp32 masters), the optimizer state, the RNG, and optionally EMA params
and the fp16 loss-scale state. Frozen params are not in it: they are a separate, non-donated
argument of the step and are never checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxvision.train import sharding as sharding_lib
from jaxvision.train.freeze import merge_params, partition_params
from jaxvision.train.loss_scale import DynamicLossScale
from jaxvision.train.optimizers import Optimizer

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Attributes:
    step: int32 scalar, optimizer steps taken (skipped fp16 steps included).
    params: trainable params (nested dict; fp32 master weights).
    opt_state: the Optax state of `params`.
    rng: raw `uint32[2]` PRNG key (`jax.random.PRNGKey`), split every step.
    ema_params: exponential moving average of `params`, or None.
    loss_scale: `DynamicLossScale` for fp16, or None.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    ema_params: PyTree | None = None
    loss_scale: DynamicLossScale | None = None


def _build_state(
    init_fn: Callable[[jax.Array], PyTree], optimizer: Optimizer, rng: jax.Array, params: PyTree | None
) -> tuple[TrainState, PyTree]:
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
        params = nn.unbox(init_fn(init_rng))
    config = optimizer.config
    trainable, frozen = partition_params(params, config.freeze)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        opt_state=optimizer.tx.init(trainable),
        rng=state_rng,
        ema_params=jax.tree.map(jnp.copy, trainable) if config.ema_decay is not None else None,
        loss_scale=DynamicLossScale.create() if config.loss_scale == "dynamic" else None,
    )
    return state, frozen


def _match_param_shardings(abstract_tree: PyTree, abstract_params: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Gives each leaf of `abstract_tree` the sharding of the param whose path ends its own path.

    Optimizer moments (`mu`, `nu`, momentum) sit under a param's own path inside the Optax
    state and have its shape; they follow its sharding. Everything else (counts, Adafactor's
    factored row/column statistics) is replicated.
    """
    by_path: dict[tuple[Any, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for (path, leaf), sharding in zip(flat_params, jax.tree.leaves(shardings), strict=True):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        for start in range(len(path)):
            hit = by_path.get(tuple(path[start:]))
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return sharding_lib.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def abstract_train_state(
    init_fn: Callable[[jax.Array], PyTree],
    optimizer: Optimizer,
    rng: jax.Array,
    mesh: Mesh,
    *,
    rules: sharding_lib.Rules = sharding_lib.LOGICAL_AXIS_RULES,
    min_shard_size: int = sharding_lib.MIN_SHARD_SIZE,
) -> tuple[TrainState, PyTree]:
    """Shapes, dtypes and shardings of the state and frozen params, without allocating anything.

    Args:
      init_fn: `rng -> params` with logical-axis boxes, e.g.
        `lambda rng: module.init(rng, *example_inputs)["params"]`.
      optimizer: from `make_optimizer`; its config's `freeze`, `ema_decay` and `loss_scale`
        shape the state.
      rng: a raw `jax.random.PRNGKey`.
      mesh, rules, min_shard_size: see `jaxvision.train.sharding`.
    Returns:
      `(abstract_state, abstract_frozen)`: trees of `jax.ShapeDtypeStruct` carrying
      `.sharding` — the targets of sharded init, AOT compilation, planning and restore.
    """
    boxed = jax.eval_shape(init_fn, rng)
    all_shardings = sharding_lib.param_shardings(boxed, mesh, rules, min_shard_size)
    trainable_sh, frozen_sh = partition_params(all_shardings, optimizer.config.freeze)
    state, frozen = jax.eval_shape(lambda r: _build_state(init_fn, optimizer, r, None), rng)
    replicated = sharding_lib.replicated(mesh)
    state_sh = TrainState(
        step=replicated,
        params=trainable_sh,
        opt_state=_match_param_shardings(state.opt_state, state.params, trainable_sh, mesh),
        rng=replicated,
        ema_params=trainable_sh if state.ema_params is not None else None,
        loss_scale=jax.tree.map(lambda _: replicated, state.loss_scale),
    )

    def attach(tree: PyTree, shardings: PyTree) -> PyTree:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    return attach(state, state_sh), attach(frozen, frozen_sh)


def create_train_state(
    init_fn: Callable[[jax.Array], PyTree],
    optimizer: Optimizer,
    rng: jax.Array,
    mesh: Mesh,
    *,
    params: PyTree | None = None,
    rules: sharding_lib.Rules = sharding_lib.LOGICAL_AXIS_RULES,
    min_shard_size: int = sharding_lib.MIN_SHARD_SIZE,
) -> tuple[TrainState, PyTree]:
    """Creates the train state and frozen params directly in their shards.

    Args:
      init_fn, optimizer, rng, mesh, rules, min_shard_size: as in `abstract_train_state`.
      params: starting weights (unboxed nested dict, e.g. from `jaxvision.from_pretrained`)
        instead of `init_fn`'s random ones; `init_fn` still supplies the logical axis names.
        In multi-process runs pass global `jax.Array`s.
    Returns:
      `(state, frozen)` as global `jax.Array`s with the shardings of `abstract_train_state`.
    """
    abstract_state, abstract_frozen = abstract_train_state(
        init_fn, optimizer, rng, mesh, rules=rules, min_shard_size=min_shard_size
    )
    out_shardings = sharding_lib.shardings_of((abstract_state, abstract_frozen))
    build = jax.jit(lambda r, p: _build_state(init_fn, optimizer, r, p), out_shardings=out_shardings)
    if params is None:
        return build(rng, None)
    all_shardings = merge_params(*sharding_lib.shardings_of((abstract_state.params, abstract_frozen)))
    return build(rng, jax.device_put(params, all_shardings))
