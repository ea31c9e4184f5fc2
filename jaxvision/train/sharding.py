"""Logical axis names → mesh axes: the one rules table, parameter and batch shardings.

Every parameter is created with logical axis names (`jaxvision.models.layers`); this module maps
them onto the `("data", "fsdp", "tensor")` mesh:

- `embed` (model width) → `fsdp`: weights are stored sharded and all-gathered just before use.
- `heads`, `mlp`, `vocab`, `classes` → `tensor`: Megatron-style splits of matmul widths.
- `conv_out` → `fsdp`, `conv_in` → replicated. Convolutions are sharded for *storage* only: a
  tensor-parallel NHWC conv needs an all-reduce of activations after every layer, which costs
  more than the UNet's modest channel widths (320-1280) save, while FSDP on the output channels
  cuts parameter and optimizer memory by the fsdp size and leaves the compute layout alone.
- `batch` → `("data", "fsdp")`; every other activation axis is replicated.

Two fallbacks keep odd shapes correct: a weight with fewer than `min_shard_size` elements stays
replicated (sharding tiny biases only adds collectives), and a dimension that the mesh axes do
not divide is replicated along those axes instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvision.models import layers

PyTree = Any
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (layers.BATCH, ("data", "fsdp")),
    (layers.EMBED, "fsdp"),
    (layers.HEADS, "tensor"),
    (layers.MLP, "tensor"),
    (layers.VOCAB, "tensor"),
    (layers.CLASSES, "tensor"),
    (layers.CONV_IN, None),
    (layers.CONV_OUT, "fsdp"),
    (layers.NORM, None),
    (layers.POSITION, None),
    (layers.LENGTH, None),
    (layers.ACT_EMBED, None),
)

# 2**18 fp32 elements = 1 MiB: below this, sharding saves less memory than its collectives cost.
MIN_SHARD_SIZE = 2**18


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:
        if name in table:
            continue  # like Flax, the first rule for a name wins
        table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return table


def logical_to_mesh_spec(
    logical_names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    min_shard_size: int = MIN_SHARD_SIZE,
) -> P:
    """The mesh `PartitionSpec` for one array with the given logical axis names.

    Args:
      logical_names: one logical name (or None) per array dimension.
      shape: the array's global shape.
      mesh: the device mesh.
      rules: `(logical name, mesh axis | tuple of mesh axes | None)` pairs.
      min_shard_size: arrays with fewer elements are replicated.
    Returns:
      A spec with trailing `None`s dropped (`P()` = replicated).
    Raises:
      KeyError: a logical name has no rule (Flax would silently replicate it).
    """
    if len(logical_names) != len(shape):
        raise ValueError(f"logical names {tuple(logical_names)} do not match shape {tuple(shape)}")
    if math.prod(shape) < min_shard_size:
        return P()
    table = _rule_table(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(logical_names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis name {name!r} has no rule in the sharding rules; add one")
        # A mesh axis may shard only one dimension; an axis that does not divide the
        # dimension is dropped (replicated), keeping the others.
        axes = []
        for axis in table[name]:
            if axis in used:
                continue
            if dim % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
                axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_boxed(x: Any) -> bool:
    return isinstance(x, meta.Partitioned)


def param_shardings(
    abstract_params: PyTree,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    min_shard_size: int = MIN_SHARD_SIZE,
) -> PyTree:
    """`NamedSharding`s for a (boxed) parameter tree, e.g. `jax.eval_shape(module.init, ...)`.

    Args:
      abstract_params: leaves are `nn.Partitioned` boxes (from `nn.with_logical_partitioning`)
        around arrays or `ShapeDtypeStruct`s; unboxed leaves are replicated.
      mesh, rules, min_shard_size: see `logical_to_mesh_spec`.
    Returns:
      The unboxed tree structure with a `NamedSharding` per leaf.
    """

    def one(leaf: Any) -> NamedSharding:
        if _is_boxed(leaf):
            spec = logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh, rules, min_shard_size)
        else:
            spec = P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_params, is_leaf=_is_boxed)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh` (scalars, counters, metrics)."""
    return NamedSharding(mesh, P())


def sharded_init(
    init_fn: Callable[..., PyTree],
    mesh: Mesh,
    *args: Any,
    rules: Rules = LOGICAL_AXIS_RULES,
    min_shard_size: int = MIN_SHARD_SIZE,
) -> PyTree:
    """Runs `init_fn(*args)` so that every parameter is created directly in its shard.

    Shape-only evaluation (`jax.eval_shape`) reads the logical names, the rules give the
    shardings, and `jax.jit(..., out_shardings=...)` materialises each device's slice only: a
    model larger than one device's memory never exists unsharded.

    Args:
      init_fn: returns boxed params, e.g. `lambda rng: module.init(rng, x)["params"]`.
      args: its arguments (arrays, e.g. the rng).
    Returns:
      The unboxed params, each a global `jax.Array` with its `NamedSharding`.
    """
    shardings = param_shardings(jax.eval_shape(init_fn, *args), mesh, rules, min_shard_size)
    return jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch array: leading axis over `("data", "fsdp")`, the rest replicated."""
    table = _rule_table(LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, P(table[layers.BATCH]))


def global_batch_spec(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """`ShapeDtypeStruct`s (with shardings) of the global batch whose local slice is `local_batch`.

    Every process holds `1 / process_count` of the batch, so the global leading size is
    the local one times the number of processes.
    """

    batch = batch_sharding(mesh)
    ways = math.prod(mesh.shape[a] for a in batch.spec[0])

    def one(x: Any) -> jax.ShapeDtypeStruct:
        x = np.asarray(x) if not hasattr(x, "shape") else x
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        if shape[0] % ways:
            raise ValueError(
                f"global batch size {shape[0]} is not divisible by the data-parallel ways "
                f"data * fsdp = {ways}; change train.batch_size or mesh.data / mesh.fsdp"
            )
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=batch)

    return jax.tree.map(one, local_batch)


def shard_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Assembles global batch arrays from each process's own slice (no pmap, no host gather).

    Args:
      local_batch: this process's rows, `[global_batch // process_count, ...]` per leaf, in
        process order (process i holds rows `i * local : (i + 1) * local`).
    Returns:
      Global `jax.Array`s `[global_batch, ...]` sharded by `batch_sharding(mesh)`.
    """
    specs = global_batch_spec(local_batch, mesh)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s.sharding, np.asarray(x), s.shape),
        local_batch,
        specs,
    )


def abstract_like(tree: PyTree) -> PyTree:
    """`ShapeDtypeStruct`s (keeping each array's sharding) for a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def shardings_of(abstract_tree: PyTree) -> PyTree:
    """The `.sharding` of every leaf of a tree of arrays or `ShapeDtypeStruct`s."""
    return jax.tree.map(lambda a: a.sharding, abstract_tree)


def to_host(tree: Any) -> Any:
    """Host NumPy copies of (possibly sharded, multi-process) arrays; a collective on every process."""
    from jax.experimental import multihost_utils

    def one(x: jax.Array) -> np.ndarray:
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(one, tree)
