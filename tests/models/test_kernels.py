"""`jaxvision.models.kernels`: which attention / conv kernels a model runs is a module field,
resolved by the caller from the target platform, never probed by model code.

These tests prove `resolve`'s table (every platform × training/inference × dtype, explicit values
passed through, bad values rejected with the choices named), that `with_kernels` sets exactly the
fields a model has, that the models trace without asking jax for the backend, and that
`from_pretrained` resolves "auto" for the default devices (this CPU) unless told otherwise.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvision
from jaxvision.errors import ConfigError
from jaxvision.models import clip_text, kernels, unet, vae, vit
from jaxvision.models.unet_blocks import BlockConfig, CrossAttnDownBlock2D

FP32, BF16, FP16 = jnp.float32, jnp.bfloat16, jnp.float16


@pytest.mark.parametrize(
    ("platform", "dtype", "training", "attention", "conv"),
    [
        ("cpu", FP32, False, "cpu", "matmul"),
        ("cpu", BF16, False, "cpu", "matmul"),
        ("cpu", FP16, False, "cpu", "matmul"),
        ("cpu", FP32, True, "cpu", "xla"),
        ("cpu", BF16, True, "cpu", "xla"),
        ("gpu", FP32, False, None, "xla"),
        ("gpu", BF16, False, "cudnn", "xla"),
        ("gpu", FP16, False, "cudnn", "xla"),
        ("gpu", FP32, True, None, "xla"),
        ("gpu", BF16, True, "cudnn", "xla"),
        ("cuda", BF16, True, "cudnn", "xla"),  # jax's runtime names mean "gpu"
        ("rocm", FP16, False, "cudnn", "xla"),
        ("tpu", FP32, False, None, "xla"),
        ("tpu", BF16, False, None, "xla"),
        ("tpu", BF16, True, None, "xla"),
        ("gpu", "bfloat16", False, "cudnn", "xla"),  # dtype names, as configs give them
    ],
)
def test_resolve_auto(platform, dtype, training, attention, conv):
    """The rules for "auto": CPU → "cpu" attention, "matmul" convs for inference only; GPU →
    cuDNN for bf16/fp16, None for fp32; TPU → None; XLA convs off CPU and in every train step."""
    got = kernels.resolve(platform, dtype=dtype, training=training)
    assert got == kernels.Kernels(attention=attention, conv=conv)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("attention", [None, "xla", "cudnn", "chunked", "cpu", "reference"])
@pytest.mark.parametrize("conv", ["xla", "matmul"])
def test_resolve_passes_explicit_choices_through(platform, training, attention, conv):
    """Anything but "auto" (None included) is kept as given, on every platform and in training."""
    got = kernels.resolve(platform, attention=attention, conv=conv, dtype=BF16, training=training)
    assert (got.attention, got.conv) == (attention, conv)


def test_resolve_rejects_unknown_values():
    with pytest.raises(ConfigError, match="platform 'metal' is not known; choose one of cpu, gpu, tpu"):
        kernels.resolve("metal")
    with pytest.raises(ConfigError, match="attention implementation 'flash' is not known; choose one of auto, xla"):
        kernels.resolve("gpu", attention="flash")
    with pytest.raises(ConfigError, match="conv implementation 'winograd' is not known; choose one of auto, xla"):
        kernels.resolve("cpu", conv="winograd")
    with pytest.raises(ConfigError, match="conv implementation None"):
        kernels.Kernels(attention=None, conv=None)


def test_kernels_describe_and_platform_of():
    assert kernels.Kernels(attention="cpu", conv="matmul").describe() == "attention=cpu conv=matmul"
    assert kernels.Kernels(attention=None, conv="xla").describe() == "attention=None conv=xla"
    assert kernels.platform_of() == "cpu"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert kernels.platform_of(mesh) == "cpu"


def test_compilable_here_replaces_only_cudnn_off_gpu():
    """A GPU's kernels compiled on a CPU host (a memory plan): cuDNN attention becomes the
    bounded-memory "chunked"; everything else, and everything on a GPU, is kept."""
    gpu = kernels.resolve("gpu", dtype=BF16, training=True)
    assert kernels.compilable_here(gpu, "cpu") == kernels.Kernels(attention="chunked", conv="xla")
    assert kernels.compilable_here(gpu, "gpu") == gpu
    cpu = kernels.resolve("cpu")
    assert kernels.compilable_here(cpu, "tpu") == cpu


def _tiny_modules():
    return {
        "vit": vit.build(vit.ViTConfig.from_variant("tiny", image_size=16, labels=("a", "b"))),
        "clip": clip_text.build(clip_text.CLIPTextConfig.from_variant("tiny")),
        "unet": unet.build(unet.UNet2DConditionConfig.from_variant("tiny")),
        "vae": vae.build(vae.AutoencoderKLConfig.from_variant("tiny")),
    }


def test_models_default_to_auto_and_with_kernels_sets_their_fields():
    """Every model's kernel fields default to "auto"; `with_kernels` sets the ones it has (CLIP's
    text tower has no convolutions, ViT's patch embedding is a matmul) and leaves everything else
    as it was."""
    chosen = kernels.Kernels(attention="chunked", conv="matmul")
    for name, module in _tiny_modules().items():
        assert module.attention_impl == "auto", name
        fields = {f.name for f in dataclasses.fields(module)}
        assert ("conv_impl" in fields) == (name in ("unet", "vae")), name
        out = kernels.with_kernels(module, chosen)
        assert out.attention_impl == "chunked" and out.config == module.config, name
        if name in ("unet", "vae"):
            assert module.conv_impl == "auto" and out.conv_impl == "matmul", name
    with pytest.raises(TypeError, match="Dense has no attention_impl or conv_impl field"):
        kernels.with_kernels(nn.Dense(3), chosen)


@pytest.mark.parametrize("choice", [kernels.Kernels("auto", "auto"), kernels.Kernels("cpu", "matmul")])
def test_models_never_ask_jax_for_the_backend(choice, monkeypatch):
    """Model code is a pure function of its fields: every model traces (init and apply, shapes
    only) with `jax.default_backend` made to fail, with the portable and with the CPU kernels."""

    def probe():
        raise AssertionError("model code called jax.default_backend()")

    monkeypatch.setattr(jax, "default_backend", probe)
    modules = _tiny_modules()
    inputs = {
        "vit": vit.example_inputs(modules["vit"].config),
        "clip": clip_text.example_inputs(modules["clip"].config),
        "unet": unet.example_inputs(modules["unet"].config),
        "vae": vae.example_inputs(modules["vae"].config),
    }
    for name, module in modules.items():
        module = kernels.with_kernels(module, choice)
        variables = jax.eval_shape(module.init, jax.random.key(0), *inputs[name])
        jax.eval_shape(module.apply, variables, *inputs[name])


def test_cpu_kernels_give_the_portable_kernels_values():
    """A UNet down block (resnet with a 1×1 shortcut, spatial transformer, stride-2 downsampler)
    with the CPU kernels ("cpu" attention; "matmul" convs: a dot, im2col on the 8×8 map) computes
    what it computes with "auto"; fp32, highest precision, 1e-5."""
    block = CrossAttnDownBlock2D(block=BlockConfig(32, num_layers=1, num_heads=4, groups=8))
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    temb = jax.random.normal(jax.random.key(1), (1, 24))
    context = jax.random.normal(jax.random.key(2), (1, 5, 12))
    params = jax.jit(block.init)(jax.random.key(3), x, temb, context)
    cpu = kernels.with_kernels(block, kernels.resolve("cpu"))
    with jax.default_matmul_precision("highest"):
        want = jax.jit(block.apply)(params, x, temb, context)
        got = jax.jit(cpu.apply)(params, x, temb, context)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * max(1.0, float(jnp.abs(w).max())))


@pytest.fixture(scope="module")
def tiny_vit_folder(tmp_path_factory):
    module = vit.build(vit.ViTConfig.from_variant("tiny", image_size=16, labels=("a", "b")))
    pixels = jnp.zeros((1, 16, 16, 3))
    params = nn.unbox(module.init(jax.random.key(0), pixels))["params"]
    return jaxvision.save_pretrained(module, params, tmp_path_factory.mktemp("vit"))


def test_from_pretrained_resolves_auto_for_the_default_devices(tiny_vit_folder):
    """Loading on this CPU gives the CPU's inference kernels; explicit kernels are kept; a kernel
    field the model does not have is an error, as for its constructor."""
    module, _ = jaxvision.from_pretrained(tiny_vit_folder)
    assert module.attention_impl == "cpu"
    module, _ = jaxvision.from_pretrained(tiny_vit_folder, attention_impl="xla")
    assert module.attention_impl == "xla"
    module, _ = jaxvision.from_pretrained(tiny_vit_folder, attention_impl=None)
    assert module.attention_impl is None
    with pytest.raises(TypeError, match="conv_impl"):
        jaxvision.from_pretrained(tiny_vit_folder, conv_impl="xla")
    with pytest.raises(ConfigError, match="attention implementation 'fast'"):
        jaxvision.from_pretrained(tiny_vit_folder, attention_impl="fast")
