"""Vision Transformer (Dosovitskiy et al.), matching transformers' `ViTModel` and
`ViTForImageClassification` for every config they accept. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.errors import ConfigError
from jaxvision.models import layers
from jaxvision.models.hf_config import pair, take
from jaxvision.models.layers import CLASSES, EMBED, HEADS, MLP, POSITION, Dtype

ARCHITECTURES = ("ViTModel", "ViTForImageClassification")

# name → (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size)
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "Ti/16": (192, 12, 3, 768, 16),
    "S/16": (384, 12, 6, 1536, 16),
    "B/16": (768, 12, 12, 3072, 16),
    "B/32": (768, 12, 12, 3072, 32),
    "L/16": (1024, 24, 16, 4096, 16),
    "L/32": (1024, 24, 16, 4096, 32),
    "H/14": (1280, 32, 16, 5120, 14),
    "tiny": (32, 2, 4, 64, 8),  # for tests and the demo
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT, with transformers' `ViTConfig` field names.

    `labels` is `id2label` as a tuple (index i → name); `architecture` picks the head.
    Dropout probabilities are kept for round-tripping but never applied (inference and
    fine-tuning of the released checkpoints use 0.0).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    labels: tuple[str, ...] = ()
    architecture: str = "ViTForImageClassification"
    initializer_range: float = 0.02
    encoder_stride: int = 16
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r} is not supported; use one of {ARCHITECTURES}")
        layers.activation(self.hidden_act)
        layers.activation(self.pooler_act)
        if self.architecture == "ViTForImageClassification" and not self.labels:
            raise ConfigError("ViTForImageClassification needs at least one label (id2label / num_labels)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ViTConfig:
        """A config from the variant table ("B/16", "L/16", ...); `overrides` set any field."""
        if name not in VARIANTS:
            raise ConfigError(f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)}")
        width, depth, heads, mlp, patch = VARIANTS[name]
        fields = dict(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp,
            patch_size=(patch, patch),
        )
        fields.update(overrides)
        for key in ("image_size", "patch_size"):
            fields[key] = pair(fields.get(key, getattr(cls, key)))
        return cls(**fields)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ViTConfig:
        """From a transformers `config.json` dict; unknown architectural keys are errors."""
        if cfg.get("model_type", "vit") != "vit":
            raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not 'vit'")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("labels", "architecture")]
        fields = take(cfg, names, source=source)
        for key in ("image_size", "patch_size"):
            if key in fields:
                fields[key] = pair(fields[key])
        archs = cfg.get("architectures") or ["ViTModel"]
        fields["architecture"] = archs[0]
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: architectures={archs} is not implemented; jaxvision supports {', '.join(ARCHITECTURES)}"
            )
        id2label = cfg.get("id2label")
        if id2label:
            fields["labels"] = tuple(
                str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(len(id2label))
            )
        elif cfg.get("num_labels"):
            fields["labels"] = tuple(f"LABEL_{i}" for i in range(cfg["num_labels"]))
        if fields.get("pooler_output_size") == fields.get("hidden_size", cls.hidden_size):
            fields["pooler_output_size"] = None
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict for this config."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("labels", "architecture")
        }
        out["image_size"] = self.image_size[0] if self.image_size[0] == self.image_size[1] else list(self.image_size)
        out["patch_size"] = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else list(self.patch_size)
        out["pooler_output_size"] = self.pooler_output_size or self.hidden_size
        out["model_type"] = "vit"
        out["architectures"] = [self.architecture]
        if self.labels:
            out["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
            out["label2id"] = {name: i for i, name in enumerate(self.labels)}
        return out


@flax.struct.dataclass
class ViTOutput:
    """Outputs with transformers' names; fields the model does not produce are None.

    Attributes:
      last_hidden_state: `[batch, 1 + patches, hidden]`, after the final LayerNorm.
      pooler_output: `[batch, pooler_output_size]` (ViTModel with pooler).
      hidden_states: `num_hidden_layers + 1` arrays `[batch, 1 + patches, hidden]` (embeddings,
        then each block's output), when asked for.
      logits: `[batch, num_labels]` (ViTForImageClassification).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    logits: jax.Array | None = None


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` weights of torch's bicubic resize (A = -0.75, align_corners=False, clamped edges)."""
    a = -0.75
    scale = in_size / out_size
    w = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5  # torch does not clamp this for cubic
        base = np.floor(src)
        t = src - base
        coeffs = [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ]
        for k, c in enumerate(coeffs):
            idx = int(min(max(base - 1 + k, 0), in_size - 1))
            w[o, idx] += c
    return w


def interpolate_position_embeddings(pos: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> jax.Array:
    """Bicubically resizes patch position embeddings as transformers' `interpolate_pos_encoding`.

    Args:
      pos: `[1, 1 + old_h * old_w, dim]`, the CLS position first.
    Returns:
      `[1, 1 + new_h * new_w, dim]`.
    """
    cls_pos, grid = pos[:, :1], pos[:, 1:]
    grid = grid.reshape(old_grid[0], old_grid[1], -1).astype(jnp.float32)
    wh = jnp.asarray(_bicubic_matrix(old_grid[0], new_grid[0]), jnp.float32)
    ww = jnp.asarray(_bicubic_matrix(old_grid[1], new_grid[1]), jnp.float32)
    grid = jnp.einsum("Hh,hwd,Ww->HWd", wh, grid, ww, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([cls_pos, grid.reshape(1, -1, pos.shape[-1]).astype(pos.dtype)], axis=1)


class PatchProjection(nn.Module):
    """Non-overlapping patch embedding: the strided conv of the reference, as one matmul.

    The kernel keeps the conv's HWIO layout `[patch_h, patch_w, channels, hidden]`, so weights
    convert as any conv; the computation reshapes patches and runs a single dot, which XLA
    turns into one large GEMM instead of a strided convolution.
    """

    features: int
    patch_size: tuple[int, int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, H, W, C]` → `[batch, (H // ph) * (W // pw), features]`."""
        ph, pw = self.patch_size
        b, h, w, c = x.shape
        kernel = self.param(
            "kernel",
            layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, EMBED)),
            (ph, pw, c, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            layers.partitioned(nn.initializers.zeros_init(), (EMBED,)),
            (self.features,),
            self.param_dtype,
        )
        gh, gw = h // ph, w // pw
        x = x[:, : gh * ph, : gw * pw].reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, gh * gw, ph * pw * c).astype(self.dtype)
        y = x @ kernel.reshape(ph * pw * c, self.features).astype(self.dtype)
        return y + bias.astype(self.dtype)


class ViTEmbeddings(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool = False) -> jax.Array:
        c = self.config
        b, h, w, ch = pixel_values.shape
        if ch != c.num_channels:
            raise ValueError(
                f"pixel_values have {ch} channels (NHWC, last axis) but the config says num_channels={c.num_channels}"
            )
        init = nn.initializers.truncated_normal(c.initializer_range)
        cls_token = self.param(
            "cls_token",
            layers.partitioned(init, (None, None, EMBED)),
            (1, 1, c.hidden_size),
            self.param_dtype,
        )
        num_positions = c.grid[0] * c.grid[1]
        pos = self.param(
            "position_embeddings",
            layers.partitioned(init, (None, POSITION, EMBED)),
            (1, num_positions + 1, c.hidden_size),
            self.param_dtype,
        )
        x = PatchProjection(
            features=c.hidden_size,
            patch_size=c.patch_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embeddings",
        )(pixel_values)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, c.hidden_size)), x], axis=1)
        new_grid = (h // c.patch_size[0], w // c.patch_size[1])
        if interpolate_pos_encoding:
            if not (new_grid[0] * new_grid[1] == num_positions and h == w):
                pos = interpolate_position_embeddings(pos, c.grid, new_grid)
        elif (h, w) != c.image_size:
            raise ValueError(
                f"Input image size ({h}*{w}) doesn't match model ({c.image_size[0]}*{c.image_size[1]}); "
                "pass interpolate_pos_encoding=True to resize the position embeddings"
            )
        return x + pos.astype(self.dtype)


class ViTSelfAttention(nn.Module):
    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, tokens, hidden]` → `[batch, tokens, hidden]`."""
        c = self.config
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        q, k, v = (
            proj(c.hidden_size, (EMBED, HEADS), use_bias=c.qkv_bias, name=n)(x).reshape(
                b, t, c.num_attention_heads, c.head_dim
            )
            for n in ("query", "key", "value")
        )
        out = layers.attention(q, k, v, implementation=self.attention_impl)
        return proj(c.hidden_size, (HEADS, EMBED), name="output")(out.reshape(b, t, c.hidden_size))


class ViTLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        norm = functools.partial(layers.layer_norm, c.layer_norm_eps, param_dtype=self.param_dtype)
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = norm(name="layernorm_before")(x).astype(self.dtype)
        attention = ViTSelfAttention(
            config=c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            name="attention",
        )
        x = x + attention(h)
        h = norm(name="layernorm_after")(x).astype(self.dtype)
        h = layers.activation(c.hidden_act)(proj(c.intermediate_size, (EMBED, MLP), name="intermediate")(h))
        x = x + proj(c.hidden_size, (MLP, EMBED), name="output")(h)
        return nn.with_logical_constraint(x, (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))


class ViTModel(nn.Module):
    """transformers' `ViTModel`: embeddings, encoder, final LayerNorm, optional tanh pooler.

    Attributes:
      config: the architecture.
      add_pooling_layer: the pooler exists in `ViTModel` checkpoints, not in classifiers.
      dtype / param_dtype: compute and storage dtypes (norms and softmax run in fp32).
      remat_policy: per-block rematerialisation, a name from `layers.REMAT_POLICIES`.
      attention_impl: the attention seam's kernel, chosen by the caller for its platform
        (`jaxvision.models.kernels.resolve`); "auto" is the portable choice. There is no
        `conv_impl`: the patch embedding (a conv whose stride is its kernel size) is one matmul
        (`PatchProjection`), the fast form on every platform.
    """

    config: ViTConfig
    add_pooling_layer: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(
        self,
        pixel_values: jax.Array,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> ViTOutput:
        """Args: pixel_values `[batch, height, width, channels]`, normalised as the processor does."""
        c = self.config
        embeddings = ViTEmbeddings(config=c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")
        x = embeddings(pixel_values, interpolate_pos_encoding)
        hidden_states = [x]
        block = layers.remat(ViTLayer, self.remat_policy)
        for i in range(c.num_hidden_layers):
            x = block(
                config=c,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                name=f"layer_{i}",
            )(x)
            hidden_states.append(x)
        sequence = layers.layer_norm(c.layer_norm_eps, param_dtype=self.param_dtype, name="layernorm")(x)
        sequence = sequence.astype(self.dtype)
        pooled = None
        if self.add_pooling_layer:
            dense = layers.dense(
                c.pooler_output_size or c.hidden_size,
                (EMBED, None),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="pooler",
            )
            pooled = layers.activation(c.pooler_act)(dense(sequence[:, 0]))
        return ViTOutput(
            last_hidden_state=sequence,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class ViTForImageClassification(nn.Module):
    """transformers' `ViTForImageClassification`: ViT without pooler + linear head on the CLS token.

    Attributes are `ViTModel`'s (less `add_pooling_layer`).
    """

    config: ViTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(
        self,
        pixel_values: jax.Array,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> ViTOutput:
        out = ViTModel(
            config=self.config,
            add_pooling_layer=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            name="vit",
        )(pixel_values, output_hidden_states, interpolate_pos_encoding)
        logits = layers.dense(
            self.config.num_labels,
            (EMBED, CLASSES),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.zeros_init(),
            name="classifier",
        )(out.last_hidden_state[:, 0])
        return out.replace(logits=logits.astype(jnp.float32))


def build(config: ViTConfig, **kwargs: Any) -> nn.Module:
    """The module `config.architecture` names, with `dtype`/`param_dtype`/... passed through."""
    if config.architecture == "ViTModel":
        return ViTModel(config=config, **kwargs)
    return ViTForImageClassification(config=config, **kwargs)


def example_inputs(config: ViTConfig, batch: int = 1) -> tuple[jax.ShapeDtypeStruct]:
    """Shape-only inputs for `jax.eval_shape(module.init, ...)`."""
    return (jax.ShapeDtypeStruct((batch, *config.image_size, config.num_channels), jnp.float32),)
