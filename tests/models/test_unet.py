"""UNet2DConditionModel parity with diffusers through the production loader (`jaxvision.from_pretrained`).

Reference checkpoints are diffusers models with random weights written by their own
`save_pretrained(safe_serialization=True)`. Tolerance: fp32 at highest matmul precision, max abs
error <= 1e-4 * max(1, max |reference|).
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_error
from diffusers import UNet2DConditionModel

import jaxvision
from jaxvision.errors import ConfigError, WeightLoadError
from jaxvision.models.unet import UNet2DConditionConfig
from jaxvision.weights.mapping import export_params
from jaxvision.weights.unet_keys import unet_key_table

TOL = 1e-4

TINY_CONFIGS = {
    # SD 1.x style: 1x1-conv projections, one head count for every block.
    "sd1": UNet2DConditionConfig.from_variant("tiny").to_hf(),
    # SD 2.x style: linear projections, per-block head lists, upcast attention, only_cross_attention
    # on one block, 3 levels, 2 layers per block.
    "sd2": UNet2DConditionConfig.from_variant(
        "tiny",
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        only_cross_attention=(False, True, False),
    ).to_hf(),
    # Rarer knobs: centred input, cos/sin order and shift, time-embedding activations and width,
    # conv kernels, unpadded downsampling, mid-block scale, eps, exact-GELU resnets, per-block
    # layers_per_block.
    "knobs": UNet2DConditionConfig.from_variant(
        "tiny",
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        time_embedding_dim=48,
        time_embedding_act_fn="silu",
        timestep_post_act="gelu",
        conv_in_kernel=5,
        conv_out_kernel=1,
        downsample_padding=0,
        mid_block_scale_factor=2.0,
        norm_eps=1e-6,
        act_fn="gelu",
        layers_per_block=(2, 1),
        only_cross_attention=True,
        in_channels=3,
        out_channels=5,
    ).to_hf(),
}


def _torch_unet(path, hf_config: dict, seed: int = 0) -> UNet2DConditionModel:
    """A random-weight diffusers UNet from a config dict, saved to `path` by diffusers itself."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in hf_config.items() if not k.startswith("_")}
    model = UNet2DConditionModel(**kwargs).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _inputs(cfg: dict, batch: int, height: int, width: int, text_len: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, cfg["in_channels"], height, width)).astype(np.float32)
    context = rng.standard_normal((batch, text_len, cfg["cross_attention_dim"])).astype(np.float32)
    return sample, context


def _torch_out(model, sample, timesteps, context) -> np.ndarray:
    t = torch.tensor(timesteps) if isinstance(timesteps, (int, float)) else torch.from_numpy(np.asarray(timesteps))
    with torch.no_grad():
        out = model(torch.from_numpy(sample), t, torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _jax_out(module, params, sample, timesteps, context):
    """Jitted: on CPU one compile is much faster than eager op-by-op dispatch, even for tiny configs."""

    def run(p, x, t, c):
        return module.apply({"params": p}, x, t, c)

    with jax.default_matmul_precision("highest"):
        return jax.jit(run)(
            params, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(context)
        )


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_parity(tmp_path, name):
    """The whole UNet matches diffusers at tiny SD1-style, SD2-style and rare-knob configs, with a
    scalar int timestep, per-example float timesteps, and an odd latent size (which makes diffusers
    forward skip sizes to its upsamplers)."""
    cfg = TINY_CONFIGS[name]
    model = _torch_unet(tmp_path, cfg)
    module, params = jaxvision.from_pretrained(tmp_path)
    assert module.config == UNet2DConditionConfig.from_hf(cfg)
    for (h, w), timesteps in (((16, 12), 981), ((10, 14), np.array([3.0, 517.5], np.float32))):
        sample, context = _inputs(cfg, 2, h, w)
        expected = _torch_out(model, sample, timesteps, context)
        out = _jax_out(module, params, sample, timesteps, context)
        assert out.shape == expected.shape and out.dtype == jnp.float32
        assert max_rel_error(out, expected) <= TOL, (name, (h, w), timesteps)


def test_round_trip_through_diffusers(tmp_path):
    """torch → jaxvision → save_pretrained → diffusers `from_pretrained` gives bit-identical weights and
    the same output; config.json carries `_class_name` and `_diffusers_version`."""
    cfg = TINY_CONFIGS["sd2"]
    model = _torch_unet(tmp_path / "src", cfg)
    module, params = jaxvision.from_pretrained(tmp_path / "src")
    jaxvision.save_pretrained(module, params, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in written
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()
    back = UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    sample, context = _inputs(cfg, 2, 8, 8)
    np.testing.assert_array_equal(_torch_out(back, sample, 10, context), _torch_out(model, sample, 10, context))
    _, params2 = jaxvision.from_pretrained(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_mapping_covers_every_key(tmp_path):
    """Every diffusers state-dict key is used exactly once and every Flax leaf filled: exporting the
    loaded params gives exactly diffusers' key set with identical values (SD1 and SD2 projections)."""
    for name in ("sd1", "sd2"):
        model = _torch_unet(tmp_path / name, TINY_CONFIGS[name])
        module, params = jaxvision.from_pretrained(tmp_path / name)
        exported = export_params(params, unet_key_table(module.config))
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        assert set(exported) == set(state)
        for key, value in state.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_missing_and_extra_keys_fail_naming_them(tmp_path):
    """A checkpoint missing a key, or holding one the model does not use, fails with the key's name."""
    from safetensors.numpy import load_file, save_file

    _torch_unet(tmp_path, TINY_CONFIGS["sd1"])
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    missing = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    save_file({k: v for k, v in state.items() if k != missing}, weights)
    with pytest.raises(WeightLoadError, match=missing.replace(".", r"\.")):
        jaxvision.from_pretrained(tmp_path)
    save_file({**state, "mid_block.attentions.0.extra.weight": np.zeros(3, np.float32)}, weights)
    with pytest.raises(WeightLoadError, match=r"mid_block\.attentions\.0\.extra\.weight"):
        jaxvision.from_pretrained(tmp_path)


def test_config_accepts_every_key_diffusers_writes():
    """The config diffusers registers for a default-constructed model (all 48 keys, SD 1.x defaults)
    reads back into the same config and writes every one of those keys again."""
    model = UNet2DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=4,
        layers_per_block=1,
    )
    hf = dict(model.config)
    config = UNet2DConditionConfig.from_hf(hf)
    out = config.to_hf()
    assert set(hf) - {"_use_default_values"} <= set(out)
    assert UNet2DConditionConfig.from_hf(json.loads(json.dumps(out))) == config


_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# The unet/config.json files of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1,
# as published (older diffusers releases wrote fewer keys).
HUB_SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": _SD_DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": _SD_UP,
}  # fmt: skip
HUB_SD21 = {
    **HUB_SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
}  # fmt: skip


@pytest.mark.parametrize("hub, variant", [(HUB_SD15, "sd15"), (HUB_SD21, "sd21")])
def test_hub_configs_read_as_variants(hub, variant):
    """The published SD 1.5 / SD 2.1 UNet config files read into exactly the "sd15" / "sd21" variants."""
    assert UNet2DConditionConfig.from_hf(hub, source="unet/config.json") == UNet2DConditionConfig.from_variant(variant)


@pytest.mark.parametrize(
    "key, value",
    [
        ("resnet_time_scale_shift", "scale_shift"),
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("time_cond_proj_dim", 256),
        ("dual_cross_attention", True),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("transformer_layers_per_block", 2),
        ("attention_type", "gated"),
        ("num_class_embeds", 10),
        ("encoder_hid_dim", 768),
        ("reverse_transformer_layers_per_block", [[1], [1]]),
        ("num_attention_heads", 8),
    ],
)
def test_unsupported_config_values_fail_naming_them(key, value):
    """A config key that selects an unimplemented feature raises ConfigError naming the key and value."""
    cfg = {**TINY_CONFIGS["sd1"], key: value}
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r}")):
        UNet2DConditionConfig.from_hf(cfg, source="unet/config.json")


def test_unknown_config_key_fails():
    """A key diffusers never writes is rejected by name rather than ignored."""
    cfg = {**TINY_CONFIGS["sd1"], "use_flash_magic": True}
    with pytest.raises(ConfigError, match="use_flash_magic"):
        UNet2DConditionConfig.from_hf(cfg, source="unet/config.json")


def test_parameters_carry_logical_axis_names():
    """Every parameter of the SD 2.1 UNet (shape-only) has one known logical axis name (or None) per
    dimension, never the same name twice; attention and feed-forward kernels use EMBED/HEADS/MLP."""
    from flax.core import meta

    from jaxvision.models import layers, unet

    config = UNet2DConditionConfig.from_variant("sd21")
    module = unet.build(config)
    boxed = jax.eval_shape(module.init, jax.random.key(0), *unet.example_inputs(config))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))[0]
    assert len(leaves) > 600
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, meta.Partitioned), name
        names = leaf.names
        assert len(names) == leaf.value.ndim, name
        assert all(n is None or n in layers.LOGICAL_AXIS_NAMES for n in names), name
        real = [n for n in names if n is not None]
        assert len(real) == len(set(real)), name
    p = boxed["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert p["attn1"]["to_q"]["kernel"].names == (layers.EMBED, layers.HEADS)
    assert p["attn2"]["to_out_0"]["kernel"].names == (layers.HEADS, layers.EMBED)
    assert p["ff"]["net_0"]["proj"]["kernel"].names == (layers.EMBED, layers.MLP)


def test_bf16_compute(tmp_path):
    """bf16 compute (fp32 params, fp32 norms) stays within 5e-2 of output scale of diffusers' fp32
    output and still returns fp32."""
    cfg = TINY_CONFIGS["sd1"]
    model = _torch_unet(tmp_path, cfg)
    sample, context = _inputs(cfg, 2, 8, 8)
    expected = _torch_out(model, sample, 500, context)
    module, params = jaxvision.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    out = _jax_out(module, params, sample, 500, context)
    assert out.dtype == jnp.float32
    assert max_rel_error(out, expected) <= 5e-2


FULL = {
    # (variant, latent batch/size, what the test covers)
    "sd15": (2, 16, "320/640/1280/1280, 8 heads, 768-wide context, 1x1-conv projections"),
    "sd21": (1, 8, "per-block heads 5/10/20/20, 1024-wide context, linear projections, upcast attention"),
}


@pytest.fixture(scope="module", params=list(FULL))
def full_size(request, tmp_path_factory):
    """A full SD 1.5 / SD 2.1 (768-v) UNet config (about 860M parameters) with random weights, saved by
    diffusers, and its output on a small latent with per-example timesteps and a 77-token context."""
    name = request.param
    batch, size, _ = FULL[name]
    path = tmp_path_factory.mktemp(f"{name}-unet")
    cfg = UNet2DConditionConfig.from_variant(name).to_hf()
    model = _torch_unet(path, cfg)
    sample, context = _inputs(cfg, batch, size, size, text_len=77)
    timesteps = np.array([999, 1][:batch], np.int32)
    expected = _torch_out(model, sample, timesteps, context)
    del model
    return name, path, sample, timesteps, context, expected


def test_full_size_parity(full_size):
    """The full SD 1.5 and SD 2.1 UNets: the jitted jaxvision output equals diffusers' within 1e-4 of
    output scale (see FULL for what each covers)."""
    name, path, sample, timesteps, context, expected = full_size
    module, params = jaxvision.from_pretrained(path)
    assert module.config == UNet2DConditionConfig.from_variant(name)
    out = _jax_out(module, params, sample, timesteps, context)
    assert max_rel_error(out, expected) <= TOL
