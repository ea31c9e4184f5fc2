"""Parity of the shared 2-D blocks (`jaxvision.models.resnet`) and the VAE's mid-block attention
with the diffusers torch modules, one block at a time.

Weights are copied from the torch module's `state_dict()` through the production key-table
rules (`jaxvision.weights.resnet_keys` / `vae_keys` / `mapping` rules + the strict `mapping.load_params`), so these tests
also prove the per-block rules and parameter names. fp32, `highest` matmul precision; tolerance
max|err| <= 1e-4 * max(1, max|reference|). Inputs are NCHW for torch and NHWC for jaxvision.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

from jaxvision.models import vae
from jaxvision.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, upsample_nearest
from jaxvision.weights import mapping, resnet_keys, vae_keys
from jaxvision.weights.mapping import KeyTable, load_params


def _randomize_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """GroupNorms start at (1, 0); perturb them so a swapped scale/bias would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def _params(flax_module, torch_module, rules, *inputs) -> dict:
    template = jax.eval_shape(flax_module.init, jax.random.key(0), *inputs)["params"]
    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    return load_params(template, state, KeyTable(rules), source=type(torch_module).__name__)


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _check(ours, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4 * max(1.0, float(np.abs(ref).max())), err
    return err


@pytest.mark.parametrize(
    "in_ch,out_ch,temb_ch,groups,scale",
    [
        (32, 32, None, 8, 1.0),  # VAE-style: no temb, identity shortcut
        (32, 64, 24, 8, 1.0),  # UNet-style: temb + 1x1 conv_shortcut
        (64, 32, None, 16, 2.0),  # channel reduction and output_scale_factor
    ],
)
def test_resnet_block(in_ch, out_ch, temb_ch, groups, scale):
    """ResnetBlock2D ("default" temb norm) matches diffusers, with/without temb and shortcut."""
    torch.manual_seed(0)
    ref = TorchResnetBlock2D(
        in_channels=in_ch,
        out_channels=out_ch,
        temb_channels=temb_ch,
        groups=groups,
        eps=1e-6,
        output_scale_factor=scale,
    ).eval()
    _randomize_norms(ref)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 7, in_ch)).astype(np.float32)
    temb = None if temb_ch is None else rng.standard_normal((2, temb_ch)).astype(np.float32)
    ours = ResnetBlock2D(out_ch, groups=groups, output_scale_factor=scale)
    params = _params(ours, ref, resnet_keys.resnet_rules("", ""), x, temb)
    assert ("conv_shortcut" in params) == (in_ch != out_ch)
    assert ("time_emb_proj" in params) == (temb_ch is not None)
    with jax.default_matmul_precision("highest"):
        y = ours.apply({"params": params}, x, temb)
    with torch.no_grad():
        want = ref(_nchw(x), None if temb is None else torch.from_numpy(temb))
    _check(y, want)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("size", [(8, 8), (9, 12)])
def test_downsample(padding, size):
    """Downsample2D: padding=1 (UNet, symmetric) and padding=0 (VAE, one zero row/col at the
    bottom/right) give torch's values and output sizes, on even and odd sizes."""
    torch.manual_seed(0)
    ref = TorchDownsample2D(16, use_conv=True, out_channels=24, padding=padding, name="op").eval()
    x = np.random.default_rng(1).standard_normal((2, *size, 16)).astype(np.float32)
    ours = Downsample2D(24, padding=padding)
    params = _params(ours, ref, mapping.conv_rules("conv", "conv"), x)
    with jax.default_matmul_precision("highest"):
        y = ours.apply({"params": params}, x)
    with torch.no_grad():
        _check(y, ref(_nchw(x)))


def test_downsample_avg_pool():
    """use_conv=False is torch's AvgPool2d(2)."""
    ref = TorchDownsample2D(8, use_conv=False)
    x = np.random.default_rng(2).standard_normal((1, 6, 10, 8)).astype(np.float32)
    y = Downsample2D(use_conv=False).apply({}, x)
    with torch.no_grad():
        _check(y, ref(_nchw(x)))


def test_upsample():
    """Upsample2D: nearest 2x then conv3x3, named `conv` as diffusers."""
    torch.manual_seed(0)
    ref = TorchUpsample2D(16, use_conv=True, out_channels=8).eval()
    x = np.random.default_rng(3).standard_normal((2, 5, 7, 16)).astype(np.float32)
    ours = Upsample2D(8)
    params = _params(ours, ref, mapping.conv_rules("conv", "conv"), x)
    with jax.default_matmul_precision("highest"):
        y = ours.apply({"params": params}, x)
    with torch.no_grad():
        _check(y, ref(_nchw(x)))


@pytest.mark.parametrize("out_size", [(10, 14), (11, 15), (7, 9)])
def test_upsample_nearest_output_size(out_size):
    """Nearest resize to an explicit size (the UNet's odd skip sizes) picks torch's pixels."""
    x = np.random.default_rng(4).standard_normal((1, 5, 7, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(_nchw(x), size=out_size, mode="nearest")
    np.testing.assert_array_equal(np.asarray(upsample_nearest(x, out_size)), want.numpy().transpose(0, 2, 3, 1))


def test_mid_block_attention():
    """The VAE's single-head spatial attention matches diffusers' `Attention` as
    `UNetMidBlock2D` builds it (current key names: group_norm, to_q/k/v, to_out.0)."""
    torch.manual_seed(0)
    ch = 32
    ref = Attention(
        ch,
        heads=1,
        dim_head=ch,
        rescale_output_factor=1.0,
        eps=1e-6,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()
    _randomize_norms(ref)
    x = np.random.default_rng(5).standard_normal((2, 6, 5, ch)).astype(np.float32)
    ours = vae.SpatialSelfAttention(groups=8)
    params = _params(ours, ref, vae_keys.attention_rules("", ""), x)
    with jax.default_matmul_precision("highest"):
        y = ours.apply({"params": params}, x)
    with torch.no_grad():
        _check(y, ref(_nchw(x)))


@pytest.mark.parametrize("add_attention", [True, False])
def test_mid_block(add_attention):
    """resnet → attention → resnet, as the VAE's `UNetMidBlock2D` (temb None)."""
    torch.manual_seed(0)
    cfg = vae.AutoencoderKLConfig.from_variant("tiny", mid_block_add_attention=add_attention)
    ch = cfg.block_out_channels[-1]
    ref = UNetMidBlock2D(
        in_channels=ch,
        temb_channels=None,
        resnet_eps=1e-6,
        resnet_act_fn="silu",
        output_scale_factor=1,
        resnet_time_scale_shift="default",
        attention_head_dim=ch,
        resnet_groups=cfg.norm_num_groups,
        add_attention=add_attention,
    ).eval()
    _randomize_norms(ref)
    x = np.random.default_rng(6).standard_normal((1, 4, 6, ch)).astype(np.float32)
    ours = vae.MidBlock(cfg)
    rules = [
        *resnet_keys.resnet_rules("resnets_{i}", "resnets.{i}"),
        *vae_keys.attention_rules("attentions_0", "attentions.0"),
    ]
    params = _params(ours, ref, rules, x)
    with jax.default_matmul_precision("highest"):
        y = ours.apply({"params": params}, x)
    with torch.no_grad():
        _check(y, ref(_nchw(x)))
