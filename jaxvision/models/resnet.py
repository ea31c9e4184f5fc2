"""Residual and resampling blocks of diffusers' 2-D models, shared by the UNet and the VAE.

`ResnetBlock2D`, `Downsample2D` and `Upsample2D` match `diffusers.models.resnet.ResnetBlock2D`
(the "default" time-embedding norm), `diffusers.models.downsampling.Downsample2D` and
`diffusers.models.upsampling.Upsample2D`. Parameter names follow diffusers (`norm1`, `conv1`,
`time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`, `conv`), so the UNet's and the VAE's key
tables map them with one rule per name. Everything is NHWC; convolution kernels are HWIO.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.layers import CONV_OUT, EMBED, Dtype


def conv_padding(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit (H, W) padding of a torch `Conv2d(padding=p)`.

    Flax's "SAME" pads a stride-2 conv asymmetrically ((0, 1) on even sizes), torch pads
    `p` on both sides, so the blocks always pass explicit pads.
    """
    return ((padding, padding), (padding, padding))


class ResnetBlock2D(nn.Module):
    """diffusers' `ResnetBlock2D` with `time_embedding_norm="default"` and `pre_norm=True`.

    GroupNorm → act → conv3x3 → (+ Linear(act(temb)) broadcast over H, W) → GroupNorm → act →
    dropout (inactive: inference and SD fine-tuning use 0.0) → conv3x3, plus the input (through
    a 1x1 `conv_shortcut` when the channel count changes), divided by `output_scale_factor`.

    Attributes:
      out_channels: output channels; None keeps the input's.
      groups / groups_out: GroupNorm groups of `norm1` / `norm2` (`groups_out` None → `groups`).
      eps: GroupNorm epsilon (diffusers' `resnet_eps`, 1e-6 in SD).
      act_fn: activation name (diffusers' "silu"/"swish").
      output_scale_factor: the residual sum is divided by it.
      use_in_shortcut: force or forbid the 1x1 shortcut; None → only when channels change.
      conv_shortcut_bias: whether the 1x1 shortcut has a bias.
      dtype / param_dtype: compute and storage dtypes (GroupNorm runs in fp32).
      conv_impl: the convolutions' kernel, as `layers.conv` takes it.
    """

    out_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    conv_shortcut_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """Args:
          x: `[batch, height, width, in_channels]`.
          temb: `[batch, temb_channels]` time embedding, or None (the VAE). The `time_emb_proj`
            parameters exist only in a block called with a `temb`.
        Returns:
          `[batch, height, width, out_channels]`.
        """
        in_channels = x.shape[-1]
        out_channels = self.out_channels or in_channels
        act = layers.activation(self.act_fn)

        def conv(features: int, kernel: int, name: str, use_bias: bool = True) -> nn.Conv:
            pad = conv_padding(kernel // 2)
            return layers.conv(
                features,
                (kernel, kernel),
                padding=pad,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv_impl=self.conv_impl,
                name=name,
            )

        h = layers.group_norm(self.groups, self.eps, param_dtype=self.param_dtype, name="norm1")(x)
        h = act(h).astype(self.dtype)
        h = conv(out_channels, 3, "conv1")(h)
        if temb is not None:
            t = layers.dense(
                out_channels,
                (EMBED, CONV_OUT),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="time_emb_proj",
            )(act(temb.astype(self.dtype)))
            h = h + t[:, None, None, :]
        h = layers.group_norm(self.groups_out or self.groups, self.eps, param_dtype=self.param_dtype, name="norm2")(h)
        h = act(h).astype(self.dtype)
        h = conv(out_channels, 3, "conv2")(h)
        use_shortcut = in_channels != out_channels if self.use_in_shortcut is None else self.use_in_shortcut
        residual = x.astype(self.dtype)
        if use_shortcut:
            residual = conv(out_channels, 1, "conv_shortcut", use_bias=self.conv_shortcut_bias)(residual)
        out = residual + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """diffusers' `Downsample2D` (name "op"): a stride-2 conv3x3, or 2x2 average pooling.

    Attributes:
      out_channels: None keeps the input's channels.
      use_conv: conv3x3 stride 2 (True) or `AvgPool2d(2)` (False; then channels are unchanged).
      padding: torch's conv padding. 1 (the UNet) pads one pixel on every side; 0 (the VAE
        encoder) first pads one zero row/column at the bottom/right only, as diffusers'
        `F.pad(x, (0, 1, 0, 1))` does, then convolves unpadded.
      conv_impl: the conv's kernel, as `layers.conv` takes it.
    """

    out_channels: int | None = None
    use_conv: bool = True
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, H, W, C]` → `[batch, ceil-ish(H / 2), ceil-ish(W / 2), out_channels]` (torch's sizes)."""
        if not self.use_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        pad = ((0, 1), (0, 1)) if self.padding == 0 else conv_padding(self.padding)
        return layers.conv(
            self.out_channels or x.shape[-1],
            (3, 3),
            strides=(2, 2),
            padding=pad,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
            name="conv",
        )(x.astype(self.dtype))


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """torch's `F.interpolate(mode="nearest")` on NHWC: 2x, or to `output_size` `(H, W)`.

    torch picks source index `floor(dst * in / out)`; for 2x that is a plain repeat.
    """
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    (h, w), (oh, ow) = x.shape[1:3], output_size
    rows = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """diffusers' `Upsample2D` (name "conv"): nearest-neighbour 2x, then an optional conv3x3.

    Attributes:
      out_channels: None keeps the input's channels.
      use_conv: apply the conv3x3 (padding 1) after upsampling; it is named `conv`.
      conv_impl: the conv's kernel, as `layers.conv` takes it.
    """

    out_channels: int | None = None
    use_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """`[batch, H, W, C]` → `[batch, 2H, 2W, out_channels]` (or `output_size` spatially, as
        the UNet passes when a skip connection's size is odd)."""
        x = upsample_nearest(x.astype(self.dtype), output_size)
        if not self.use_conv:
            return x
        return layers.conv(
            self.out_channels or x.shape[-1],
            (3, 3),
            padding=conv_padding(1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
            name="conv",
        )(x)
