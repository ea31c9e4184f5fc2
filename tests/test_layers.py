"""The attention seam: every implementation equals the plain einsum/softmax reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvision.models import layers


@pytest.mark.parametrize("impl", [None, "xla"])
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
