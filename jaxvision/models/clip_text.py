"""CLIP text encoder (Radford et al.), matching transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection` for every config they accept.

Stable Diffusion 1.x conditions on the CLIP ViT-L/14 text tower ("sd1"), SD 2.x on the
OpenCLIP ViT-H/14 text tower as diffusers ships it ("sd2": the last of its 24 blocks dropped,
exact gelu). Both read `last_hidden_state`; `pooler_output` (the EOS token's state) and
`text_embeds` serve CLIP guidance and SDXL-style pooled conditioning.
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
from jaxvision.models.hf_config import take
from jaxvision.models.layers import EMBED, HEADS, MLP, POSITION, VOCAB, Dtype

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")

# name → (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, projection_dim)
VARIANTS: dict[str, tuple[int, int, int, int, str, int]] = {
    # openai/clip-vit-large-patch14, the text_encoder of SD 1.x.
    "sd1": (768, 12, 12, 3072, "quick_gelu", 768),
    # laion/CLIP-ViT-H-14 text tower as diffusers converted it for SD 2.x (23 of 24 blocks: SD 2
    # conditions on the penultimate layer, so the converter drops the last one).
    "sd2": (1024, 23, 16, 4096, "gelu", 512),
    "tiny": (32, 2, 4, 37, "quick_gelu", 24),  # for tests and the demo
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower, with transformers' `CLIPTextConfig` field names.

    Defaults are transformers' (so a `config.json` that leaves a key out means what it means
    there); the "sd1"/"sd2" variants reproduce the files Stable Diffusion ships, including
    their legacy `eos_token_id=2`, which selects the argmax pooling rule. Dropout
    probabilities are kept for round-tripping but never applied (Stable Diffusion uses 0.0).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    architecture: str = "CLIPTextModel"
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    attention_dropout: float = 0.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r} is not supported; use one of {ARCHITECTURES}")
        if not isinstance(self.eos_token_id, int):
            # transformers compares input_ids with it elementwise; a list cannot select one position.
            raise ConfigError(f"eos_token_id must be a single integer, got {self.eos_token_id!r}")
        layers.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> CLIPTextConfig:
        """A config from the variant table ("sd1", "sd2", "tiny"); `overrides` set any field."""
        if name not in VARIANTS:
            raise ConfigError(f"unknown CLIP text variant {name!r}; known: {', '.join(VARIANTS)}")
        width, depth, heads, mlp, act, proj = VARIANTS[name]
        fields: dict[str, Any] = dict(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp,
            hidden_act=act,
            projection_dim=proj,
        )
        if name == "tiny":
            fields.update(vocab_size=1000)
        else:  # as in the text_encoder/config.json of the SD 1.x and 2.x releases
            fields.update(bos_token_id=0, eos_token_id=2)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> CLIPTextConfig:
        """From a transformers `config.json` dict; unknown architectural keys are errors."""
        if cfg.get("model_type", "clip_text_model") != "clip_text_model":
            raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not 'clip_text_model'")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "architecture"]
        fields = take(cfg, names, source=source)
        archs = cfg.get("architectures") or ["CLIPTextModel"]
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: architectures={archs} is not implemented; jaxvision supports {', '.join(ARCHITECTURES)}"
            )
        fields["architecture"] = archs[0]
        if "projection_dim" in fields and fields["projection_dim"] is None:
            fields["projection_dim"] = fields.get("hidden_size", cls.hidden_size)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict for this config."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "architecture"}
        out["model_type"] = "clip_text_model"
        out["architectures"] = [self.architecture]
        return out


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs with transformers' names; fields the model does not produce are None.

    Attributes:
      last_hidden_state: `[batch, tokens, hidden]`, after the final LayerNorm.
      pooler_output: `[batch, hidden]`, `last_hidden_state` at each sequence's EOS token.
      hidden_states: `num_hidden_layers + 1` arrays `[batch, tokens, hidden]` (embeddings, then
        each block's output, before the final LayerNorm), when asked for.
      text_embeds: `[batch, projection_dim]` (CLIPTextModelWithProjection).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """`[batch, tokens]` int → `[batch, tokens, hidden]`."""
        c = self.config
        length = input_ids.shape[-1]
        if length > c.max_position_embeddings:
            raise ValueError(
                f"input_ids have {length} tokens but the model has max_position_embeddings="
                f"{c.max_position_embeddings}; truncate them (jaxvision.tokenizer.tokenize does)"
            )
        init = nn.initializers.normal(0.02 * c.initializer_factor)
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=layers.partitioned(init, (VOCAB, EMBED)),
            name="token_embedding",
        )
        positions = embed(
            c.max_position_embeddings,
            c.hidden_size,
            embedding_init=layers.partitioned(init, (POSITION, EMBED)),
            name="position_embedding",
        )
        return tokens(input_ids) + positions(jnp.arange(length))[None]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """`[batch, tokens, hidden]` → `[batch, tokens, hidden]`; causal, plus an optional padding bias."""
        c = self.config
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, _ = x.shape
        q, k, v = (
            proj(c.hidden_size, (EMBED, HEADS), name=n)(x).reshape(b, t, c.num_attention_heads, c.head_dim)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        out = layers.attention(q, k, v, bias=bias, is_causal=True, implementation=self.attention_impl)
        return proj(c.hidden_size, (HEADS, EMBED), name="out_proj")(out.reshape(b, t, c.hidden_size))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.activation(c.hidden_act)(proj(c.intermediate_size, (EMBED, MLP), name="fc1")(x))
        return proj(c.hidden_size, (MLP, EMBED), name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        c = self.config
        norm = functools.partial(layers.layer_norm, c.layer_norm_eps, param_dtype=self.param_dtype)
        h = norm(name="layer_norm1")(x).astype(self.dtype)
        attention = CLIPAttention(
            config=c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            name="self_attn",
        )
        x = x + attention(h, bias)
        h = norm(name="layer_norm2")(x).astype(self.dtype)
        x = x + CLIPMLP(config=c, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)
        return nn.with_logical_constraint(x, (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))


def padding_bias(attention_mask: jax.Array, dtype: Dtype) -> jax.Array:
    """`[batch, tokens]` (1 = attend, 0 = padding) → additive bias `[batch, 1, 1, tokens]`.

    Uses the dtype's most negative finite value, as transformers does, so a query row whose
    every key is masked (left padding at position 0) stays finite instead of becoming NaN.
    """
    neg = jnp.finfo(dtype).min
    return jnp.where(attention_mask.astype(bool), 0.0, neg).astype(dtype)[:, None, None, :]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """`[batch, tokens]` → `[batch]`: where transformers reads `pooler_output`.

    Checkpoints with the legacy `eos_token_id == 2` (every SD 1.x / 2.x text encoder) take the
    position of the largest id, since `<|endoftext|>` is the top of CLIP's vocabulary; newer
    configs take the first occurrence of `eos_token_id` (0 if absent, as torch's argmax).
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
    """The text tower: embeddings, causal pre-norm encoder, final LayerNorm, EOS pooling.

    Attributes:
      config: the architecture.
      dtype / param_dtype: compute and storage dtypes (norms and softmax run in fp32).
      remat_policy: per-block rematerialisation, a name from `layers.REMAT_POLICIES`.
      attention_impl: the attention seam's kernel, chosen by the caller for its platform
        (`jaxvision.models.kernels.resolve`); "auto" is the portable choice.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        c = self.config
        x = CLIPTextEmbeddings(config=c, dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")(input_ids)
        bias = None if attention_mask is None else padding_bias(attention_mask, self.dtype)
        hidden_states = [x]
        block = layers.remat(CLIPEncoderLayer, self.remat_policy)
        for i in range(c.num_hidden_layers):
            x = block(
                config=c,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                name=f"layers_{i}",
            )(x, bias)
            hidden_states.append(x)
        norm = layers.layer_norm(c.layer_norm_eps, param_dtype=self.param_dtype, name="final_layer_norm")
        sequence = norm(x).astype(self.dtype)
        pooled = sequence[jnp.arange(sequence.shape[0]), eos_positions(input_ids, c.eos_token_id)]
        return CLIPTextOutput(
            last_hidden_state=sequence,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`; params live under `text_model/` like its checkpoint keys.

    `module.apply(v, input_ids, attention_mask=None, output_hidden_states=False)` with
    `input_ids` `[batch, tokens]` (tokens ≤ max_position_embeddings) and an optional
    `attention_mask` `[batch, tokens]` (1 = token, 0 = padding; Stable Diffusion passes none).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        return CLIPTextTransformer(
            config=self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            name="text_model",
        )(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' `CLIPTextModelWithProjection`: the tower plus a bias-free projection of
    `pooler_output` to `text_embeds` `[batch, projection_dim]`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        out = CLIPTextTransformer(
            config=self.config,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            name="text_model",
        )(input_ids, attention_mask, output_hidden_states)
        projection = layers.dense(
            self.config.projection_dim,
            (EMBED, None),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="text_projection",
        )
        return out.replace(text_embeds=projection(out.pooler_output))


def build(config: CLIPTextConfig, **kwargs: Any) -> nn.Module:
    """The module `config.architecture` names, with `dtype`/`param_dtype`/... passed through."""
    if config.architecture == "CLIPTextModelWithProjection":
        return CLIPTextModelWithProjection(config=config, **kwargs)
    return CLIPTextModel(config=config, **kwargs)


def example_inputs(config: CLIPTextConfig, batch: int = 1) -> tuple[jax.ShapeDtypeStruct]:
    """Shape-only inputs for `jax.eval_shape(module.init, ...)`."""
    return (jax.ShapeDtypeStruct((batch, config.max_position_embeddings), jnp.int32),)
