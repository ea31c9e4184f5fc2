"""Key table: jaxvision UNet2DConditionModel ↔ diffusers `UNet2DConditionModel` checkpoints.

The Flax tree uses diffusers' module names with `_{i}` for list indices
(`down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q`), so each rule is one name with
`{i}`/`{j}`/`{k}` placeholders. The spatial transformers' `proj_in`/`proj_out` are Dense layers
in Flax; the checkpoint holds `nn.Linear` weights when `use_linear_projection` is set and
1x1 `nn.Conv2d` weights otherwise, which is the only config-dependent part of the table.
"""

from __future__ import annotations

from jaxvision.models import unet
from jaxvision.models.unet import CLASS_NAME, UNet2DConditionConfig
from jaxvision.weights.mapping import (
    CONV1X1_AS_LINEAR,
    LINEAR,
    KeyTable,
    Rule,
    Transform,
    conv_rules,
    linear_rules,
    norm_rules,
)
from jaxvision.weights.resnet_keys import resnet_rules
from jaxvision.weights.spec import ModelSpec


def _transformer(f: str, t: str, proj: Transform) -> list[Rule]:
    """diffusers' Transformer2DModel (+ its BasicTransformerBlocks) under prefixes `f` / `t`."""
    bf, bt = f"{f}/transformer_blocks_{{k}}", f"{t}.transformer_blocks.{{k}}"
    rules = [*norm_rules(f"{f}/norm", f"{t}.norm"), *linear_rules(f"{f}/proj_in", f"{t}.proj_in", proj)]
    for attn in ("attn1", "attn2"):
        for name in ("to_q", "to_k", "to_v"):
            rules += linear_rules(f"{bf}/{attn}/{name}", f"{bt}.{attn}.{name}", bias=False)
        rules += linear_rules(f"{bf}/{attn}/to_out_0", f"{bt}.{attn}.to_out.0")
    for norm in ("norm1", "norm2", "norm3"):
        rules += norm_rules(f"{bf}/{norm}", f"{bt}.{norm}")
    rules += linear_rules(f"{bf}/ff/net_0/proj", f"{bt}.ff.net.0.proj")
    rules += linear_rules(f"{bf}/ff/net_2", f"{bt}.ff.net.2")
    return rules + linear_rules(f"{f}/proj_out", f"{t}.proj_out", proj)


def unet_key_table(config: UNet2DConditionConfig) -> KeyTable:
    proj = LINEAR if config.use_linear_projection else CONV1X1_AS_LINEAR
    rules = [
        *conv_rules("conv_in", "conv_in"),
        *linear_rules("time_embedding/linear_1", "time_embedding.linear_1"),
        *linear_rules("time_embedding/linear_2", "time_embedding.linear_2"),
        *norm_rules("conv_norm_out", "conv_norm_out"),
        *conv_rules("conv_out", "conv_out"),
    ]
    for f, t in (
        ("down_blocks_{i}", "down_blocks.{i}"),
        ("up_blocks_{i}", "up_blocks.{i}"),
        ("mid_block", "mid_block"),
    ):
        rules += resnet_rules(f"{f}/resnets_{{j}}", f"{t}.resnets.{{j}}")
        rules += _transformer(f"{f}/attentions_{{j}}", f"{t}.attentions.{{j}}", proj)
    rules += conv_rules("down_blocks_{i}/downsamplers_0/conv", "down_blocks.{i}.downsamplers.0.conv")
    rules += conv_rules("up_blocks_{i}/upsamplers_0/conv", "up_blocks.{i}.upsamplers.0.conv")
    return KeyTable(rules)


SPEC = ModelSpec(
    name=CLASS_NAME,
    matches=lambda cfg: cfg.get("_class_name") == CLASS_NAME,
    config_type=UNet2DConditionConfig,
    config_from_hf=UNet2DConditionConfig.from_hf,
    build=unet.build,
    key_table=unet_key_table,
    example_inputs=unet.example_inputs,
    weights_name="diffusion_pytorch_model.safetensors",
)
