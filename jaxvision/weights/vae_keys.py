"""Key table: jaxvision AutoencoderKL ↔ diffusers `AutoencoderKL` checkpoints.

diffusers (0.42) saves the mid-block attention under its current names (`group_norm`, `to_q`,
`to_k`, `to_v`, `to_out.0`); the pre-0.14 names (`query`, `key`, `value`, `proj_attn`) are
converted by diffusers on load only for old Hub files, and are not accepted here.
"""

from __future__ import annotations

from jaxvision.models import vae
from jaxvision.models.vae import AutoencoderKLConfig
from jaxvision.weights.mapping import KeyTable, Rule, conv_rules, linear_rules, norm_rules
from jaxvision.weights.resnet_keys import join, resnet_rules
from jaxvision.weights.spec import ModelSpec


def attention_rules(f: str, t: str) -> list[Rule]:
    """`vae.SpatialSelfAttention` ↔ diffusers' `Attention` (current key names)."""
    return [
        *norm_rules(join(f, "group_norm", "/"), join(t, "group_norm", ".")),
        *[r for n in ("to_q", "to_k", "to_v") for r in linear_rules(join(f, n, "/"), join(t, n, "."))],
        *linear_rules(join(f, "to_out_0", "/"), join(t, "to_out.0", ".")),
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
