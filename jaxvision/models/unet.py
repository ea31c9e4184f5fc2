"""diffusers' `UNet2DConditionModel` for the Stable Diffusion 1.x and 2.x families, in Flax Linen.

`module.apply(v, sample, timesteps, encoder_hidden_states)` returns the model output (noise or
v-prediction) shaped like `sample`, NHWC. The config reads diffusers' `config.json` strictly:
every key diffusers writes is accepted, and a key that selects something this port does not
implement (class embeddings, added conditions, scale-shift resnets, dual/gated attention, ...)
raises a ConfigError naming the key and its value instead of silently building another network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.errors import ConfigError
from jaxvision.models import layers
from jaxvision.models.hf_config import DIFFUSERS_GENERIC_KEYS, diffusers_config_dict, take
from jaxvision.models.layers import Dtype
from jaxvision.models.resnet import conv_padding
from jaxvision.models.unet_blocks import (
    DOWN_BLOCKS,
    MID_BLOCKS,
    UP_BLOCKS,
    BlockConfig,
    TimestepEmbedding,
    timestep_embedding,
)

CLASS_NAME = "UNet2DConditionModel"

# Keys whose non-default values select features this port does not implement → their default.
UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
}

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
VARIANTS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    # stabilityai/stable-diffusion-2-1 (768, v-prediction) unet/config.json
    "sd21": dict(
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
    # for tests and the demo
    "tiny": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
}


def _per_block(value: Any, n: int, key: str) -> tuple:
    """diffusers' broadcast of an int/bool (or a per-block list) to one value per down block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{key}={list(value)} has {len(value)} entries; the UNet has {n} down blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """diffusers' `UNet2DConditionModel` config, with its field names and defaults.

    `attention_head_dim` is, as in diffusers' SD configs, the number of heads per block
    (diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`); head
    width is `block_out_channels[i] // heads`. Inert keys (dropout, keys read only by block
    types this port does not build) are kept for round-tripping.
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = _SD_DOWN
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = _SD_UP
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        for key in (
            "only_cross_attention",
            "layers_per_block",
            "cross_attention_dim",
            "attention_head_dim",
            "transformer_layers_per_block",
            "sample_size",
        ):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        for key, default in UNSUPPORTED_UNLESS_DEFAULT.items():
            if getattr(self, key) != default:
                why = (
                    "diffusers' UNet2DConditionModel rejects it too; SD configs give the head count as "
                    "attention_head_dim"
                    if key == "num_attention_heads"
                    else "this is not an SD 1.x/2.x UNet"
                )
                raise ConfigError(
                    f"{key}={getattr(self, key)!r} is not supported by jaxvision's UNet2DConditionModel "
                    f"(only {default!r}); {why}"
                )
        if any(
            n != 1
            for n in _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")
        ):
            raise ConfigError(
                f"transformer_layers_per_block={self.transformer_layers_per_block!r} is not supported (only 1, "
                "as in SD 1.x/2.x)"
            )
        if self.norm_num_groups is None:
            raise ConfigError("norm_num_groups=None (no output GroupNorm) is not supported")
        n = self.num_blocks
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ConfigError(
                f"down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and block_out_channels "
                f"({len(self.block_out_channels)}) must have the same length"
            )
        for key, types, known in (
            ("down_block_types", self.down_block_types, DOWN_BLOCKS),
            ("up_block_types", self.up_block_types, UP_BLOCKS),
        ):
            for t in types:
                if t not in known:
                    raise ConfigError(f"{key} contains {t!r}; supported block types: {', '.join(known)}")
        heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
        for i, (c, h) in enumerate(zip(self.block_out_channels, heads, strict=True)):
            if c % h or c % self.norm_num_groups:
                raise ConfigError(
                    f"block_out_channels[{i}]={c} must be divisible by its head count attention_head_dim={h} "
                    f"and by norm_num_groups={self.norm_num_groups}"
                )
        widths = set(_per_block(self.cross_attention_dim, n, "cross_attention_dim"))
        if len(widths) != 1:
            raise ConfigError(
                f"cross_attention_dim={list(self.cross_attention_dim)}: every block attends to the same "
                "encoder_hidden_states, so one width is supported"
            )
        _per_block(self.only_cross_attention, n, "only_cross_attention")
        _per_block(self.layers_per_block, n, "layers_per_block")
        for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            if getattr(self, key) is not None:
                try:
                    layers.activation(getattr(self, key))
                except ValueError as e:
                    raise ConfigError(f"{key}: {e}") from None
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, key) % 2 != 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be odd (torch pads (k - 1) // 2 per side)")

    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def context_width(self) -> int:
        """The width of `encoder_hidden_states`."""
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")[0]

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def _common(self) -> dict[str, Any]:
        return dict(
            groups=self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn, upcast_attention=self.upcast_attention
        )

    def down_block(self, i: int) -> BlockConfig:
        """The i-th down block, as diffusers' `get_down_block` builds it."""
        n = self.num_blocks
        return BlockConfig(
            out_channels=self.block_out_channels[i],
            num_layers=_per_block(self.layers_per_block, n, "layers_per_block")[i],
            num_heads=_per_block(self.attention_head_dim, n, "attention_head_dim")[i],
            only_cross_attention=bool(_per_block(self.only_cross_attention, n, "only_cross_attention")[i]),
            add_sample=i < n - 1,
            downsample_padding=self.downsample_padding,
            **self._common(),
        )

    def mid_block(self) -> BlockConfig:
        """The mid block; diffusers does not pass `only_cross_attention` to it."""
        return BlockConfig(
            out_channels=self.block_out_channels[-1],
            num_layers=1,
            num_heads=_per_block(self.attention_head_dim, self.num_blocks, "attention_head_dim")[-1],
            output_scale_factor=self.mid_block_scale_factor,
            **self._common(),
        )

    def up_block(self, i: int) -> BlockConfig:
        """The i-th up block: per-block lists are read reversed; one more resnet than the down block."""
        n = self.num_blocks
        r = n - 1 - i
        return BlockConfig(
            out_channels=self.block_out_channels[r],
            num_layers=_per_block(self.layers_per_block, n, "layers_per_block")[r] + 1,
            num_heads=_per_block(self.attention_head_dim, n, "attention_head_dim")[r],
            only_cross_attention=bool(_per_block(self.only_cross_attention, n, "only_cross_attention")[r]),
            add_sample=i < n - 1,
            **self._common(),
        )

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> UNet2DConditionConfig:
        """ "sd15", "sd21" or "tiny"; `overrides` set any field."""
        if name not in VARIANTS:
            raise ConfigError(f"unknown UNet variant {name!r}; known: {', '.join(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> UNet2DConditionConfig:
        """From a diffusers `config.json` dict; unknown keys and unsupported values are ConfigErrors."""
        if cfg.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ConfigError(f"{source}: _class_name {cfg.get('_class_name')!r} is not {CLASS_NAME!r}")
        fields = take(cfg, [f.name for f in dataclasses.fields(cls)], source=source, generic=DIFFUSERS_GENERIC_KEYS)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The diffusers `config.json` dict (`_class_name`, `_diffusers_version` and every field)."""
        return diffusers_config_dict(self, CLASS_NAME)


class UNet2DConditionModel(nn.Module):
    """diffusers' `UNet2DConditionModel` (SD 1.x/2.x).

    Attributes:
      config: the architecture.
      dtype / param_dtype: compute and storage dtypes (GroupNorm, LayerNorm and softmax in fp32).
      remat_policy: rematerialisation of every resnet and spatial transformer, a name from
        `layers.REMAT_POLICIES`.
      attention_impl / conv_impl: the kernels (`layers.attention` / `layers.conv`), chosen by the
        caller for its platform (`jaxvision.models.kernels.resolve`); "auto" is the portable choice.
    """

    config: UNet2DConditionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array) -> jax.Array:
        """Args:
          sample: `[batch, height, width, in_channels]` noisy latents.
          timesteps: a scalar or `[batch]` (ints or floats).
          encoder_hidden_states: `[batch, text_len, cross_attention_dim]`.
        Returns:
          `[batch, height, width, out_channels]` fp32 model output.
        """
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(
            remat_policy=self.remat_policy, attention_impl=self.attention_impl, conv_impl=self.conv_impl, **kw
        )
        batch = sample.shape[0]
        if sample.shape[-1] != c.in_channels:
            raise ValueError(
                f"sample has {sample.shape[-1]} channels (NHWC, last axis); the config says in_channels={c.in_channels}"
            )
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        t_emb = timestep_embedding(
            timesteps, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )
        emb = TimestepEmbedding(
            features=c.time_embed_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act, name="time_embedding", **kw
        )(t_emb)
        if c.time_embedding_act_fn is not None:
            emb = layers.activation(c.time_embedding_act_fn)(emb)
        context = encoder_hidden_states.astype(self.dtype)

        def conv(features: int, k: int, name: str) -> nn.Conv:
            pad = conv_padding((k - 1) // 2)
            return layers.conv(features, (k, k), padding=pad, conv_impl=self.conv_impl, name=name, **kw)

        x = conv(c.block_out_channels[0], c.conv_in_kernel, "conv_in")(sample.astype(self.dtype))
        skips: list[jax.Array] = [x]
        for i, kind in enumerate(c.down_block_types):
            block = DOWN_BLOCKS[kind](block=c.down_block(i), name=f"down_blocks_{i}", **block_kw)
            x, res = block(x, emb, context) if kind.startswith("CrossAttn") else block(x, emb)
            skips.extend(res)
        x = MID_BLOCKS[c.mid_block_type](block=c.mid_block(), name="mid_block", **block_kw)(x, emb, context)
        # diffusers forwards each skip's size to the upsampler when the input is not a multiple of
        # the total downsampling factor (odd intermediate sizes would otherwise not line up).
        factor = 2 ** (c.num_blocks - 1)
        forward_size = any(d % factor for d in sample.shape[1:3])
        for i, kind in enumerate(c.up_block_types):
            cfg = c.up_block(i)
            res, skips = skips[-cfg.num_layers :], skips[: -cfg.num_layers]
            size = tuple(skips[-1].shape[1:3]) if forward_size and i < c.num_blocks - 1 else None
            block = UP_BLOCKS[kind](block=cfg, name=f"up_blocks_{i}", **block_kw)
            x = (
                block(x, tuple(res), emb, context, size)
                if kind.startswith("CrossAttn")
                else block(x, tuple(res), emb, size)
            )
        x = layers.group_norm(c.norm_num_groups, c.norm_eps, param_dtype=self.param_dtype, name="conv_norm_out")(x)
        x = layers.activation(c.act_fn)(x).astype(self.dtype)
        x = conv(c.out_channels, c.conv_out_kernel, "conv_out")(x)
        return x.astype(jnp.float32)


def build(config: UNet2DConditionConfig, **kwargs: Any) -> UNet2DConditionModel:
    """The module, with `dtype`/`param_dtype`/`remat_policy`/`attention_impl`/`conv_impl` passed through."""
    return UNet2DConditionModel(config=config, **kwargs)


def example_inputs(config: UNet2DConditionConfig, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shape-only `(sample, timesteps, encoder_hidden_states)` for `jax.eval_shape(module.init, ...)`."""
    side = 2 ** (config.num_blocks - 1)
    return (
        jax.ShapeDtypeStruct((batch, side, side, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, 1, config.context_width), jnp.float32),
    )
