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
from jaxvision.weights.mapping import CONV, CONV1X1_AS_LINEAR, LINEAR, KeyTable, Rule, Transform
from jaxvision.weights.spec import ModelSpec


def _linear(flax: str, torch: str, transform: Transform = LINEAR, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{flax}/kernel", f"{torch}.weight", transform)]
    return rules + [Rule(f"{flax}/bias", f"{torch}.bias")] if bias else rules


def _conv(flax: str, torch: str) -> list[Rule]:
    return _linear(flax, torch, CONV)


def _norm(flax: str, torch: str) -> list[Rule]:
    return [Rule(f"{flax}/scale", f"{torch}.weight"), Rule(f"{flax}/bias", f"{torch}.bias")]


def _resnet(f: str, t: str) -> list[Rule]:
    """diffusers' ResnetBlock2D under Flax prefix `f` / torch prefix `t`."""
    return [
        *_norm(f"{f}/norm1", f"{t}.norm1"),
        *_conv(f"{f}/conv1", f"{t}.conv1"),
        *_linear(f"{f}/time_emb_proj", f"{t}.time_emb_proj"),
        *_norm(f"{f}/norm2", f"{t}.norm2"),
        *_conv(f"{f}/conv2", f"{t}.conv2"),
        *_conv(f"{f}/conv_shortcut", f"{t}.conv_shortcut"),
    ]


def _transformer(f: str, t: str, proj: Transform) -> list[Rule]:
    """diffusers' Transformer2DModel (+ its BasicTransformerBlocks) under prefixes `f` / `t`."""
    bf, bt = f"{f}/transformer_blocks_{{k}}", f"{t}.transformer_blocks.{{k}}"
    rules = [*_norm(f"{f}/norm", f"{t}.norm"), *_linear(f"{f}/proj_in", f"{t}.proj_in", proj)]
    for attn in ("attn1", "attn2"):
        for name in ("to_q", "to_k", "to_v"):
            rules += _linear(f"{bf}/{attn}/{name}", f"{bt}.{attn}.{name}", bias=False)
        rules += _linear(f"{bf}/{attn}/to_out_0", f"{bt}.{attn}.to_out.0")
    for norm in ("norm1", "norm2", "norm3"):
        rules += _norm(f"{bf}/{norm}", f"{bt}.{norm}")
    rules += _linear(f"{bf}/ff/net_0/proj", f"{bt}.ff.net.0.proj")
    rules += _linear(f"{bf}/ff/net_2", f"{bt}.ff.net.2")
    return rules + _linear(f"{f}/proj_out", f"{t}.proj_out", proj)


def unet_key_table(config: UNet2DConditionConfig) -> KeyTable:
    proj = LINEAR if config.use_linear_projection else CONV1X1_AS_LINEAR
    rules = [
        *_conv("conv_in", "conv_in"),
        *_linear("time_embedding/linear_1", "time_embedding.linear_1"),
        *_linear("time_embedding/linear_2", "time_embedding.linear_2"),
        *_norm("conv_norm_out", "conv_norm_out"),
        *_conv("conv_out", "conv_out"),
    ]
    for f, t in (
        ("down_blocks_{i}", "down_blocks.{i}"),
        ("up_blocks_{i}", "up_blocks.{i}"),
        ("mid_block", "mid_block"),
    ):
        rules += _resnet(f"{f}/resnets_{{j}}", f"{t}.resnets.{{j}}")
        rules += _transformer(f"{f}/attentions_{{j}}", f"{t}.attentions.{{j}}", proj)
    rules += _conv("down_blocks_{i}/downsamplers_0/conv", "down_blocks.{i}.downsamplers.0.conv")
    rules += _conv("up_blocks_{i}/upsamplers_0/conv", "up_blocks.{i}.upsamplers.0.conv")
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
