"""Which attention and convolution kernels a model runs: plain module fields, chosen by the caller.

A model is a pure function of its fields. It never asks which backend it is traced on; its
`attention_impl` and `conv_impl` fields say which kernels run. Callers (pipelines, trainers,
planners, `from_pretrained`) pick them for the platform the program will run on:

    platform = kernels.platform_of(mesh)  # "cpu", "gpu" or "tpu"
    k = kernels.resolve(platform, dtype=jnp.bfloat16, training=True)
    module = kernels.with_kernels(module, k)

so a CPU host can build (and `plan`) the program a GPU would run. Inside model code the value
"auto" is the portable choice, with no probing: attention "auto" lets
`jax.nn.dot_product_attention` choose (as None does), conv "auto" is XLA's convolution.

`resolve`'s rules for "auto":
- attention: "cpu" on CPU (`layers.head_loop_attention` for long unmasked sequences, the einsum
  path for fp16, XLA's attention otherwise: the fastest forms on XLA:CPU); "cudnn" on GPUs for
  bf16/fp16 compute (cuDNN's fused attention takes only those), else None; None on TPUs.
- conv: "matmul" on CPU for inference (1×1 convs as dots, 3×3 convs on small maps as im2col,
  faster on XLA:CPU), "xla" otherwise. Training steps use XLA's convolutions on every platform:
  in a rematerialised backward pass the matmul forms' column buffers cost memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.errors import ConfigError

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked", "cpu", "reference")
CONV_IMPLS = ("auto", "xla", "matmul")
PLATFORMS = ("cpu", "gpu", "tpu")
# jax names GPU devices by their runtime; the kernels only care that it is a GPU.
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_attention(impl: str | None) -> None:
    """Raises ConfigError unless `impl` is one of `ATTENTION_IMPLS` or None."""
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ConfigError(
            f"attention implementation {impl!r} is not known; choose one of {', '.join(ATTENTION_IMPLS)}, "
            "or None (jax.nn.dot_product_attention chooses)"
        )


def check_conv(impl: str) -> None:
    """Raises ConfigError unless `impl` is one of `CONV_IMPLS`."""
    if impl not in CONV_IMPLS:
        raise ConfigError(f"conv implementation {impl!r} is not known; choose one of {', '.join(CONV_IMPLS)}")


def _check_platform(platform: str) -> str:
    platform = _PLATFORM_ALIASES.get(platform, platform)
    if platform not in PLATFORMS:
        raise ConfigError(f"platform {platform!r} is not known; choose one of {', '.join(PLATFORMS)}")
    return platform


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels a model runs, as its `attention_impl` / `conv_impl` fields take them.

    Attributes:
      attention: one of `ATTENTION_IMPLS`, or None (`jax.nn.dot_product_attention` chooses).
      conv: one of `CONV_IMPLS`.
    """

    attention: str | None
    conv: str

    def __post_init__(self):
        check_attention(self.attention)
        check_conv(self.conv)

    def describe(self) -> str:
        """One line for logs and plans, e.g. "attention=cpu conv=matmul"."""
        return f"attention={self.attention} conv={self.conv}"


def platform_of(mesh: jax.sharding.Mesh | None = None) -> str:
    """The platform ("cpu", "gpu", "tpu", ...) of `mesh`'s devices, or of the default devices.

    For callers only (pipelines, trainers, planners, `from_pretrained`): model code takes its
    kernels as fields and never calls this.
    """
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return _PLATFORM_ALIASES.get(device.platform, device.platform)


def resolve(
    platform: str,
    *,
    attention: str | None = "auto",
    conv: str = "auto",
    dtype: Any = jnp.float32,
    training: bool = False,
) -> Kernels:
    """The kernels for a program on `platform`: "auto" resolved by the rules above, anything else kept.

    Args:
      platform: "cpu", "gpu" or "tpu" (`platform_of(mesh)`); "cuda"/"rocm" mean "gpu".
      attention: an entry of `ATTENTION_IMPLS` or None; only "auto" is resolved.
      conv: an entry of `CONV_IMPLS`; only "auto" is resolved.
      dtype: the compute dtype (cuDNN's fused attention takes bf16/fp16 only).
      training: a train step (XLA's convolutions; see the module docstring).
    Returns:
      `Kernels` with no "auto" left.
    Raises:
      ConfigError: an unknown platform or implementation.
    """
    platform = _check_platform(platform)
    check_attention(attention)
    check_conv(conv)
    if attention == "auto":
        if platform == "cpu":
            attention = "cpu"
        elif platform == "gpu" and jnp.dtype(dtype) in _LOW_PRECISION:
            attention = "cudnn"
        else:
            attention = None
    if conv == "auto":
        conv = "matmul" if platform == "cpu" and not training else "xla"
    return Kernels(attention=attention, conv=conv)


def compilable_here(kernels: Kernels, platform: str) -> Kernels:
    """`kernels` with what cannot be compiled on `platform` replaced by a stand-in that can.

    Lets a planner compile, on a CPU host, the program a GPU would run. Only cuDNN's attention
    needs its platform; off a GPU it becomes "chunked", whose memory is bounded like the fused
    kernel's (XLA's attention would materialise every logit and overstate the plan).
    """
    platform = _check_platform(platform)
    if kernels.attention == "cudnn" and platform != "gpu":
        return dataclasses.replace(kernels, attention="chunked")
    return kernels


def with_kernels(module: nn.Module, kernels: Kernels) -> nn.Module:
    """`module` with its `attention_impl` / `conv_impl` fields set from `kernels`.

    Only the fields the module has are set (a CLIP text encoder has no convolutions).

    Raises:
      TypeError: the module has neither field.
    """
    names = {f.name for f in dataclasses.fields(module)}
    updates = {
        field: value
        for field, value in (("attention_impl", kernels.attention), ("conv_impl", kernels.conv))
        if field in names
    }
    if not updates:
        raise TypeError(f"{type(module).__name__} has no attention_impl or conv_impl field")
    return module.clone(**updates)
