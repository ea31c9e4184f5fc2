"""Dynamic loss scaling for fp16 training (the scheme of NVIDIA Apex / `jmp.DynamicLossScale`).

fp16 gradients underflow below ~6e-8, so the loss is multiplied by a large scale before
differentiation and the gradients divided by it afterwards. When a step's gradients overflow
(inf/NaN) the update is skipped and the scale halved; after `period` finite steps in a row it
is doubled. bf16 has fp32's exponent range and needs none of this.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any


@flax.struct.dataclass
class DynamicLossScale:
    """State of the scale; lives in the train state so checkpoints resume it.

    Attributes:
      scale: fp32 scalar multiplying the loss.
      good_steps: int32 scalar, finite steps since the last change.
      period: finite steps before doubling (static).
      factor: multiply/divide by this (static).
      min_scale: never go below (static).
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = flax.struct.field(pytree_node=False, default=2000)
    factor: float = flax.struct.field(pytree_node=False, default=2.0)
    min_scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, initial_scale: float = 2.0**15, period: int = 2000) -> DynamicLossScale:
        return cls(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32), period=period)

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        return loss * self.scale.astype(loss.dtype)

    def unscale(self, grads: PyTree) -> PyTree:
        inv = 1.0 / self.scale
        return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        """The next state: halve on overflow, double after `period` finite steps."""
        grow = grads_finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, self.scale * self.factor, self.scale),
            jnp.maximum(self.scale / self.factor, self.min_scale),
        )
        good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good_steps.astype(jnp.int32))


def all_finite(tree: PyTree) -> jax.Array:
    """A bool scalar: every element of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """`on_true` where the scalar `pred` holds, else `on_false` (leafwise `jnp.where`)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
