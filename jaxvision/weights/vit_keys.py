"""Key table: jaxvision ViT ↔ transformers ViT checkpoints (the legacy names the Hub files use)."""

from __future__ import annotations

from jaxvision.models import vit
from jaxvision.models.vit import ViTConfig
from jaxvision.weights.mapping import CONV, LINEAR, KeyTable, Rule
from jaxvision.weights.spec import ModelSpec


def _linear(flax: str, torch: str) -> list[Rule]:
    return [Rule(f"{flax}/kernel", f"{torch}.weight", LINEAR), Rule(f"{flax}/bias", f"{torch}.bias")]


def _norm(flax: str, torch: str) -> list[Rule]:
    return [Rule(f"{flax}/scale", f"{torch}.weight"), Rule(f"{flax}/bias", f"{torch}.bias")]


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
        *_norm(f"{layer_f}/layernorm_before", f"{layer_t}.layernorm_before"),
        *_linear(f"{layer_f}/attention/query", f"{layer_t}.attention.attention.query"),
        *_linear(f"{layer_f}/attention/key", f"{layer_t}.attention.attention.key"),
        *_linear(f"{layer_f}/attention/value", f"{layer_t}.attention.attention.value"),
        *_linear(f"{layer_f}/attention/output", f"{layer_t}.attention.output.dense"),
        *_norm(f"{layer_f}/layernorm_after", f"{layer_t}.layernorm_after"),
        *_linear(f"{layer_f}/intermediate", f"{layer_t}.intermediate.dense"),
        *_linear(f"{layer_f}/output", f"{layer_t}.output.dense"),
        *_norm(f + "layernorm", t + "layernorm"),
        *_linear(f + "pooler", t + "pooler.dense"),
    ]


def vit_key_table(config: ViTConfig) -> KeyTable:
    if config.architecture == "ViTModel":
        return KeyTable(_backbone("", ""))
    return KeyTable([*_backbone("vit/", "vit."), *_linear("classifier", "classifier")])


SPEC = ModelSpec(
    name="ViT",
    matches=lambda cfg: cfg.get("model_type") == "vit",
    config_type=ViTConfig,
    config_from_hf=ViTConfig.from_hf,
    build=vit.build,
    key_table=vit_key_table,
    example_inputs=vit.example_inputs,
)
