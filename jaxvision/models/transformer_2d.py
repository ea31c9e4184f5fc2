"""The spatial transformer of the SD 1.x/2.x UNet: diffusers' `Transformer2DModel` (continuous
input, `norm_type="layer_norm"`), `BasicTransformerBlock`, `Attention` and the GEGLU `FeedForward`.

Parameter names follow diffusers (`norm`, `proj_in`, `transformer_blocks_{k}`, `norm1`, `attn1`,
`to_q`, `to_out_0`, `ff/net_0/proj`, `ff/net_2`, ...) so the UNet key table is one rule per name.
`proj_in`/`proj_out` are Dense layers in both variants: a 1x1 convolution over NHWC is exactly a
Dense over channels, so only the key table differs between `use_linear_projection` checkpoints
(`nn.Linear`) and the SD 1.x ones (1x1 `nn.Conv2d`, converted by `CONV1X1_AS_LINEAR`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.layers import EMBED, HEADS, MLP, Dtype

# diffusers hard-codes these: Transformer2DModel's GroupNorm eps and BasicTransformerBlock's
# LayerNorm eps (the UNet's `norm_eps` does not reach them).
GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
FF_MULT = 4
# With `chunk_ff`, feed-forwards over more tokens than this run in chunks of this many tokens.
FF_CHUNK_TOKENS = 512


class Attention(nn.Module):
    """diffusers' `Attention` as SD uses it: bias-free q/k/v, biased output, `head_dim ** -0.5` scale.

    Attributes:
      num_heads / head_dim: `num_heads * head_dim` is the projection width.
      upcast: q·k and softmax in fp32 for low-precision compute (diffusers' `upcast_attention`).
    """

    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Args:
          x: `[batch, q_len, width]` queries.
          context: `[batch, kv_len, context_width]` keys/values; None attends to `x` itself.
        Returns:
          `[batch, q_len, width]`.
        """
        inner = self.num_heads * self.head_dim
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context.astype(self.dtype)
        b, q_len, width = x.shape

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim)

        q = heads(proj(inner, (EMBED, HEADS), use_bias=False, name="to_q")(x))
        k = heads(proj(inner, (EMBED, HEADS), use_bias=False, name="to_k")(context))
        v = heads(proj(inner, (EMBED, HEADS), use_bias=False, name="to_v")(context))
        out = layers.attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast)
        return proj(width, (HEADS, EMBED), name="to_out_0")(out.reshape(b, q_len, inner))


class GEGLU(nn.Module):
    """diffusers' `GEGLU`: one Dense to `2 * hidden`, split into value and gate, value * GELU(gate) (erf form)."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(2 * self.hidden, (EMBED, MLP), dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' `FeedForward(activation_fn="geglu")`: `net.0` is GEGLU (one Dense to twice the
    hidden width, split into value and gate, value * exact GELU(gate)); `net.2` projects back."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[batch, tokens, width]` → `[batch, tokens, width]`."""
        width = x.shape[-1]
        hidden = width * FF_MULT
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        # A submodule "net_0" holding "proj" mirrors diffusers' `ff.net.0.proj` (net.1 is dropout).
        h = GEGLU(hidden=hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return proj(width, (MLP, EMBED), name="net_2")(h)


class _FeedForwardStep(FeedForward):
    """`FeedForward` as an `nn.scan` body (carry unused); its parameters keep FeedForward's names."""

    def __call__(self, carry: None, x: jax.Array) -> tuple[None, jax.Array]:  # type: ignore[override]
        return carry, super().__call__(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention (or cross-attention when `only_cross_attention`), then
    cross-attention to the text states, then the GEGLU feed-forward, each with a residual.

    Attributes:
      num_heads / head_dim: attention geometry (width = num_heads * head_dim).
      only_cross_attention: `attn1` attends to `context` instead of to the image tokens.
      upcast: fp32 attention logits (diffusers' `upcast_attention`).
      chunk_ff: run the feed-forward as a scan over chunks of `FF_CHUNK_TOKENS` tokens, each
        rematerialised (diffusers' forward chunking), so a training step's backward pass holds one
        chunk's GEGLU intermediates instead of all tokens'.
    """

    num_heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"
    chunk_ff: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Args:
          x: `[batch, tokens, width]`.
          context: `[batch, text_len, cross_attention_dim]` (the text encoder's hidden states).
        Returns:
          `[batch, tokens, width]`.
        """
        attn = functools.partial(
            Attention,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            upcast=self.upcast,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
        )

        def norm(name: str, t: jax.Array) -> jax.Array:
            return layers.layer_norm(LAYER_NORM_EPS, param_dtype=self.param_dtype, name=name)(t).astype(self.dtype)

        x = x + attn(name="attn1")(norm("norm1", x), context if self.only_cross_attention else None)
        x = x + attn(name="attn2")(norm("norm2", x), context)
        h = norm("norm3", x)
        b, tokens, width = h.shape
        if self.chunk_ff and tokens > FF_CHUNK_TOKENS and tokens % FF_CHUNK_TOKENS == 0:
            scan = nn.scan(
                nn.remat(_FeedForwardStep),
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=1,
                out_axes=1,
            )
            chunks = h.reshape(b, tokens // FF_CHUNK_TOKENS, FF_CHUNK_TOKENS, width)
            _, h = scan(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(None, chunks)
            h = h.reshape(b, tokens, width)
        else:
            h = FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(h)
        x = x + h
        return nn.with_logical_constraint(x, (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))


class Transformer2DModel(nn.Module):
    """diffusers' `Transformer2DModel` over continuous NHWC input.

    GroupNorm (eps 1e-6) → `proj_in` → `num_layers` `BasicTransformerBlock`s over the `H*W`
    tokens → `proj_out` → + input. With `use_linear_projection` diffusers flattens before
    `proj_in` (a Linear) rather than after (a 1x1 conv); both are the same Dense here.

    Attributes:
      num_heads / head_dim: the blocks' attention geometry; `num_heads * head_dim` is the inner width.
      num_layers: transformer blocks (diffusers' `transformer_layers_per_block`).
      norm_num_groups: GroupNorm groups.
      chunk_ff: token-chunked feed-forwards (see `BasicTransformerBlock`).
    """

    num_heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "auto"
    chunk_ff: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Args:
          x: `[batch, height, width, channels]`.
          context: `[batch, text_len, cross_attention_dim]`.
        Returns:
          `[batch, height, width, channels]`.
        """
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x.astype(self.dtype)
        t = layers.group_norm(self.norm_num_groups, GROUP_NORM_EPS, param_dtype=self.param_dtype, name="norm")(x)
        t = proj(inner, (EMBED, HEADS), name="proj_in")(t.astype(self.dtype).reshape(b, h * w, c))
        for k in range(self.num_layers):
            t = BasicTransformerBlock(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                only_cross_attention=self.only_cross_attention,
                upcast=self.upcast,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention_impl=self.attention_impl,
                chunk_ff=self.chunk_ff,
                name=f"transformer_blocks_{k}",
            )(t, context)
        t = proj(c, (HEADS, EMBED), name="proj_out")(t)
        return t.reshape(b, h, w, c) + residual
