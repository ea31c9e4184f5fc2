"""diffusers' `AutoencoderKL` (the Stable Diffusion VAE) in Flax, NHWC.

`module.apply(v, images, method="encode")` returns a `DiagonalGaussian` over latents;
`module.apply(v, latents, method="decode")` returns images. Latents here are *unscaled*, as
diffusers' `vae.encode` / `vae.decode` take them: pipelines multiply by
`config.scaling_factor` after encoding and divide before decoding.

The encoder and decoder are diffusers' `Encoder` / `Decoder` with `DownEncoderBlock2D` /
`UpDecoderBlock2D` blocks and a mid block of (resnet, single-head spatial self-attention,
resnet); the resnet and resampling blocks are shared with the UNet (`jaxvision.models.resnet`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxvision.errors import ConfigError
from jaxvision.models import layers
from jaxvision.models.hf_config import DIFFUSERS_GENERIC_KEYS, diffusers_config_dict, take
from jaxvision.models.layers import EMBED, HEADS, Dtype
from jaxvision.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv_padding

CLASS_NAME = "AutoencoderKL"
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
RESNET_EPS = 1e-6  # diffusers hard-codes it for the VAE's resnets, attention and output norms

# name → (block_out_channels, layers_per_block, latent_channels, norm_num_groups, sample_size)
VARIANTS: dict[str, tuple[tuple[int, ...], int, int, int, int]] = {
    "sd": ((128, 256, 512, 512), 2, 4, 32, 512),  # SD 1.x / 2.x (stabilityai/sd-vae-ft-mse)
    "tiny": ((16, 32), 1, 4, 8, 32),  # for tests and the demo
}


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture of an `AutoencoderKL`, with diffusers' config names and defaults.

    `scaling_factor`, `shift_factor`, `latents_mean`/`latents_std` and `force_upcast` do not
    change the network; they are kept for pipelines and for round-tripping `config.json`.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for field, supported in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for block in getattr(self, field):
                if block not in supported:
                    raise ConfigError(
                        f"{field} contains {block!r}, which jaxvision's AutoencoderKL does not implement; "
                        f"supported: {', '.join(supported)}"
                    )
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n) or n == 0:
            raise ConfigError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) "
                f"and block_out_channels ({n}) must have the same, non-zero length"
            )
        bad = [ch for ch in self.block_out_channels if ch % self.norm_num_groups]
        if bad:
            raise ConfigError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        layers.activation(self.act_fn)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> AutoencoderKLConfig:
        """A config from the variant table ("sd", "tiny"); `overrides` set any field."""
        if name not in VARIANTS:
            raise ConfigError(f"unknown AutoencoderKL variant {name!r}; known: {', '.join(VARIANTS)}")
        channels, depth, latent, groups, size = VARIANTS[name]
        fields: dict[str, Any] = dict(
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=depth,
            latent_channels=latent,
            norm_num_groups=groups,
            sample_size=size,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> AutoencoderKLConfig:
        """From a diffusers `config.json` dict; unknown keys are errors naming the key."""
        if cfg.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ConfigError(f"{source}: _class_name {cfg.get('_class_name')!r} is not {CLASS_NAME!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        fields = take(cfg, names, source=source, generic=DIFFUSERS_GENERIC_KEYS)
        for key in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            if key in fields:
                fields[key] = _tuple(fields[key])
        if isinstance(fields.get("sample_size"), list):
            fields["sample_size"] = tuple(fields["sample_size"])
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The diffusers `config.json` dict for this config."""
        return diffusers_config_dict(self, CLASS_NAME)


@flax.struct.dataclass
class DiagonalGaussian:
    """diffusers' `DiagonalGaussianDistribution` over NHWC latents.

    Attributes:
      mean: `[batch, h, w, latent_channels]`.
      logvar: same shape, clipped to [-30, 20] as diffusers does.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Splits `[..., 2 * latent_channels]` (mean first, as torch's `chunk(2, dim=1)`)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """`mean + std * N(0, 1)` drawn with `key`, in the mean's dtype."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class SpatialSelfAttention(nn.Module):
    """The VAE mid block's attention (diffusers `Attention(_from_deprecated_attn_block=True)`).

    GroupNorm, then single-head self-attention over the `H * W` positions with head_dim =
    channels, an output projection and the residual. Names follow diffusers' current keys
    (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` → `to_out_0`).
    """

    groups: int
    eps: float = RESNET_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, H, W, C]` → `[batch, H, W, C]`."""
        b, h, w, c = x.shape
        proj = functools.partial(layers.dense, c, dtype=self.dtype, param_dtype=self.param_dtype)
        hs = layers.group_norm(self.groups, self.eps, param_dtype=self.param_dtype, name="group_norm")(x)
        hs = hs.astype(self.dtype).reshape(b, h * w, c)
        q, k, v = (proj((EMBED, HEADS), name=n)(hs).reshape(b, h * w, 1, c) for n in ("to_q", "to_k", "to_v"))
        # diffusers marks this attention upcast_softmax: logits over 4096+ positions overflow fp16.
        out = layers.attention(q, k, v, implementation=self.attention_impl, upcast=True)
        out = proj((HEADS, EMBED), name="to_out_0")(out.reshape(b, h * w, c))
        return x.astype(self.dtype) + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, (attention), resnet; no temb."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        resnet = functools.partial(
            ResnetBlock2D,
            groups=c.norm_num_groups,
            eps=RESNET_EPS,
            act_fn=c.act_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            conv_impl=self.conv_impl,
        )
        x = resnet(name="resnets_0")(x)
        if c.mid_block_add_attention:
            x = SpatialSelfAttention(
                groups=c.norm_num_groups,
                eps=RESNET_EPS,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                name="attentions_0",
            )(x)
        return resnet(name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """diffusers' `DownEncoderBlock2D`: `num_layers` resnets, then a padding-0 downsampler."""

    config: AutoencoderKLConfig
    out_channels: int
    num_layers: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                out_channels=self.out_channels,
                groups=c.norm_num_groups,
                eps=RESNET_EPS,
                act_fn=c.act_fn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv_impl=self.conv_impl,
                name=f"resnets_{j}",
            )(x)
        if self.add_downsample:
            x = Downsample2D(
                padding=0,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv_impl=self.conv_impl,
                name="downsamplers_0",
            )(x)
        return nn.with_logical_constraint(x, (layers.BATCH, None, None, layers.ACT_EMBED))


class UpDecoderBlock(nn.Module):
    """diffusers' `UpDecoderBlock2D`: `num_layers` resnets, then a nearest-2x + conv upsampler."""

    config: AutoencoderKLConfig
    out_channels: int
    num_layers: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                out_channels=self.out_channels,
                groups=c.norm_num_groups,
                eps=RESNET_EPS,
                act_fn=c.act_fn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv_impl=self.conv_impl,
                name=f"resnets_{j}",
            )(x)
        if self.add_upsample:
            x = Upsample2D(
                dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl, name="upsamplers_0"
            )(x)
        return nn.with_logical_constraint(x, (layers.BATCH, None, None, layers.ACT_EMBED))


def _conv3x3(features: int, *, dtype: Dtype, param_dtype: Dtype, conv_impl: str, name: str) -> nn.Conv:
    return layers.conv(
        features, (3, 3), padding=conv_padding(1), dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, name=name
    )


class Encoder(nn.Module):
    """diffusers' VAE `Encoder` (double_z): image → `[batch, h, w, 2 * latent_channels]` moments."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if x.shape[-1] != c.in_channels:
            raise ValueError(f"images have {x.shape[-1]} channels (NHWC, last axis); the VAE expects {c.in_channels}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl)
        x = _conv3x3(c.block_out_channels[0], name="conv_in", **kw)(x.astype(self.dtype))
        down = layers.remat(DownEncoderBlock, self.remat_policy)
        last = len(c.block_out_channels) - 1
        for i, ch in enumerate(c.block_out_channels):
            x = down(
                config=c,
                out_channels=ch,
                num_layers=c.layers_per_block,
                add_downsample=i != last,
                name=f"down_blocks_{i}",
                **kw,
            )(x)
        mid = layers.remat(MidBlock, self.remat_policy)
        x = mid(config=c, attention_impl=self.attention_impl, name="mid_block", **kw)(x)
        x = layers.group_norm(c.norm_num_groups, RESNET_EPS, param_dtype=self.param_dtype, name="conv_norm_out")(x)
        x = jax.nn.silu(x).astype(self.dtype)  # diffusers' conv_act is nn.SiLU whatever act_fn says
        return _conv3x3(2 * c.latent_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' VAE `Decoder` (group norm): latents `[batch, h, w, latent_channels]` → image."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl)
        channels = tuple(reversed(c.block_out_channels))
        x = _conv3x3(channels[0], name="conv_in", **kw)(z.astype(self.dtype))
        mid = layers.remat(MidBlock, self.remat_policy)
        x = mid(config=c, attention_impl=self.attention_impl, name="mid_block", **kw)(x)
        up = layers.remat(UpDecoderBlock, self.remat_policy)
        last = len(channels) - 1
        for i, ch in enumerate(channels):
            x = up(
                config=c,
                out_channels=ch,
                num_layers=c.layers_per_block + 1,
                add_upsample=i != last,
                name=f"up_blocks_{i}",
                **kw,
            )(x)
        x = layers.group_norm(c.norm_num_groups, RESNET_EPS, param_dtype=self.param_dtype, name="conv_norm_out")(x)
        x = jax.nn.silu(x).astype(self.dtype)
        return _conv3x3(c.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL`.

    Attributes:
      config: the architecture.
      dtype / param_dtype: compute and storage dtypes (GroupNorm and softmax run in fp32).
      remat_policy: rematerialisation of each down/mid/up block, a name from
        `layers.REMAT_POLICIES`.
      attention_impl / conv_impl: the kernels (`layers.attention` / `layers.conv`), chosen by the
        caller for its platform (`jaxvision.models.kernels.resolve`); "auto" is the portable choice.
      decode_slice_size: when set and the batch is larger, `decode` runs the decoder over
        slices of this many latents, one after another (a `nn.scan`, so only one slice's
        activations are live), as diffusers' `enable_slicing()` does with slices of 1. The
        batch is zero-padded to a multiple of the slice size and trimmed after. Tiled decoding
        is not implemented.
    """

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"
    decode_slice_size: int | None = None
    conv_impl: str = "auto"

    def setup(self):
        c = self.config
        kw = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            conv_impl=self.conv_impl,
        )
        self.encoder = Encoder(config=c, **kw)
        self.decoder = Decoder(config=c, **kw)
        conv1x1 = functools.partial(
            layers.conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype, conv_impl=self.conv_impl
        )
        self.quant_conv = conv1x1(2 * c.latent_channels) if c.use_quant_conv else None
        self.post_quant_conv = conv1x1(c.latent_channels) if c.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Args: x `[batch, H, W, in_channels]` in [-1, 1]. Returns the posterior over
        `[batch, H / f, W / f, latent_channels]` latents (f = `config.downsample_factor`)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Args: z `[batch, h, w, latent_channels]` (unscaled latents). Returns images
        `[batch, h * f, w * f, out_channels]`, roughly in [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(self.dtype))
        n = self.decode_slice_size
        b = z.shape[0]
        if not n or b <= n or self.is_initializing():
            return self.decoder(z)
        slices = -(-b // n)
        z = jnp.pad(z, ((0, slices * n - b),) + ((0, 0),) * 3)  # per-sample ops: padding is inert
        scan = nn.scan(
            lambda decoder, carry, zs: (carry, decoder(zs)),
            variable_broadcast="params",
            split_rngs={"params": False},
            length=slices,
        )
        _, images = scan(self.decoder, None, z.reshape(slices, n, *z.shape[1:]))
        return images.reshape(slices * n, *images.shape[2:])[:b]

    def __call__(self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False) -> jax.Array:
        """Encode, take the posterior mode (or a sample drawn with `key`), decode; used by `init`."""
        posterior = self.encode(x)
        if sample_posterior:
            if key is None:
                raise ValueError("sample_posterior=True needs a PRNG key")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z)


def build(config: AutoencoderKLConfig, **kwargs: Any) -> AutoencoderKL:
    """The module, with `dtype`/`param_dtype`/`remat_policy`/... passed through."""
    return AutoencoderKL(config=config, **kwargs)


def example_inputs(config: AutoencoderKLConfig, batch: int = 1) -> tuple[jax.ShapeDtypeStruct]:
    """Shape-only inputs for `jax.eval_shape(module.init, ...)` (params do not depend on size)."""
    size = config.downsample_factor
    return (jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32),)
