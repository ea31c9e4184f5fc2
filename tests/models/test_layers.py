"""The attention seam: every implementation equals the plain einsum/softmax reference, and the
`implementation` argument alone (never the host) decides which one runs."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.errors import ConfigError
from jaxvision.models import layers


@pytest.mark.parametrize("impl", [None, "auto", "xla", "cpu", "reference"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_matches_reference(impl, is_causal):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k1, (2, 7, 3, 8))
    k = jax.random.normal(k2, (2, 7, 3, 8))
    v = jax.random.normal(k3, (2, 7, 3, 8))
    bias = jax.random.normal(k4, (2, 1, 1, 7))
    with jax.default_matmul_precision("highest"):
        ref = layers.reference_attention(q, k, v, bias=bias, is_causal=is_causal)
        out = layers.attention(q, k, v, bias=bias, is_causal=is_causal, implementation=impl)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_cross_attention_lengths_and_upcast():
    """Different q/kv lengths (cross-attention) and bf16 inputs with fp32 upcast."""
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    kv = jax.random.normal(jax.random.key(1), (1, 9, 2, 4))
    with jax.default_matmul_precision("highest"):
        ref = layers.reference_attention(q, kv, kv)
        out = layers.attention(q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), upcast=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def test_activations_are_exact():
    x = jnp.linspace(-4, 4, 101)
    np.testing.assert_allclose(layers.activation("gelu")(x), jax.nn.gelu(x, approximate=False))
    np.testing.assert_allclose(layers.activation("quick_gelu")(x), x * jax.nn.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="unsupported activation 'mish'"):
        layers.activation("mish")


def test_cudnn_falls_back_to_xla_for_inputs_cudnn_rejects():
    """`implementation="cudnn"` routes inputs cuDNN rejects (fp32, or SD's biased 4096×77-style odd
    lengths) to XLA's attention, so one model can mix both; on CPU the fp32 fallback must equal
    the reference (a cuDNN call there would raise "cuDNN is not detected")."""
    bf16 = jnp.zeros((1, 64, 2, 16), jnp.bfloat16)
    assert layers.cudnn_unsupported(bf16, bf16, None) is None
    assert "dtype float32" in layers.cudnn_unsupported(bf16.astype(jnp.float32), bf16, None)
    assert "head_dim 12" in layers.cudnn_unsupported(jnp.zeros((1, 64, 2, 12), jnp.bfloat16), bf16, None)
    odd_kv = jnp.zeros((1, 77, 2, 16), jnp.bfloat16)
    assert "Q 64, KV 77" in layers.cudnn_unsupported(bf16, odd_kv, jnp.zeros((1, 1, 64, 77)))
    assert layers.cudnn_unsupported(bf16, odd_kv, None) is None
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 3, 8)) for i in range(3))
    with jax.default_matmul_precision("highest"):
        ref = layers.reference_attention(q, k, v, is_causal=True)
        out = layers.attention(q, k, v, is_causal=True, implementation="cudnn")
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("q_len, kv_len, causal", [(577, 577, False), (77, 77, True), (64, 77, False), (9, 8, False)])
def test_even_length_attention_matches_reference_and_its_gradient(q_len, kv_len, causal):
    """The odd-length route of `implementation="cudnn"` (zero-pad to even lengths, true lengths as
    cuDNN's padding mask, padded query rows dropped) computes the same attention and the same
    gradients for q, k and v as the reference: padded keys get no weight, padded queries no
    gradient. Run through XLA here (the same `jax.nn.dot_product_attention` arguments cuDNN gets on
    a GPU); fp32, tolerance 1e-5."""
    q = jax.random.normal(jax.random.key(0), (2, q_len, 3, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, kv_len, 3, 8)) for i in (1, 2))
    g = jax.random.normal(jax.random.key(3), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    def padded(q, k, v):
        return layers.even_length_attention(q, k, v, is_causal=causal, implementation="xla")

    def reference(q, k, v):
        return layers.reference_attention(q, k, v, is_causal=causal)

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(padded(q, k, v), reference(q, k, v), atol=1e-5)
        grads = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
        ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_fp16_attention_runs_on_cpu():
    """XLA:CPU lacks the fp16×fp16→fp32 dot of `jax.nn.dot_product_attention`; under
    `implementation="cpu"` fp16 inputs take the einsum path (fp32 softmax) and stay close to the
    fp32 reference."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 9, 2, 8)) for i in range(3))
    f16 = (t.astype(jnp.float16) for t in (q, k, v))
    out = layers.attention(*f16, implementation="cpu")
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(out.astype(jnp.float32), layers.reference_attention(q, k, v), atol=5e-3)


@pytest.mark.parametrize("q_len, kv_len", [(1300, 77), (700, 1101), (1100, 2100)])
def test_blocked_attention_matches_reference_and_its_gradient(q_len, kv_len):
    """`blocked_attention` (balanced tiles of at most 512 queries × 1024 keys, online softmax, padded
    queries and masked padded keys, each query block rematerialised) is the same function as the
    reference, values and gradients: cross-attention to 77 tokens, 2 and 3 key blocks with a padded
    key, through the "chunked" seam. The "cpu" implementation (above `LONG_ATTENTION_MIN_LOGITS`:
    `head_loop_attention`, the last two cases) gives the same values."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (1, q_len, 2, 8))
    k = jax.random.normal(k2, (1, kv_len, 2, 8))
    v = jax.random.normal(k3, (1, kv_len, 2, 8))

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    blocked = functools.partial(layers.attention, implementation="chunked")
    with jax.default_matmul_precision("highest"):
        ref = layers.reference_attention(q, k, v)
        out = blocked(q, k, v)
        g_ref = jax.grad(functools.partial(loss, layers.reference_attention), argnums=(0, 1, 2))(q, k, v)
        g = jax.grad(functools.partial(loss, blocked), argnums=(0, 1, 2))(q, k, v)
        default = layers.attention(q, k, v, implementation="cpu")
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(default, ref, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):  # dK/dV sum over all queries: compare relative to scale
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize(
    "q_len, kv_len, max_tile_logits",
    [(577, 577, 1 << 22), (1000, 700, 1 << 18), (300, 77, 5000)],
)
def test_head_loop_attention_matches_reference_and_its_gradient(q_len, kv_len, max_tile_logits):
    """`head_loop_attention` (one (batch, head) pair at a time, query blocks against all keys,
    exact per-row softmax, rematerialised blocks) is the reference function, values and
    gradients: ViT-L's 577 tokens in one block, 3 balanced blocks with padded query rows (1000 →
    3 × 334), and cross-attention to 77 keys in 5 blocks."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k1, (2, q_len, 3, 8))
    k = jax.random.normal(k2, (2, kv_len, 3, 8))
    v = jax.random.normal(k3, (2, kv_len, 3, 16))  # value width differs from head_dim
    loop = functools.partial(layers.head_loop_attention, max_tile_logits=max_tile_logits)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    with jax.default_matmul_precision("highest"):
        ref = layers.reference_attention(q, k, v)
        out = loop(q, k, v)
        g_ref = jax.grad(functools.partial(loss, layers.reference_attention), argnums=(0, 1, 2))(q, k, v)
        g = jax.grad(functools.partial(loss, loop), argnums=(0, 1, 2))(q, k, v)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()))
    out16 = loop(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), ref, atol=3e-2)


@pytest.mark.parametrize(
    ("q_len", "kv_len", "dtype", "head_loop"),
    [
        (577, 577, jnp.float32, True),  # ViT-L/16-384: 577² logits ≥ LONG_ATTENTION_MIN_LOGITS
        (1024, 77, jnp.float32, False),  # SD cross-attention: 78 848 logits, below the threshold
        (9, 9, jnp.float32, False),
        (577, 577, jnp.float16, True),
        (9, 9, jnp.float16, False),  # short fp16: the einsum path
    ],
)
def test_cpu_attention_matches_reference(q_len, kv_len, dtype, head_loop, monkeypatch):
    """`implementation="cpu"` (what `kernels.resolve` picks on a CPU) equals the reference: long
    unmasked attention through `head_loop_attention` (asserted by counting its calls), short
    attention through XLA's, fp16 through the einsum path. fp32 1e-5, fp16 against the fp32
    reference 5e-3."""
    calls = []
    loop = layers.head_loop_attention
    monkeypatch.setattr(layers, "head_loop_attention", lambda *a, **kw: calls.append(1) or loop(*a, **kw))
    q = jax.random.normal(jax.random.key(0), (1, q_len, 2, 8))
    k, v = (jax.random.normal(jax.random.key(i), (1, kv_len, 2, 8)) for i in (1, 2))
    with jax.default_matmul_precision("highest"):
        ref = layers.reference_attention(q, k, v)
        out = layers.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation="cpu")
    assert out.dtype == dtype
    assert bool(calls) == head_loop
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=1e-5 if dtype == jnp.float32 else 5e-3)


def test_auto_and_none_never_take_the_cpu_forms(monkeypatch):
    """ "auto" (the models' default) and None are `jax.nn.dot_product_attention`'s choice on every
    host: a long unmasked attention traced on this CPU does not take `head_loop_attention`."""
    monkeypatch.setattr(layers, "head_loop_attention", lambda *a, **kw: pytest.fail("head_loop_attention ran"))
    q = jnp.zeros((1, 577, 2, 8))
    for impl in ("auto", None):
        jax.make_jaxpr(functools.partial(layers.attention, implementation=impl))(q, q, q)


def test_unknown_attention_implementation_is_a_config_error():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ConfigError, match="attention implementation 'flash' is not known; choose one of auto, xla"):
        layers.attention(q, q, q, implementation="flash")


def test_cudnn_fallback_is_logged_once_per_reason(caplog, monkeypatch):
    """`implementation="cudnn"` on inputs cuDNN rejects (fp32 here) switches to XLA's attention and
    says so on the "jaxvision" logger: once for a reason however often it recurs, again for a new
    reason (an odd length with a bias)."""
    monkeypatch.setattr(layers, "_LOGGED_FALLBACKS", set())
    caplog.set_level(logging.WARNING, logger="jaxvision")
    q = jnp.zeros((1, 6, 2, 8))
    for _ in range(3):
        layers.attention(q, q, q, implementation="cudnn")
    messages = [r.getMessage() for r in caplog.records if r.name == "jaxvision"]
    assert messages == [
        "attention: cuDNN rejects dtype float32 (cuDNN takes bf16/fp16); those calls use implementation='xla'"
    ]
    odd = jnp.zeros((1, 7, 2, 8), jnp.bfloat16)
    bias = jnp.zeros((1, 1, 7, 7), jnp.bfloat16)
    for _ in range(2):
        layers.attention(odd, odd, odd, bias=bias, implementation="cudnn")
    messages = [r.getMessage() for r in caplog.records if r.name == "jaxvision"]
    assert len(messages) == 2 and "odd sequence length with a bias (Q 7, KV 7)" in messages[1]
