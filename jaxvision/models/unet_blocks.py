"""The down, mid and up blocks of the SD 1.x/2.x UNet and its timestep embedding.

Each block matches the diffusers class of the same name (`CrossAttnDownBlock2D`, `DownBlock2D`,
`UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`, `TimestepEmbedding`, and
`get_timestep_embedding`), with diffusers' child names (`resnets_{j}`, `attentions_{j}`,
`downsamplers_0`, `upsamplers_0`, `linear_1`, `linear_2`). A block receives one `BlockConfig`,
which `UNet2DConditionConfig` derives per block the way diffusers' `get_down_block` /
`get_mid_block` / `get_up_block` do. Everything is NHWC.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.models import layers
from jaxvision.models.layers import EMBED, MLP, Dtype
from jaxvision.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from jaxvision.models.transformer_2d import Transformer2DModel


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What one down/mid/up block needs to know (diffusers' `get_*_block` arguments that matter).

    Attributes:
      out_channels: the block's channel width.
      num_layers: resnets in the block (up blocks: `layers_per_block + 1`; the mid block: 1
        transformer between 2 resnets).
      num_heads: attention heads of its transformers (head_dim = out_channels // num_heads).
      groups / eps / act_fn: the resnets' GroupNorm groups and epsilon, and activation.
      only_cross_attention: the transformers' first attention attends to the text too.
      upcast_attention: fp32 attention logits.
      output_scale_factor: resnet residual divisor (the mid block's `mid_block_scale_factor`).
      add_sample: append a Downsample2D (down blocks) / Upsample2D (up blocks).
      downsample_padding: the downsampler's conv padding.
      transformer_layers: BasicTransformerBlocks per Transformer2DModel.
    """

    out_channels: int
    num_layers: int = 1
    num_heads: int = 1
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    only_cross_attention: bool = False
    upcast_attention: bool = False
    output_scale_factor: float = 1.0
    add_sample: bool = True
    downsample_padding: int = 1
    transformer_layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.out_channels // self.num_heads


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> jax.Array:
    """diffusers' `get_timestep_embedding`, in fp32.

    Args:
      timesteps: `[batch]` (may be fractional).
      dim: embedding width.
      flip_sin_to_cos: `[cos, sin]` order instead of `[sin, cos]`.
      freq_shift: diffusers' `downscale_freq_shift`.
    Returns:
      `[batch, dim]` fp32.
    """
    half = dim // 2
    # The frequencies are constants: computed in numpy as torch does (fp32 exponent), with the
    # exp in fp64 rounded to fp32, which reproduces torch's values bit for bit; XLA's fp32 exp
    # can be an ulp off, which timesteps near 1000 amplify to ~3e-5.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding`: `linear_1` → act → `linear_2` (→ optional post-activation)."""

    features: int
    act_fn: str = "silu"
    post_act_fn: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, in]` → `[batch, features]`."""
        x = layers.dense(self.features, (EMBED, MLP), dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(
            x.astype(self.dtype)
        )
        x = layers.activation(self.act_fn)(x)
        x = layers.dense(self.features, (MLP, EMBED), dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(
            x
        )
        if self.post_act_fn is not None:
            x = layers.activation(self.post_act_fn)(x)
        return x


class _Block(nn.Module):
    """Shared fields and sub-module factories of the five block types.

    Attributes:
      block: what the block builds.
      dtype / param_dtype: compute and storage dtypes.
      remat_policy: rematerialisation of each resnet and spatial transformer.
      attention_impl / conv_impl: the kernels, as `layers.attention` / `layers.conv` take them.
    """

    block: BlockConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"
    conv_impl: str = "auto"

    def resnet(self, j: int) -> nn.Module:
        b = self.block
        return layers.remat(ResnetBlock2D, self.remat_policy)(
            out_channels=b.out_channels,
            groups=b.groups,
            eps=b.eps,
            act_fn=b.act_fn,
            output_scale_factor=b.output_scale_factor,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
            name=f"resnets_{j}",
        )

    def transformer(self, j: int) -> nn.Module:
        b = self.block
        return layers.remat(Transformer2DModel, self.remat_policy)(
            num_heads=b.num_heads,
            head_dim=b.head_dim,
            num_layers=b.transformer_layers,
            norm_num_groups=b.groups,
            only_cross_attention=b.only_cross_attention,
            upcast=b.upcast_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            chunk_ff=self.remat_policy != "none",
            name=f"attentions_{j}",
        )

    def downsample(self, x: jax.Array) -> jax.Array:
        b = self.block
        return Downsample2D(
            out_channels=b.out_channels,
            padding=b.downsample_padding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
            name="downsamplers_0",
        )(x)

    def upsample(self, x: jax.Array, output_size: tuple[int, int] | None) -> jax.Array:
        return Upsample2D(
            out_channels=self.block.out_channels,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
            name="upsamplers_0",
        )(x, output_size)


class DownBlock2D(_Block):
    """`num_layers` resnets, then an optional stride-2 downsampler; every output is a skip."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Args: x `[batch, H, W, C_in]`, temb `[batch, T]`. Returns `(x, skips)`; each skip is NHWC."""
        skips = []
        for j in range(self.block.num_layers):
            x = self.resnet(j)(x, temb)
            skips.append(x)
        if self.block.add_sample:
            x = self.downsample(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(_Block):
    """`num_layers` (resnet → spatial transformer) pairs, then an optional downsampler."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Args: x `[batch, H, W, C_in]`, temb `[batch, T]`, context `[batch, L, D]`. Returns `(x, skips)`."""
        skips = []
        for j in range(self.block.num_layers):
            x = self.resnet(j)(x, temb)
            x = self.transformer(j)(x, context)
            skips.append(x)
        if self.block.add_sample:
            x = self.downsample(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_Block):
    """resnet, then `num_layers` (spatial transformer → resnet) pairs."""

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """`[batch, H, W, C]` → `[batch, H, W, C]`."""
        x = self.resnet(0)(x, temb)
        for j in range(self.block.num_layers):
            x = self.transformer(j)(x, context)
            x = self.resnet(j + 1)(x, temb)
        return x


class UpBlock2D(_Block):
    """`num_layers` resnets, each over `concat(x, the last unused skip)`, then an optional upsampler."""

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        output_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """Args:
          x: `[batch, H, W, C_prev]`.
          skips: `num_layers` skip tensors, consumed from the last.
          temb: `[batch, T]`.
          output_size: the upsampler's target `(H, W)` when it is not simply 2x.
        Returns:
          `[batch, H', W', out_channels]`.
        """
        for j in range(self.block.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = self.resnet(j)(x, temb)
        if self.block.add_sample:
            x = self.upsample(x, output_size)
        return x


class CrossAttnUpBlock2D(_Block):
    """As `UpBlock2D`, with a spatial transformer after every resnet."""

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        output_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """As `UpBlock2D.__call__`, plus context `[batch, L, D]`."""
        for j in range(self.block.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = self.resnet(j)(x, temb)
            x = self.transformer(j)(x, context)
        if self.block.add_sample:
            x = self.upsample(x, output_size)
        return x


DOWN_BLOCKS: dict[str, type[_Block]] = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_BLOCKS: dict[str, type[_Block]] = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}
MID_BLOCKS: dict[str, type[_Block]] = {"UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn}
