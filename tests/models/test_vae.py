"""AutoencoderKL: config strictness, end-to-end parity through `jaxvision.from_pretrained`
against diffusers checkpoints written by `save_pretrained(safe_serialization=True)` with random
weights, fp16 variants, the export round trip and key-table coverage.

Parity: fp32, `highest` matmul precision, max|err| <= 1e-4 * max(1, max|reference|) on the
posterior mean, logvar and the decoded image.
"""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_error
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

import jaxvision
from jaxvision.errors import ConfigError, WeightLoadError
from jaxvision.models import vae
from jaxvision.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from jaxvision.weights.mapping import export_params, flatten
from jaxvision.weights.vae_keys import vae_key_table

TOL = 1e-4
ALT = dict(  # another architecture: 3 levels, 2 layers, no quant convs, no mid attention
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=3,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)


def torch_vae(config: AutoencoderKLConfig, seed: int = 0) -> TorchAutoencoderKL:
    """A diffusers AutoencoderKL with random weights (GroupNorms perturbed away from (1, 0))."""
    torch.manual_seed(seed)
    hf = {k: v for k, v in config.to_hf().items() if not k.startswith("_")}
    model = TorchAutoencoderKL(**hf).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    return model


def save(model: TorchAutoencoderKL, path, **kwargs):
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def run_both(module, params, model, images: np.ndarray, latents: np.ndarray):
    """(ours, reference) for mean, logvar and decode; arrays NHWC."""
    with jax.default_matmul_precision("highest"):
        post = module.apply({"params": params}, jnp.asarray(images), method="encode")
        decoded = module.apply({"params": params}, jnp.asarray(latents), method="decode")
    with torch.no_grad():
        ref_post = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).latent_dist
        ref_dec = model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    return [
        (post.mean, nhwc(ref_post.mean)),
        (post.logvar, nhwc(ref_post.logvar)),
        (decoded, nhwc(ref_dec)),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = AutoencoderKLConfig.from_variant("tiny")
    model = torch_vae(config)
    return model, save(model, tmp_path_factory.mktemp("vae_tiny"))


# ---------------------------------------------------------------- config


def test_sd_variant_is_the_sd_vae():
    """The "sd" variant builds diffusers' SD 1.x/2.x VAE: 83,653,863 parameters, same config values."""
    config = AutoencoderKLConfig.from_variant("sd")
    assert config.block_out_channels == (128, 256, 512, 512) and config.scaling_factor == 0.18215
    assert config.sample_size == 512 and config.latent_channels == 4 and config.downsample_factor == 8
    module = vae.build(config)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert sum(int(np.prod(x.shape)) for x in flatten(shapes).values()) == 83_653_863


def test_config_round_trip_and_strictness():
    """to_hf/from_hf round-trip; unknown keys and unsupported block types are ConfigErrors naming them."""
    config = AutoencoderKLConfig.from_variant("tiny", latents_mean=(0.1, 0.2, 0.3, 0.4), shift_factor=0.5)
    hf = config.to_hf()
    assert hf["_class_name"] == "AutoencoderKL" and "_diffusers_version" in hf
    assert AutoencoderKLConfig.from_hf(json.loads(json.dumps(hf))) == config
    with pytest.raises(ConfigError, match="'norm_type'"):
        AutoencoderKLConfig.from_hf({**hf, "norm_type": "spatial"}, "vae/config.json")
    bad = {**hf, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}
    with pytest.raises(ConfigError, match="vae/config.json.*AttnDownEncoderBlock2D"):
        AutoencoderKLConfig.from_hf(bad, "vae/config.json")
    with pytest.raises(ConfigError, match="same, non-zero length"):
        AutoencoderKLConfig.from_variant("tiny", block_out_channels=(16, 32, 32))


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "batch,height,width",
    [(1, 32, 32), (2, 24, 40), (1, 17, 23)],  # square, non-square, odd (the VAE's asymmetric pad)
)
def test_tiny_parity(tiny, batch, height, width):
    """Encode (mean, logvar) and decode match diffusers through `jaxvision.from_pretrained`."""
    model, path = tiny
    module, params = jaxvision.from_pretrained(path)
    assert isinstance(module, AutoencoderKL)
    rng = np.random.default_rng(batch * height)
    images = rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
    latents = rng.standard_normal((batch, height // 2, width // 2, 4)).astype(np.float32)
    for ours, ref in run_both(module, params, model, images, latents):
        assert max_rel_error(ours, ref) <= TOL


def test_alt_config_parity(tmp_path):
    """3 levels, 2 layers per block, no quant convs, no mid-block attention, 3 latent channels."""
    config = AutoencoderKLConfig(**ALT)
    model = torch_vae(config, seed=1)
    module, params = jaxvision.from_pretrained(save(model, tmp_path))
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    for ours, ref in run_both(module, params, model, images, latents):
        assert max_rel_error(ours, ref) <= TOL


def test_sd_vae_parity(tmp_path):
    """The full SD VAE config (83.7M params), 64x64 image / 8x8 latent."""
    model = torch_vae(AutoencoderKLConfig.from_variant("sd"))
    module, params = jaxvision.from_pretrained(save(model, tmp_path))
    rng = np.random.default_rng(8)
    images = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    for ours, ref in run_both(module, params, model, images, latents):
        assert max_rel_error(ours, ref) <= TOL


def test_posterior_sample_and_call(tiny):
    """`sample(key)` is mean + std * N(0, 1) with that key; `__call__` decodes the mode."""
    _, path = tiny
    module, params = jaxvision.from_pretrained(path)
    images = np.random.default_rng(9).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    post = module.apply({"params": params}, images, method="encode")
    assert isinstance(post, DiagonalGaussian)
    key = jax.random.key(3)
    noise = jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(post.sample(key), post.mean + jnp.exp(0.5 * post.logvar) * noise, rtol=1e-6)
    assert not np.allclose(post.sample(key), post.mode())
    recon = module.apply({"params": params}, images)
    np.testing.assert_allclose(recon, module.apply({"params": params}, post.mode(), method="decode"), atol=1e-5)
    sampled = module.apply({"params": params}, images, key, True)
    assert sampled.shape == recon.shape and not np.allclose(sampled, recon)


def test_logvar_clipped():
    """logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution."""
    moments = jnp.array([0.0, 1.0, -100.0, 100.0]).reshape(1, 1, 1, 4)
    post = DiagonalGaussian.from_moments(moments)
    assert float(post.logvar.min()) == -30.0 and float(post.logvar.max()) == 20.0


def test_sliced_decode(tiny):
    """`decode_slice_size` (decoding a batch in slices, padded to a multiple) gives the batch result."""
    _, path = tiny
    module, params = jaxvision.from_pretrained(path)
    sliced, _ = jaxvision.from_pretrained(path, decode_slice_size=2)
    latents = np.random.default_rng(10).standard_normal((5, 6, 6, 4)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        full = module.apply({"params": params}, latents, method="decode")
        parts = sliced.apply({"params": params}, latents, method="decode")
    assert parts.shape == full.shape
    assert max_rel_error(parts, full) <= 1e-5


def test_fp16_variant(tmp_path):
    """`save_pretrained(variant="fp16")` of an fp16 model loads with variant="fp16" as exactly the
    fp16-rounded weights (upcast into fp32 params)."""
    model = torch_vae(AutoencoderKLConfig.from_variant("tiny")).half()
    save(model, tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    _, params = jaxvision.from_pretrained(tmp_path, variant="fp16")
    exported = export_params(params, vae_key_table(None))
    state = model.state_dict()
    assert set(exported) == set(state)
    for key, value in exported.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, state[key].float().numpy(), err_msg=key)


# ---------------------------------------------------------------- export and mapping


def test_round_trip(tiny, tmp_path):
    """torch → jaxvision → `jaxvision.save_pretrained` → diffusers `from_pretrained`: identical
    weights and the same decode as the original torch model."""
    model, path = tiny
    module, params = jaxvision.from_pretrained(path)
    out = jaxvision.save_pretrained(module, params, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["_diffusers_version"]
    reloaded = TorchAutoencoderKL.from_pretrained(out).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    z = torch.from_numpy(np.random.default_rng(11).standard_normal((1, 4, 8, 8)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.decode(z).sample, model.decode(z).sample, rtol=0, atol=0)


def test_mapping_coverage(tiny):
    """Every parameter has a checkpoint key and every checkpoint key a parameter (one-to-one)."""
    model, path = tiny
    _, params = jaxvision.from_pretrained(path)
    exported = export_params(params, vae_key_table(None))
    assert len(exported) == len(flatten(params))
    assert set(exported) == set(model.state_dict())


@pytest.mark.parametrize(
    "edit,message",
    [
        ("drop", "missing from the checkpoint.*decoder.up_blocks.0.resnets.1.conv2.weight"),
        ("extra", "unexpected checkpoint keys.*encoder.mid_block.attentions.0.query.weight"),
        ("shape", "shape mismatches.*quant_conv.weight"),
    ],
)
def test_strict_loading(tiny, tmp_path, edit, message):
    """A missing, extra or mis-shaped key fails loading with a WeightLoadError naming it."""
    _, path = tiny
    state = load_file(path / "diffusion_pytorch_model.safetensors")
    if edit == "drop":
        del state["decoder.up_blocks.0.resnets.1.conv2.weight"]
    elif edit == "extra":
        state["encoder.mid_block.attentions.0.query.weight"] = np.zeros((32, 32), np.float32)
    else:
        state["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(WeightLoadError, match=f"(?s){message}"):
        jaxvision.from_pretrained(tmp_path)


def test_remat_policies_and_logical_names():
    """Remat policies (by name) leave gradients unchanged; every parameter carries logical axis names."""
    # one level keeps the three gradient compilations cheap; it still has a down, mid and up block
    config = AutoencoderKLConfig(block_out_channels=(8,), norm_num_groups=4)
    images = jnp.asarray(np.random.default_rng(12).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    boxed = jax.jit(vae.build(config).init)(jax.random.key(0), images)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, flax.core.meta.Partitioned))
    assert all(isinstance(x, flax.core.meta.Partitioned) for x in leaves)
    params = flax.core.meta.unbox(boxed)
    grads = {}
    for policy in ("none", "full"):
        module = vae.build(config, remat_policy=policy)
        grads[policy] = jax.jit(jax.grad(lambda p, m=module: jnp.mean(m.apply({"params": p}, images) ** 2)))(params)
    for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
