"""2-D convolutions as matmuls: 1×1 kernels as a dot, 3×3 kernels over small maps as im2col.

Which convolution runs is the module's `conv_impl` field, chosen by the caller for the platform
the program runs on (`jaxvision.models.kernels.resolve`); nothing here asks which backend it is
traced on. `layers.conv(..., conv_impl="matmul")` hands `MatmulConv2d` to `flax.linen.Conv` as
its `conv_general_dilated_cls`; "xla" and "auto" keep `lax.conv_general_dilated`.

Why the matmul forms exist: XLA:CPU's convolution kernel is slow on small feature maps with many
channels, and one matmul over the nine shifted copies of the input (im2col) runs much faster
there; a 1×1 conv is a dot over the channels. On larger maps the native kernel wins, so im2col is
used only up to `IM2COL_MAX_PIXELS`. GPUs and TPUs have fast convolution units (cuDNN, the TPU's)
and keep XLA's convolution, and so do training steps on every platform: in a rematerialised
backward pass the column buffers and the dots' layouts cost memory. The measurements behind
these rules are in `benchmarks/NOTES.md` ("Kernel choices").

Both forms keep `nn.Conv`'s parameters (names, shapes, HWIO layout), so checkpoints and key
tables do not depend on `conv_impl`; the sums differ from the native kernel's only in their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# 3×3 convs over feature maps of at most this many pixels (16×16) run as im2col matmuls.
IM2COL_MAX_PIXELS = 16 * 16
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


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
    if isinstance(padding, str) or lhs.ndim != 4 or dimension_numbers != _NHWC:
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


class MatmulConv2d:
    """`lax.conv_general_dilated`'s signature; the matmul forms above where they apply, XLA's
    kernel for every other conv (strided, dilated, grouped, larger kernels or maps)."""

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
