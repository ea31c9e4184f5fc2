"""Memory plan of a compiled train step, read from XLA without running it.

The per-device bytes of params and optimizer state come from their shardings (each leaf's
shard shape times its item size); the temporaries (activations, gradients, collectives'
buffers) from the compiled executable's `memory_analysis()`.

A plan can target another platform than the host's (`jaxvision plan --platform gpu` on a CPU
machine): the trainers choose the kernels for the target, and XLA compiles that program for the
devices present. The one kernel a host cannot compile, cuDNN's fused attention, is planned with
the query-chunked attention in its place (`kernels.compilable_here`): both keep only a tile of
the `[q, kv]` logits, and the plan says which kernel stood in.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jaxvision.models.kernels import Kernels
from jaxvision.train.step import TrainStep

PyTree = Any


def per_device_bytes(abstract_tree: PyTree) -> int:
    """Bytes one device holds of a tree of `ShapeDtypeStruct`s (or arrays) with shardings.

    The largest shard is counted, which is what every device allocates under even sharding.
    """
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def plan_train_step(step: TrainStep) -> dict[str, Any]:
    """The memory plan of a compiled step (as `jaxvision plan --json` prints it).

    Args:
      step: from `make_train_step` (compiled against shapes only; nothing was allocated).
    Returns:
      `{"devices": int, "per_device_bytes": {"params": int, "opt_state": int, "temp": int,
      "total": int}}`. "params" counts trainable, frozen and EMA params; "total" is every
      argument the step holds (params, optimizer state, batch, ...) plus XLA's temporaries,
      i.e. the peak the executable needs on one device.
    """
    state = step.abstract_state
    params = per_device_bytes((state.params, step.abstract_frozen, state.ema_params))
    opt_state = per_device_bytes(state.opt_state)
    arguments = per_device_bytes((state, step.abstract_frozen, step.batch_spec))
    analysis = step.compiled.memory_analysis()
    temp = int(analysis.temp_size_in_bytes) if analysis is not None else 0
    # Outputs alias the donated state; only outputs beyond the aliases (the metrics) add memory.
    extra_out = 0
    if analysis is not None:
        extra_out = max(0, int(analysis.output_size_in_bytes) - int(analysis.alias_size_in_bytes))
    devices = len(next(iter(jax.tree.leaves(state))).sharding.device_set)
    return {
        "devices": devices,
        "per_device_bytes": {
            "params": params,
            "opt_state": opt_state,
            "temp": temp,
            "total": arguments + temp + extra_out,
        },
    }


def describe_kernels(platform: str, kernels: Kernels, compiled: Kernels) -> str:
    """The line a plan prints about its kernels, naming the one that stood in for cuDNN's if any."""
    stand_in = (
        f" (planned with attention={compiled.attention}: cuDNN cannot compile here)" if compiled != kernels else ""
    )
    return f"plan for {platform}: {kernels.describe()}{stand_in}"
