"""`conv.Conv2d`, the convolution behind every `layers.conv`: its matmul forms equal XLA's kernel.

On CPU (where the tests run) 1×1 convs become dots and 3×3 convs over maps of at most 16×16
pixels become one im2col matmul. These tests prove each form computes the same values and the
same gradients as `lax.conv_general_dilated` (fp32, highest precision, 1e-5 against outputs of
order 1; only the summation order differs), that the shapes and paddings each form does not
cover keep the native kernel, and that the module's parameters are those of a plain `nn.Conv`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxvision.models import conv, layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _native(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _conv2d(x, w, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return conv.Conv2d()(x, w, strides, padding, dimension_numbers=dn)


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


def test_layers_conv_has_nn_conv_parameters():
    """Same parameter tree as a plain `nn.Conv` (checkpoints and key tables are unchanged), same output."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 6))
    ours = layers.conv(10, (3, 3), padding=((1, 1), (1, 1)))
    plain = nn.Conv(10, (3, 3), padding=((1, 1), (1, 1)))
    params = nn.unbox(ours.init(jax.random.key(1), x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain.init(jax.random.key(1), x))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), atol=1e-5)


def test_train_steps_trace_native_convolutions():
    """Inside `native_convolutions()` (which `make_train_step` enters while tracing) a conv the CPU
    would run as im2col stays XLA's convolution: a train step's program has a convolution, the
    same conv traced outside it has none."""
    from jaxvision.train import mesh as mesh_lib
    from jaxvision.train import optimizers
    from jaxvision.train import state as state_lib
    from jaxvision.train import step as step_lib

    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 4, 4))
    assert _form(x, w) == "im2col"
    with conv.native_convolutions():
        assert _form(x, w) is None
    assert _form(x, w) == "im2col"

    model = layers.conv(4, (3, 3), padding=((1, 1), (1, 1)))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    params = nn.unbox(model.init(jax.random.key(0), x))["params"]
    assert "convolution" not in forward.lower(params, x).as_text()

    def loss_fn(params, batch, rng):
        return jnp.mean(model.apply({"params": params}, batch["x"]) ** 2)

    opt = optimizers.make_optimizer(optimizers.OptimizerConfig(learning_rate=0.1))
    mesh = mesh_lib.make_mesh()
    init = lambda rng: model.init(rng, x)["params"]  # noqa: E731
    abstract_state, abstract_frozen = state_lib.abstract_train_state(init, opt, jax.random.key(0), mesh)
    spec = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype)}
    train_step = step_lib.make_train_step(loss_fn, opt, mesh, abstract_state, abstract_frozen, spec)
    assert "convolution" in train_step.lowered.as_text()
