"""Key table: jaxvision AutoencoderKL ↔ diffusers `AutoencoderKL` checkpoints.

diffusers (0.42) saves the mid-block attention under its current names (`group_norm`, `to_q`,
`to_k`, `to_v`, `to_out.0`); the pre-0.14 names (`query`, `key`, `value`, `proj_attn`) are
converted by diffusers on load only for old Hub files, and are not accepted here.
The `resnet_rules` / `conv_rules` / `norm_rules` helpers serve any diffusers 2-D model.
"""

from __future__ import annotations

from jaxvision.models import vae
from jaxvision.models.vae import AutoencoderKLConfig
from jaxvision.weights.mapping import CONV, LINEAR, KeyTable, Rule
from jaxvision.weights.spec import ModelSpec


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def conv_rules(f: str, t: str) -> list[Rule]:
    """An `nn.Conv` at Flax path `f` ↔ a torch `nn.Conv2d` at key prefix `t`."""
    return [Rule(f"{f}/kernel", f"{t}.weight", CONV), Rule(f"{f}/bias", f"{t}.bias")]


def linear_rules(f: str, t: str) -> list[Rule]:
    return [Rule(f"{f}/kernel", f"{t}.weight", LINEAR), Rule(f"{f}/bias", f"{t}.bias")]


def norm_rules(f: str, t: str) -> list[Rule]:
    return [Rule(f"{f}/scale", f"{t}.weight"), Rule(f"{f}/bias", f"{t}.bias")]


def resnet_rules(f: str, t: str) -> list[Rule]:
    """A `resnet.ResnetBlock2D` at Flax path `f` ↔ diffusers' `ResnetBlock2D` at `t` ("" = root)."""
    return [
        *norm_rules(_join(f, "norm1", "/"), _join(t, "norm1", ".")),
        *conv_rules(_join(f, "conv1", "/"), _join(t, "conv1", ".")),
        *linear_rules(_join(f, "time_emb_proj", "/"), _join(t, "time_emb_proj", ".")),
        *norm_rules(_join(f, "norm2", "/"), _join(t, "norm2", ".")),
        *conv_rules(_join(f, "conv2", "/"), _join(t, "conv2", ".")),
        *conv_rules(_join(f, "conv_shortcut", "/"), _join(t, "conv_shortcut", ".")),
    ]


def attention_rules(f: str, t: str) -> list[Rule]:
    """`vae.SpatialSelfAttention` ↔ diffusers' `Attention` (current key names)."""
    return [
        *norm_rules(_join(f, "group_norm", "/"), _join(t, "group_norm", ".")),
        *[r for n in ("to_q", "to_k", "to_v") for r in linear_rules(_join(f, n, "/"), _join(t, n, "."))],
        *linear_rules(_join(f, "to_out_0", "/"), _join(t, "to_out.0", ".")),
    ]


def _mid_block(f: str, t: str) -> list[Rule]:
    return [
        *resnet_rules(f"{f}/resnets_{{i}}", f"{t}.resnets.{{i}}"),
        *attention_rules(f"{f}/attentions_0", f"{t}.attentions.0"),
    ]


def vae_key_table(config: AutoencoderKLConfig) -> KeyTable:
    """The table for any `AutoencoderKLConfig` (rules for absent parts simply never match)."""
    del config  # one table serves every config: paths are fully indexed
    rules = [
        *conv_rules("encoder/conv_in", "encoder.conv_in"),
        *resnet_rules("encoder/down_blocks_{i}/resnets_{j}", "encoder.down_blocks.{i}.resnets.{j}"),
        *conv_rules("encoder/down_blocks_{i}/downsamplers_0/conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
        *_mid_block("encoder/mid_block", "encoder.mid_block"),
        *norm_rules("encoder/conv_norm_out", "encoder.conv_norm_out"),
        *conv_rules("encoder/conv_out", "encoder.conv_out"),
        *conv_rules("quant_conv", "quant_conv"),
        *conv_rules("post_quant_conv", "post_quant_conv"),
        *conv_rules("decoder/conv_in", "decoder.conv_in"),
        *_mid_block("decoder/mid_block", "decoder.mid_block"),
        *resnet_rules("decoder/up_blocks_{i}/resnets_{j}", "decoder.up_blocks.{i}.resnets.{j}"),
        *conv_rules("decoder/up_blocks_{i}/upsamplers_0/conv", "decoder.up_blocks.{i}.upsamplers.0.conv"),
        *norm_rules("decoder/conv_norm_out", "decoder.conv_norm_out"),
        *conv_rules("decoder/conv_out", "decoder.conv_out"),
    ]
    return KeyTable(rules)


SPEC = ModelSpec(
    name="AutoencoderKL",
    matches=lambda cfg: cfg.get("_class_name") == vae.CLASS_NAME,
    config_type=AutoencoderKLConfig,
    config_from_hf=AutoencoderKLConfig.from_hf,
    build=vae.build,
    key_table=vae_key_table,
    example_inputs=vae.example_inputs,
    weights_name="diffusion_pytorch_model.safetensors",
)
