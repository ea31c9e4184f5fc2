"""Parity of the UNet's pieces with diffusers, block by block.

Each torch block is built with random weights, its state dict is converted by the production
UNet key table (`unet_keys.unet_key_table`, strict `load_params`) under the prefix the block
has inside the UNet, and outputs are compared in fp32 at highest matmul precision, within
1e-4 of the output scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_error
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2DModel
from diffusers.models.unets import unet_2d_blocks as torch_blocks

from jaxvision.models.transformer_2d import BasicTransformerBlock, Transformer2DModel
from jaxvision.models.unet import UNet2DConditionConfig
from jaxvision.models.unet_blocks import (
    BlockConfig,
    CrossAttnDownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    timestep_embedding,
)
from jaxvision.weights.mapping import load_params
from jaxvision.weights.unet_keys import unet_key_table

TOL = 1e-4


def _nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _load(torch_module, flax_module, prefix: str, inputs: tuple, *, linear_projection: bool = False) -> dict:
    """Converts `torch_module`'s weights with the UNet key table, as if it sat at `prefix` in the UNet."""
    # A closure keeps static inputs (the up block's output size) Python values.
    template = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), *inputs))["params"]
    for part in reversed(prefix.split("/")):
        template = {part: template}
    torch_prefix = prefix.replace("/", ".").replace("_blocks_", "_blocks.").replace("attentions_", "attentions.")
    state = {f"{torch_prefix}.{k}": v.numpy() for k, v in torch_module.state_dict().items()}
    table = unet_key_table(UNet2DConditionConfig.from_variant("tiny", use_linear_projection=linear_projection))
    params = load_params(template, state, table, source="test")
    for part in prefix.split("/"):
        params = params[part]
    return jax.tree.map(jnp.asarray, params)


def _apply(module, params, *inputs):
    # jit compiles the block once, much faster on CPU than eager op-by-op dispatch; the inputs
    # are closed over so that static ones (an output size) stay Python values.
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda p: module.apply({"params": p}, *inputs))(params)


@pytest.mark.parametrize("flip, shift, dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding(flip, shift, dim):
    """Sinusoidal embedding equals diffusers' get_timestep_embedding for both orders, shifts, odd widths
    and fractional timesteps up to 999."""
    t = np.array([0.0, 1.0, 250.5, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    out = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    assert max_rel_error(out, ref.numpy()) <= 1e-5


@pytest.mark.parametrize("only_cross", [False, True])
def test_basic_transformer_block(only_cross):
    """Self/cross attention + GEGLU feed-forward block (and its only_cross_attention form, where attn1
    attends to the text states) matches diffusers' BasicTransformerBlock."""
    torch.manual_seed(0)
    ref = TorchBasicTransformerBlock(32, 4, 8, cross_attention_dim=24, only_cross_attention=only_cross).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    module = BasicTransformerBlock(4, 8, only_cross_attention=only_cross)
    params = _load(ref, module, "mid_block/attentions_0/transformer_blocks_0", (jnp.asarray(x), jnp.asarray(ctx)))
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx).numpy()
    assert max_rel_error(_apply(module, params, jnp.asarray(x), jnp.asarray(ctx)), expected) <= TOL


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_2d(linear):
    """Transformer2DModel with 1x1-conv (SD 1.x) and Linear (SD 2.x) proj_in/proj_out, two blocks,
    upcast attention, on a non-square image."""
    torch.manual_seed(1)
    ref = TorchTransformer2DModel(
        2,
        16,
        in_channels=32,
        num_layers=2,
        cross_attention_dim=24,
        norm_num_groups=8,
        use_linear_projection=linear,
        upcast_attention=True,
    ).eval()
    x, ctx = torch.randn(2, 32, 6, 5), torch.randn(2, 7, 24)
    module = Transformer2DModel(2, 16, num_layers=2, norm_num_groups=8, upcast=True)
    params = _load(ref, module, "mid_block/attentions_0", (_nhwc(x), jnp.asarray(ctx)), linear_projection=linear)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=ctx).sample.numpy().transpose(0, 2, 3, 1)
    assert max_rel_error(_apply(module, params, _nhwc(x), jnp.asarray(ctx)), expected) <= TOL


def test_cross_attn_down_block():
    """CrossAttnDownBlock2D (2 resnet+transformer pairs, channel change, stride-2 downsampler): the
    output and every skip tensor match diffusers."""
    torch.manual_seed(2)
    kw = dict(resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=8, num_attention_heads=4, cross_attention_dim=24)
    ref = torch_blocks.CrossAttnDownBlock2D(16, 32, 64, num_layers=2, **kw).eval()
    x, temb, ctx = torch.randn(2, 16, 8, 6), torch.randn(2, 64), torch.randn(2, 5, 24)
    module = CrossAttnDownBlock2D(BlockConfig(32, num_layers=2, num_heads=4, groups=8))
    inputs = (_nhwc(x), jnp.asarray(temb), jnp.asarray(ctx))
    params = _load(ref, module, "down_blocks_0", inputs)
    with torch.no_grad():
        ref_x, ref_skips = ref(x, temb, encoder_hidden_states=ctx)
    out_x, out_skips = _apply(module, params, *inputs)
    assert len(out_skips) == len(ref_skips) == 3
    for a, b in zip((out_x, *out_skips), (ref_x, *ref_skips), strict=True):
        assert max_rel_error(a, b.numpy().transpose(0, 2, 3, 1)) <= TOL


@pytest.mark.parametrize("output_size", [None, (7, 5)])
def test_up_block(output_size):
    """UpBlock2D (3 resnets over concatenated skips of different widths, then the upsampler, 2x or to an
    explicit odd size as the UNet asks for odd inputs)."""
    torch.manual_seed(3)
    ref = torch_blocks.UpBlock2D(
        16, 48, 32, 64, num_layers=3, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=8
    ).eval()
    x, temb = torch.randn(2, 48, 4, 3), torch.randn(2, 64)
    skips = (torch.randn(2, 16, 4, 3), torch.randn(2, 32, 4, 3), torch.randn(2, 32, 4, 3))
    module = UpBlock2D(BlockConfig(32, num_layers=3, groups=8))
    inputs = (_nhwc(x), tuple(_nhwc(s) for s in skips), jnp.asarray(temb), output_size)
    params = _load(ref, module, "up_blocks_0", inputs)
    with torch.no_grad():
        expected = ref(x, skips, temb, upsample_size=output_size).numpy().transpose(0, 2, 3, 1)
    out = _apply(module, params, *inputs)
    assert out.shape == expected.shape
    assert max_rel_error(out, expected) <= TOL


def test_mid_block():
    """UNetMidBlock2DCrossAttn (resnet, transformer, resnet) with a mid_block_scale_factor of 2."""
    torch.manual_seed(4)
    ref = torch_blocks.UNetMidBlock2DCrossAttn(
        32,
        64,
        resnet_eps=1e-5,
        resnet_act_fn="silu",
        resnet_groups=8,
        num_attention_heads=2,
        cross_attention_dim=24,
        output_scale_factor=2.0,
    ).eval()
    x, temb, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 64), torch.randn(2, 5, 24)
    module = UNetMidBlock2DCrossAttn(BlockConfig(32, num_heads=2, groups=8, output_scale_factor=2.0))
    inputs = (_nhwc(x), jnp.asarray(temb), jnp.asarray(ctx))
    params = _load(ref, module, "mid_block", inputs)
    with torch.no_grad():
        expected = ref(x, temb, encoder_hidden_states=ctx).numpy().transpose(0, 2, 3, 1)
    assert max_rel_error(_apply(module, params, *inputs), expected) <= TOL


def test_remat_matches_plain_block():
    """A CrossAttnDownBlock2D whose resnets and transformers are rematerialised (policy
    "dots_saveable") has the same parameters, output and gradients as the plain block."""
    cfg = BlockConfig(32, num_layers=1, num_heads=4, groups=8)
    rng = np.random.default_rng(0)
    inputs = tuple(
        jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((2, 6, 6, 16), (2, 64), (2, 5, 24))
    )
    plain = CrossAttnDownBlock2D(cfg)
    params = jax.jit(plain.init)(jax.random.key(0), *inputs)["params"]

    def loss(module, p):
        x, skips = module.apply({"params": p}, *inputs)
        return jnp.sum(x**2) + sum(jnp.sum(s) for s in skips)

    with jax.default_matmul_precision("highest"):
        l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
        remat = CrossAttnDownBlock2D(cfg, remat_policy="dots_saveable")
        shapes = jax.eval_shape(remat.init, jax.random.key(0), *inputs)["params"]
        assert jax.tree.structure(shapes) == jax.tree.structure(params)
        # One checkpoint region per resnet and per spatial transformer; none in the plain block.
        assert str(jax.make_jaxpr(lambda p: loss(remat, p))(params)).count("remat2[") == 2
        assert "remat2[" not in str(jax.make_jaxpr(lambda p: loss(plain, p))(params))
        l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    # Recomputation may reorder float sums; 1e-5 of max(1, gradient scale) allows for that.
    jax.tree.map(lambda a, b: np.testing.assert_array_less(max_rel_error(a, b), 1e-5), g1, g0)


def test_chunked_feed_forward_matches_the_whole_feed_forward():
    """`chunk_ff` (set with remat) runs a 2048-token feed-forward as a scan over rematerialised
    `FF_CHUNK_TOKENS`-token chunks: the same parameter tree (`ff/...`, so key tables and
    checkpoints are unchanged), the same output and the same gradients as the unchunked block;
    1000 tokens (no whole number of chunks) take the plain path. fp32, highest precision,
    tolerance 1e-5 of max(1, scale)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2048, 32)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 5, 24)), jnp.float32)
    plain = BasicTransformerBlock(4, 8)
    chunked = BasicTransformerBlock(4, 8, chunk_ff=True)
    params = jax.jit(plain.init)(jax.random.key(0), x, context)["params"]
    assert jax.tree.structure(jax.eval_shape(chunked.init, jax.random.key(0), x, context)["params"]) == (
        jax.tree.structure(params)
    )

    def loss(module, p, x):
        return jnp.sum(module.apply({"params": p}, x, context) * cotangent[:, : x.shape[1]])

    def jaxpr(module, x):
        return str(jax.make_jaxpr(lambda p: loss(module, p, x))(params))

    with jax.default_matmul_precision("highest"):
        # One scan more than the plain block (the CPU attention loops too).
        assert jaxpr(chunked, x).count("scan[") == jaxpr(plain, x).count("scan[") + 1
        assert jaxpr(chunked, x[:, :1000]) == jaxpr(plain, x[:, :1000])
        l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p, x)))(params)
        l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(chunked, p, x)))(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_array_less(max_rel_error(a, b), 1e-5), g1, g0)
