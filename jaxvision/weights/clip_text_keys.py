"""Key table: jaxvision CLIP text encoder ↔ transformers `CLIPTextModel(WithProjection)` checkpoints.

The table uses the names of the checkpoints Stable Diffusion ships (`text_model.` prefix,
written by transformers 4.x), which transformers 5 still loads; `save_pretrained` therefore
writes files that both major versions read. transformers 5's own `CLIPTextModel.save_pretrained`
drops the prefix; `normalize_state` adds it back before the strict load.
"""

from __future__ import annotations

import numpy as np

from jaxvision.models import clip_text
from jaxvision.models.clip_text import CLIPTextConfig
from jaxvision.weights.mapping import LINEAR, KeyTable, Rule, linear_rules, norm_rules
from jaxvision.weights.spec import ModelSpec

PREFIX = "text_model."


def clip_text_key_table(config: CLIPTextConfig) -> KeyTable:
    layer_f, layer_t = "text_model/layers_{i}", "text_model.encoder.layers.{i}"
    rules = [
        Rule("text_model/embeddings/token_embedding/embedding", "text_model.embeddings.token_embedding.weight"),
        Rule("text_model/embeddings/position_embedding/embedding", "text_model.embeddings.position_embedding.weight"),
        *norm_rules(f"{layer_f}/layer_norm1", f"{layer_t}.layer_norm1"),
        *linear_rules(f"{layer_f}/self_attn/q_proj", f"{layer_t}.self_attn.q_proj"),
        *linear_rules(f"{layer_f}/self_attn/k_proj", f"{layer_t}.self_attn.k_proj"),
        *linear_rules(f"{layer_f}/self_attn/v_proj", f"{layer_t}.self_attn.v_proj"),
        *linear_rules(f"{layer_f}/self_attn/out_proj", f"{layer_t}.self_attn.out_proj"),
        *norm_rules(f"{layer_f}/layer_norm2", f"{layer_t}.layer_norm2"),
        *linear_rules(f"{layer_f}/mlp/fc1", f"{layer_t}.mlp.fc1"),
        *linear_rules(f"{layer_f}/mlp/fc2", f"{layer_t}.mlp.fc2"),
        *norm_rules("text_model/final_layer_norm", "text_model.final_layer_norm"),
    ]
    if config.architecture == "CLIPTextModelWithProjection":
        rules.append(Rule("text_projection/kernel", "text_projection.weight", LINEAR))
    return KeyTable(rules)


def normalize_state(config: CLIPTextConfig, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Puts a transformers 5 `CLIPTextModel` state dict (no `text_model.` prefix) in the table's naming.

    A state dict that already has prefixed keys is returned as it is, so a file mixing both
    namings fails the strict load with its stray keys named.
    """
    if any(k.startswith(PREFIX) for k in state):
        return state
    return {k if k.startswith("text_projection.") else PREFIX + k: v for k, v in state.items()}


SPEC = ModelSpec(
    name="CLIPTextModel",
    matches=lambda cfg: cfg.get("model_type") == "clip_text_model",
    config_type=CLIPTextConfig,
    config_from_hf=CLIPTextConfig.from_hf,
    build=clip_text.build,
    key_table=clip_text_key_table,
    example_inputs=clip_text.example_inputs,
    weights_name="model.safetensors",
    normalize_state=normalize_state,
)
