"""2-D convolution as XLA:CPU runs it fastest: small feature maps and 1×1 kernels as matmuls.

XLA:CPU's convolution kernel is slow on small feature maps with many channels. Measured in jax
0.10 on this project's 2-core VM (fp32, batch 2, `benchmarks/NOTES.md` change 5): a 3×3 conv
over 1280 channels runs at 45-92 GFLOP/s on 8×8 maps and 94-141 GFLOP/s on 16×16 maps, against
265 GFLOP/s for a square matmul. Rewritten as one matmul over the nine shifted copies of the input
(im2col), the same convs run at 180-210 GFLOP/s. On 32×32 and larger maps the native kernel wins
(about 220 GFLOP/s against 160). A 1×1 conv is a dot over the channels and runs 1.3-1.6× faster
as one.

`Conv2d` is handed to `flax.linen.Conv` as its `conv_general_dilated_cls`. The parameters, their
names and their shapes stay those of `nn.Conv`, so checkpoints and key tables do not change. It
uses the matmul forms only on the CPU backend; GPUs and TPUs keep `lax.conv_general_dilated`
(cuDNN / the TPU convolution unit). The sums differ from the native kernel's only in their order.

Training steps trace under `native_convolutions()` (`train.step.make_train_step`): in a
rematerialised backward pass the nine-tap column buffers and the dots' layouts cost memory. They
raised the SD 1.5 FSDP-8 DreamBooth plan from 4.97 to 5.65 GB per device (5.30 GB with XLA's
convolution transpose as the backward pass).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# 3×3 convs over feature maps of at most this many pixels (16×16) run as im2col matmuls on CPU.
IM2COL_MAX_PIXELS = 16 * 16
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_NATIVE_ONLY = contextvars.ContextVar("jaxvision_native_convolutions", default=False)


@contextlib.contextmanager
def native_convolutions() -> Iterator[None]:
    """Convolutions traced inside this context use XLA's kernel only (the train steps use it)."""
    token = _NATIVE_ONLY.set(True)
    try:
        yield
    finally:
        _NATIVE_ONLY.reset(token)


def _matmul_form(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: lax.ConvDimensionNumbers | None,
    feature_group_count: int,
) -> str | None:
    """The form that runs this conv: "dot" (1×1), "im2col" (3×3 on a small map), None (XLA's kernel)."""
    if (
        isinstance(padding, str)
        or _NATIVE_ONLY.get()
        or jax.default_backend() != "cpu"
        or lhs.ndim != 4
        or dimension_numbers != _NHWC
    ):
        return None
    if tuple(window_strides) != (1, 1) or feature_group_count != 1:
        return None
    if any(tuple(d or (1, 1)) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        return None
    kh, kw = rhs.shape[:2]
    if (kh, kw) == (1, 1) and tuple(map(tuple, padding)) == ((0, 0), (0, 0)):
        return "dot"
    small = lhs.shape[1] * lhs.shape[2] <= IM2COL_MAX_PIXELS
    if (kh, kw) == (3, 3) and small and tuple(map(tuple, padding)) == ((1, 1), (1, 1)):
        return "im2col"
    return None


def im2col_conv3x3(x: jax.Array, kernel: jax.Array, precision: lax.PrecisionLike = None) -> jax.Array:
    """A stride-1, padding-1 3×3 conv as one matmul.

    Args:
      x: `[batch, height, width, in_channels]`.
      kernel: `[3, 3, in_channels, out_channels]` (HWIO).
    Returns:
      `[batch, height, width, out_channels]`.
    """
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Columns ordered (row offset, column offset, channel), as the HWIO kernel flattens.
    columns = jnp.concatenate([padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", columns, kernel.reshape(9 * channels, -1), precision=precision)


class Conv2d:
    """`lax.conv_general_dilated`'s signature; the matmul forms above on CPU where they are faster."""

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        window_strides: Sequence[int],
        padding: str | Sequence[tuple[int, int]],
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: lax.ConvDimensionNumbers | None = None,
        feature_group_count: int = 1,
        precision: lax.PrecisionLike = None,
    ) -> jax.Array:
        form = _matmul_form(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
        )
        if form == "dot":
            return jnp.einsum("bhwc,co->bhwo", lhs, rhs[0, 0], precision=precision)
        if form == "im2col":
            return im2col_conv3x3(lhs, rhs, precision)
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
        )
