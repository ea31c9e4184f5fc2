"""Key table: jaxvision ViT ↔ transformers ViT checkpoints (the legacy names the Hub files use)."""

from __future__ import annotations

from jaxvision.models import vit
from jaxvision.models.vit import ViTConfig
from jaxvision.weights.mapping import CONV, KeyTable, Rule, linear_rules, norm_rules
from jaxvision.weights.spec import ModelSpec


def _backbone(f: str, t: str) -> list[Rule]:
    """Rules for ViTModel under Flax prefix `f` and torch prefix `t` ("" or "vit/" / "vit.")."""
    layer_f, layer_t = f + "layer_{i}", t + "encoder.layer.{i}"
    return [
        Rule(f + "embeddings/cls_token", t + "embeddings.cls_token"),
        Rule(f + "embeddings/position_embeddings", t + "embeddings.position_embeddings"),
        Rule(
            f + "embeddings/patch_embeddings/kernel",
            t + "embeddings.patch_embeddings.projection.weight",
            CONV,
        ),
        Rule(f + "embeddings/patch_embeddings/bias", t + "embeddings.patch_embeddings.projection.bias"),
        *norm_rules(f"{layer_f}/layernorm_before", f"{layer_t}.layernorm_before"),
        *linear_rules(f"{layer_f}/attention/query", f"{layer_t}.attention.attention.query"),
        *linear_rules(f"{layer_f}/attention/key", f"{layer_t}.attention.attention.key"),
        *linear_rules(f"{layer_f}/attention/value", f"{layer_t}.attention.attention.value"),
        *linear_rules(f"{layer_f}/attention/output", f"{layer_t}.attention.output.dense"),
        *norm_rules(f"{layer_f}/layernorm_after", f"{layer_t}.layernorm_after"),
        *linear_rules(f"{layer_f}/intermediate", f"{layer_t}.intermediate.dense"),
        *linear_rules(f"{layer_f}/output", f"{layer_t}.output.dense"),
        *norm_rules(f + "layernorm", t + "layernorm"),
        *linear_rules(f + "pooler", t + "pooler.dense"),
    ]


def vit_key_table(config: ViTConfig) -> KeyTable:
    if config.architecture == "ViTModel":
        return KeyTable(_backbone("", ""))
    return KeyTable([*_backbone("vit/", "vit."), *linear_rules("classifier", "classifier")])


SPEC = ModelSpec(
    name="ViT",
    matches=lambda cfg: cfg.get("model_type") == "vit",
    config_type=ViTConfig,
    config_from_hf=ViTConfig.from_hf,
    build=vit.build,
    key_table=vit_key_table,
    example_inputs=vit.example_inputs,
)
