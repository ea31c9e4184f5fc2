"""Shared building blocks: the attention seam, dense/conv/norm layers with logical axis names.

Every parameter is created through `nn.with_logical_partitioning`, so a model's abstract
params (`jax.eval_shape(module.init, ...)`) carry logical axis names that one rules table
(`jaxvision.train.sharding.LOGICAL_AXIS_RULES`) maps onto mesh axes. The names used here are
the whole vocabulary; `tests/train/test_train_sharding.py` checks each has a rule.

Which attention and convolution kernels run is an argument here (`implementation=`,
`conv_impl=`), set from module fields that the caller chose for the platform the program will
run on (`jaxvision.models.kernels.resolve`). Nothing here asks which backend it is traced on, so
a model is a pure function of its fields and a CPU host can trace the program a GPU will run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.models import kernels
from jaxvision.models.conv import MatmulConv2d

Dtype = Any
AttentionImpl = Literal["auto", "xla", "cudnn", "chunked", "cpu", "reference"] | None
ATTENTION_IMPLS = kernels.ATTENTION_IMPLS
# Unmasked attention with at least this many logits per (batch, head) takes `head_loop_attention`
# under `implementation="cpu"`: ViT-L/16-384's 577² ≈ 0.33 M and SD's 4096² ≈ 16.8 M do, CLIP's
# masked 77² does not.
LONG_ATTENTION_MIN_LOGITS = 1 << 18

logger = logging.getLogger("jaxvision")
# Fallback messages already logged: each distinct reason is logged once per process (they are
# decided while tracing, so a model would otherwise repeat them for every layer and every trace).
_LOGGED_FALLBACKS: set[str] = set()

# The logical axis vocabulary. A parameter axis is one of these or None (never sharded).
EMBED = "embed"  # model width (residual stream / channel width)
HEADS = "heads"  # attention projection width (num_heads * head_dim)
MLP = "mlp"  # feed-forward hidden width
VOCAB = "vocab"  # token-embedding rows
CLASSES = "classes"  # classifier outputs
CONV_IN = "conv_in"  # convolution input channels
CONV_OUT = "conv_out"  # convolution output channels
NORM = "norm"  # LayerNorm / GroupNorm scale and bias
POSITION = "position"  # learned position-embedding rows
# Activation axes (used with nn.with_logical_constraint).
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
LOGICAL_AXIS_NAMES = (
    EMBED,
    HEADS,
    MLP,
    VOCAB,
    CLASSES,
    CONV_IN,
    CONV_OUT,
    NORM,
    POSITION,
    BATCH,
    LENGTH,
    ACT_EMBED,
)

REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


def remat(module_cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """Wraps a block class in `nn.remat` with a `jax.checkpoint_policies` policy chosen by name.

    "none" returns the class unchanged; "full" rematerialises everything (no saved residuals).
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if policy == "none":
        return module_cls
    jax_policy = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return nn.remat(module_cls, policy=jax_policy, static_argnums=static_argnums)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(names))


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable | None = None,
    name: str | None = None,
) -> nn.Dense:
    """An `nn.Dense` whose kernel `[in, out]` carries `names` and whose bias carries `names[1]`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=None,
        kernel_init=partitioned(kernel_init or nn.initializers.lecun_normal(), names),
        bias_init=partitioned(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: tuple[int, int],
    *,
    strides: tuple[int, int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    conv_impl: str = "auto",
    name: str | None = None,
) -> nn.Conv:
    """An NHWC `nn.Conv` with an HWIO kernel named `(None, None, conv_in, conv_out)`.

    `conv_impl` picks the kernel (the parameters are the same for every value): "matmul" runs
    1×1 kernels and 3×3 kernels over small maps as matmuls (`conv.MatmulConv2d`, the fast forms
    on XLA:CPU); "xla" and "auto" run `lax.conv_general_dilated`.
    """
    kernels.check_conv(conv_impl)
    return nn.Conv(
        features,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT)),
        bias_init=partitioned(nn.initializers.zeros_init(), (CONV_OUT,)),
        # A class, not an instance or a partial: module fields stay hashable and comparable.
        conv_general_dilated_cls=MatmulConv2d if conv_impl == "matmul" else None,
        name=name,
    )


def layer_norm(epsilon: float, *, param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed in fp32 whatever the compute dtype (the caller casts back)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones_init(), (NORM,)),
        bias_init=partitioned(nn.initializers.zeros_init(), (NORM,)),
        name=name,
    )


def group_norm(
    num_groups: int, epsilon: float, *, param_dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.GroupNorm:
    """GroupNorm over NHWC channels, computed in fp32 (as torch does for fp16 inputs' statistics)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones_init(), (NORM,)),
        bias_init=partitioned(nn.initializers.zeros_init(), (NORM,)),
        name=name,
    )


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Hugging Face activation names (`ACT2FN`) as exact JAX functions.

    HF's "gelu" is the erf form; "gelu_new"/"gelu_pytorch_tanh" the tanh approximation;
    "quick_gelu" is x * sigmoid(1.702 x) (CLIP ViT-L/14, SD 1.x).
    """
    table: dict[str, Callable[[jax.Array], jax.Array]] = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(table))}")
    return table[name]


def reference_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> jax.Array:
    """Plain einsum/softmax attention, the yardstick every other implementation is tested against.

    Args:
      query: `[batch, q_len, heads, head_dim]`.
      key, value: `[batch, kv_len, heads, head_dim]`.
      bias: additive, broadcastable to `[batch, heads, q_len, kv_len]`.
    Returns:
      `[batch, q_len, heads, head_dim]` in the query dtype; softmax in fp32.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        q_len, kv_len = query.shape[1], key.shape[1]
        causal = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def cudnn_unsupported(query: jax.Array, key: jax.Array, bias: jax.Array | None) -> str | None:
    """Why cuDNN's fused attention (as checked by `jax.nn.dot_product_attention`) would reject
    these inputs, or None. Mirrors jax's `check_layout`/`check_is_flash_attention` for bf16/fp16:
    fp16/bf16 only, head_dim a multiple of 8 and <= 128 (256 on Hopper; 128 is safe everywhere),
    and even sequence lengths when a bias is present (the backward pass needs it)."""
    q_len, head_dim = query.shape[1], query.shape[-1]
    kv_len = key.shape[1]
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {query.dtype} (cuDNN takes bf16/fp16)"
    if head_dim % 8 or head_dim > 128:
        return f"head_dim {head_dim}"
    if bias is not None and (q_len % 2 or kv_len % 2):
        return f"odd sequence length with a bias (Q {q_len}, KV {kv_len})"
    return None


def even_length_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: AttentionImpl = "cudnn",
) -> jax.Array:
    """Attention over odd lengths (ViT's 577 tokens, CLIP's 77) as cuDNN can differentiate it.

    jax's cuDNN backward rule rejects odd sequence lengths: it tests for a bias after replacing a
    missing one with a placeholder, so every odd-length attention fails when differentiated, and
    under `jax.checkpoint` the error is raised outside any caller's reach (seen on an H100 with
    jax 0.11.2: `Unsupported sequence length Q 77, KV 77`). Here queries and keys are zero-padded to
    even lengths and the true lengths passed as `query_seq_lengths` / `key_value_seq_lengths`
    (cuDNN's padding mask, no bias); the padded query rows are dropped.

    Args:
      query: `[batch, q_len, heads, head_dim]`; key/value `[batch, kv_len, heads, head_dim]`.
      is_causal, scale: as `attention`.
      implementation: "cudnn" (tests run the same padding through "xla" on a CPU).
    Returns:
      `[batch, q_len, heads, head_dim]`.
    """
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    scale = query.shape[-1] ** -0.5 if scale is None else scale

    def pad(t: jax.Array, length: int) -> jax.Array:
        return jnp.pad(t, ((0, 0), (0, length % 2), (0, 0), (0, 0)))

    out = jax.nn.dot_product_attention(
        pad(query, q_len),
        pad(key, kv_len),
        pad(value, kv_len),
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=jnp.full((batch,), q_len, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), kv_len, jnp.int32),
        implementation=implementation,
    )
    return out[:, :q_len]


def _balanced_blocks(length: int, largest: int) -> tuple[int, int]:
    """`(count, size)`: the fewest blocks of at most `largest` covering `length`, made equal so the
    last one needs little padding (577 tokens, largest 512 → 2 × 289)."""
    count = -(-length // largest)
    return count, -(-length // count)


def blocked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float | None = None,
    block_q: int = 512,
    block_k: int = 1024,
) -> jax.Array:
    """Flash-style attention in plain JAX: `block_q × block_k` tiles with an online softmax.

    Each query block scans the key blocks keeping a running max, denominator and weighted sum
    (fp32), so only one `[batch, heads, block_q, block_k]` tile of logits exists at a time; every
    query block is rematerialised in the backward pass. This is `implementation="chunked"`, the
    bounded-memory path on any backend (the DreamBooth configs): batch and heads stay array axes,
    so a sharded batch or sharded heads stay sharded. On XLA:CPU it is much faster than
    `jax.nn.dot_product_attention` over long sequences, and `head_loop_attention` (the "cpu"
    implementation) faster still (`benchmarks/NOTES.md`, "Kernel choices").

    Args:
      query: `[batch, q_len, heads, head_dim]`; key/value `[batch, kv_len, heads, head_dim]`.
      scale: logit scale; default `head_dim ** -0.5`.
      block_q, block_k: largest tile sizes; a length is split into equal tiles no larger than
        these (577 → 2 × 289), the last one padded (padded keys are masked).
    Returns:
      `[batch, q_len, heads, head_dim]` in the query dtype.
    """
    b, q_len, h, d = query.shape
    kv_len = key.shape[1]
    scale = d**-0.5 if scale is None else scale
    nq, block_q = _balanced_blocks(q_len, block_q)
    nk, block_k = _balanced_blocks(kv_len, block_k)

    def blocks(x: jax.Array, size: int, n: int) -> jax.Array:  # → [n, batch, heads, size, head_dim]
        x = jnp.pad(x, ((0, 0), (0, n * size - x.shape[1]), (0, 0), (0, 0)))
        return x.reshape(b, n, size, h, -1).transpose(1, 0, 3, 2, 4)

    q_blocks = blocks(query * jnp.asarray(scale, query.dtype), block_q, nq)
    k_blocks, v_blocks = blocks(key, block_k, nk), blocks(value, block_k, nk)
    valid = (jnp.arange(nk * block_k) < kv_len).reshape(nk, block_k)

    @jax.checkpoint
    def one_query_block(q: jax.Array) -> jax.Array:
        def step(carry, kv):
            m, denom, acc = carry  # running row max, softmax denominator, weighted sum of values
            k, v, ok = kv
            s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return (m_new, denom * correction + p.sum(-1), acc * correction[..., None] + pv), None

        init = (
            jnp.full((b, h, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, block_q), jnp.float32),
            jnp.zeros((b, h, block_q, value.shape[-1]), jnp.float32),
        )
        (_, denom, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, valid))
        return acc / denom[..., None]

    out = jax.lax.map(one_query_block, q_blocks)  # [nq, batch, heads, block_q, head_dim]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * block_q, h, -1)[:, :q_len]
    return out.astype(query.dtype)


def head_loop_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float | None = None,
    max_tile_logits: int = 1 << 22,
) -> jax.Array:
    """Unmasked attention one (batch, head) pair at a time, each query block against all keys.

    What `implementation="cpu"` runs for long unmasked attention; on XLA:CPU it is the fastest
    form (`benchmarks/NOTES.md`, "Kernel choices"): a tile of one head's logits (`[block_q,
    kv_len]`, at most `max_tile_logits`, 16 MB in fp32) is one plain matmul that stays in cache,
    and with every key in the tile the softmax is exact per row, with no running rescale. The loop
    over (batch, head) pairs is sequential, which suits a CPU; accelerators and sharded training
    take `jax.nn.dot_product_attention` or `blocked_attention` instead. Query blocks are
    rematerialised in the backward pass.

    Args:
      query: `[batch, q_len, heads, head_dim]`; key/value `[batch, kv_len, heads, head_dim]`.
      scale: logit scale; default `head_dim ** -0.5`.
      max_tile_logits: largest tile; a query length is split into equal blocks that fit.
    Returns:
      `[batch, q_len, heads, head_dim]` in the query dtype.
    """
    b, q_len, h, d = query.shape
    kv_len = key.shape[1]
    scale = d**-0.5 if scale is None else scale
    nq, block_q = _balanced_blocks(q_len, max(1, max_tile_logits // kv_len))

    def per_head(x: jax.Array) -> jax.Array:  # [batch, length, heads, dim] → [batch * heads, length, dim]
        return x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[-1])

    q = jnp.pad(query * jnp.asarray(scale, query.dtype), ((0, 0), (0, nq * block_q - q_len), (0, 0), (0, 0)))
    q = per_head(q).reshape(b * h, nq, block_q, d)

    def one_head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        q_head, k_head, v_head = qkv

        @jax.checkpoint
        def one_query_block(q_block: jax.Array) -> jax.Array:  # [block_q, head_dim]
            s = jnp.einsum("qd,kd->qk", q_block, k_head, preferred_element_type=jnp.float32)
            p = jnp.exp(s - s.max(-1, keepdims=True))
            out = jnp.einsum("qk,kd->qd", p.astype(v_head.dtype), v_head, preferred_element_type=jnp.float32)
            return out / p.sum(-1, keepdims=True)

        return jax.lax.map(one_query_block, q_head)

    out = jax.lax.map(one_head, (q, per_head(key), per_head(value)))  # [batch * heads, nq, block_q, dim]
    out = out.reshape(b, h, nq * block_q, -1).transpose(0, 2, 1, 3)[:, :q_len]
    return out.astype(query.dtype)


def _log_fallback_once(message: str) -> None:
    """Logs `message` as a warning the first time it occurs in this process."""
    if message not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(message)
        logger.warning(message)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: AttentionImpl = "auto",
    upcast: bool = False,
) -> jax.Array:
    """The one attention seam of the library, over `jax.nn.dot_product_attention`.

    Which kernel runs is `implementation`, a module field the caller chose for the platform
    (`jaxvision.models.kernels.resolve`); nothing here asks which backend it is traced on.

    Args:
      query: `[batch, q_len, heads, head_dim]`; key/value `[batch, kv_len, heads, head_dim]`.
      bias: additive bias broadcastable to `[batch, heads, q_len, kv_len]`.
      is_causal: apply a lower-triangular mask (CLIP's text tower).
      scale: logit scale; default `head_dim ** -0.5`.
      implementation: "auto" or None let `jax.nn.dot_product_attention` choose; "xla"; "cudnn"
        (GPU fused kernel, bf16/fp16; inputs it rejects take "xla", logged once per reason);
        "chunked" (`blocked_attention`: tiles with an online softmax, bounded memory, for long
        unmasked sequences on any backend); "cpu" (the fast forms on XLA:CPU:
        `head_loop_attention` for unmasked attention of at least `LONG_ATTENTION_MIN_LOGITS`
        logits per head, the einsum path for fp16 (XLA:CPU has no fp16×fp16→fp32 dot), else
        "xla"); or "reference" for the plain einsum path.
      upcast: compute q·k and softmax in fp32 even for low-precision inputs (diffusers'
        `upcast_attention`, used by SD 2.1).
    Returns:
      `[batch, q_len, heads, head_dim]` in the query dtype.
    """
    kernels.check_attention(implementation)
    if implementation == "auto":
        implementation = None
    dtype = query.dtype
    if upcast and dtype != jnp.float32:
        query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
    if implementation == "cudnn":
        reason = cudnn_unsupported(query, key, bias)
        if reason is not None:
            # One model mixes shapes cuDNN takes with ones it rejects (an odd-length biased
            # attention, an fp32 upcast): those calls use XLA's attention, the rest stay fused.
            _log_fallback_once(f"attention: cuDNN rejects {reason}; those calls use implementation='xla'")
            implementation = "xla"
    unmasked = bias is None and not is_causal
    if implementation == "cpu":
        if unmasked and query.shape[1] * key.shape[1] >= LONG_ATTENTION_MIN_LOGITS:
            return head_loop_attention(query, key, value, scale=scale).astype(dtype)
        # XLA:CPU has no fp16×fp16→fp32 dot, which `jax.nn.dot_product_attention` emits.
        implementation = "reference" if query.dtype == jnp.float16 else "xla"
    if unmasked and implementation == "chunked":
        return blocked_attention(query, key, value, scale=scale).astype(dtype)
    if implementation == "chunked":
        implementation = None  # masked attention (CLIP's 77 tokens) is small: no need to chunk
    if implementation == "reference":
        out = reference_attention(query, key, value, bias=bias, is_causal=is_causal, scale=scale)
        return out.astype(dtype)
    if implementation == "cudnn" and bias is None and (query.shape[1] % 2 or key.shape[1] % 2):
        return even_length_attention(query, key, value, is_causal=is_causal, scale=scale).astype(dtype)
    if bias is not None:
        bias = bias.astype(query.dtype)
    try:
        out = jax.nn.dot_product_attention(
            query, key, value, bias=bias, scale=scale, is_causal=is_causal, implementation=implementation
        )
    except NotImplementedError as e:
        if implementation != "cudnn":
            raise
        # A cuDNN-version-specific rule `cudnn_unsupported` does not know (checked while tracing).
        _log_fallback_once(f"attention: cuDNN rejected the call ({e}); it uses implementation='xla'")
        out = jax.nn.dot_product_attention(
            query, key, value, bias=bias, scale=scale, is_causal=is_causal, implementation="xla"
        )
    return out.astype(dtype)
