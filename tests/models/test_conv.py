"""`conv.MatmulConv2d`, the convolution behind `layers.conv(..., conv_impl="matmul")`: its matmul
forms equal XLA's kernel, and `conv_impl` alone decides which one a module traces.

With "matmul", 1×1 convs become dots and 3×3 convs over maps of at most 16×16 pixels become one
im2col matmul, whatever backend traces them. These tests prove each form computes the same values
and the same gradients as `lax.conv_general_dilated` (fp32, highest precision, 1e-5 against
outputs of order 1; only the summation order differs), that the shapes and paddings each form
does not cover keep the native kernel, that "xla"/"auto" trace XLA's convolution and "matmul" the
dots, and that the module's parameters are those of a plain `nn.Conv` for every `conv_impl`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxvision.errors import ConfigError
from jaxvision.models import conv, layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _native(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _conv2d(x, w, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return conv.MatmulConv2d()(x, w, strides, padding, dimension_numbers=dn)


def _form(x, w, strides=(1, 1), padding=((1, 1), (1, 1))):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return conv._matmul_form(x, w, strides, padding, None, None, dn, 1)


@pytest.mark.parametrize(
    ("height", "width", "kernel", "form"),
    [
        (8, 8, 3, "im2col"),
        (16, 16, 3, "im2col"),
        (6, 6, 1, "dot"),
        (20, 20, 1, "dot"),
        (17, 18, 3, None),  # 306 > 256 pixels: XLA's kernel
    ],
)
def test_forms_match_native_values_and_gradients(height, width, kernel, form):
    """Each form, values and both gradients, against `lax.conv_general_dilated` on the same inputs."""
    kx, kw, kg = jax.random.split(jax.random.key(height * 10 + kernel), 3)
    x = jax.random.normal(kx, (2, height, width, 24))
    w = jax.random.normal(kw, (kernel, kernel, 24, 40)) / np.sqrt(kernel * kernel * 24)
    pad = ((kernel // 2,) * 2,) * 2
    assert _form(x, w, padding=pad) == form
    cotangent = jax.random.normal(kg, (2, x.shape[1], x.shape[2], 40))
    with jax.default_matmul_precision("highest"):
        want, want_vjp = jax.vjp(lambda x, w: _native(x, w, (1, 1), pad), x, w)
        got, got_vjp = jax.vjp(lambda x, w: _conv2d(x, w, (1, 1), pad), x, w)
        want_dx, want_dw = want_vjp(cotangent)
        got_dx, got_dw = got_vjp(cotangent)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got_dx, want_dx, atol=1e-5)
    np.testing.assert_allclose(got_dw, want_dw, atol=1e-4 * float(jnp.abs(want_dw).max()))


def test_uncovered_convs_keep_the_native_kernel():
    """Stride 2, other paddings, larger kernels and string paddings are left to XLA."""
    x = jnp.ones((1, 8, 8, 4))
    w3 = jnp.ones((3, 3, 4, 4))
    assert _form(x, w3, strides=(2, 2)) is None
    assert _form(x, w3, padding=((0, 0), (0, 0))) is None
    assert _form(x, jnp.ones((5, 5, 4, 4)), padding=((2, 2), (2, 2))) is None
    assert _form(x, jnp.ones((1, 1, 4, 4)), padding=((1, 1), (1, 1))) is None
    with jax.default_matmul_precision("highest"):
        got = _conv2d(x, w3, (2, 2), "SAME")
        np.testing.assert_allclose(got, _native(x, w3, (2, 2), "SAME"), atol=1e-6)


@pytest.mark.parametrize("conv_impl", ["auto", "xla", "matmul"])
def test_layers_conv_has_nn_conv_parameters(conv_impl):
    """Same parameter tree as a plain `nn.Conv` (checkpoints and key tables do not depend on
    `conv_impl`), same output."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 6))
    ours = layers.conv(10, (3, 3), padding=((1, 1), (1, 1)), conv_impl=conv_impl)
    plain = nn.Conv(10, (3, 3), padding=((1, 1), (1, 1)))
    params = nn.unbox(ours.init(jax.random.key(1), x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain.init(jax.random.key(1), x))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), atol=1e-5)


@pytest.mark.parametrize(
    ("size", "kernel", "strides"),
    [(6, 1, 1), (8, 3, 1), (16, 3, 1), (20, 3, 1), (8, 3, 2)],  # dot, im2col, im2col, native, native
)
def test_matmul_conv_module_equals_xla_conv_module(size, kernel, strides):
    """`layers.conv` with `conv_impl="matmul"` equals the same module with "xla" (same params), on
    the shapes each form takes and on ones left to XLA's kernel; fp32, highest precision, 1e-5."""
    x = jax.random.normal(jax.random.key(size), (2, size, size, 12))
    pad = ((kernel // 2,) * 2,) * 2

    def module(conv_impl):
        return layers.conv(16, (kernel, kernel), strides=(strides, strides), padding=pad, conv_impl=conv_impl)

    params = nn.unbox(module("xla").init(jax.random.key(1), x))
    with jax.default_matmul_precision("highest"):
        want = module("xla").apply(params, x)
        got = module("matmul").apply(params, x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _primitives(module, x):
    """The primitive names in `module.apply`'s jaxpr, nested ones (einsum's jit) included."""
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    text = str(jax.make_jaxpr(module.apply)(params, x))
    return {name for name in ("conv_general_dilated", "dot_general") if f"{name}[" in text}


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_impl_alone_decides_the_traced_kernel(kernel):
    """A 1×1 conv and a 3×3 conv on an 8×8 map trace `conv_general_dilated` (and no dot) with
    `conv_impl="xla"` and "auto", and a `dot_general` (and no convolution) with "matmul", on
    whatever backend traces them: the module's field, not the host, picks the kernel."""
    x = jnp.ones((2, 8, 8, 4))
    pad = ((kernel // 2,) * 2,) * 2
    for conv_impl in ("xla", "auto"):
        names = _primitives(layers.conv(4, (kernel, kernel), padding=pad, conv_impl=conv_impl), x)
        assert "conv_general_dilated" in names and "dot_general" not in names, (conv_impl, names)
    names = _primitives(layers.conv(4, (kernel, kernel), padding=pad, conv_impl="matmul"), x)
    assert "dot_general" in names and "conv_general_dilated" not in names, names


def test_unknown_conv_impl_is_a_config_error():
    with pytest.raises(ConfigError, match="conv implementation 'im2col' is not known; choose one of auto, xla, matmul"):
        layers.conv(4, (1, 1), conv_impl="im2col")
