"""LoRA adapters as files: diffusers' `pytorch_lora_weights.safetensors` (PEFT keys).

`save_lora_weights` names the adapters through the models' key tables (`unet.<module>.lora_A.weight`
`[rank, in]`, `unet.<module>.lora_B.weight` `[out, rank]`, the text encoder's under
`text_encoder.`) and stores each network's PEFT `LoraConfig` (`r`, `lora_alpha`,
`target_modules`) in the file's `lora_adapter_metadata`, which diffusers' `load_lora_weights`
reads, so its scale equals `alpha / rank` whatever alpha is. (Loaders that ignore that metadata
assume alpha = rank, the default.) The adapter maths lives in `jaxvision.train.lora`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta

from jaxvision.errors import ConfigError
from jaxvision.train.lora import DOWN, UP, LoraConfig
from jaxvision.weights.clip_text_keys import clip_text_key_table
from jaxvision.weights.safetensors_io import write_safetensors
from jaxvision.weights.unet_keys import unet_key_table

PyTree = Any
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file `load_lora_weights(dir)` looks for
METADATA_KEY = "lora_adapter_metadata"  # diffusers' `LORA_ADAPTER_METADATA_KEY`


def lora_state_dict(adapters: PyTree, tables: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """PEFT-named, PyTorch-layout adapter tensors, and the adapted torch module names per network.

    Args:
      adapters: a tree holding `<network>/<module>/lora_down` / `lora_up` leaves (other leaves
        are ignored), e.g. the train state's params.
      tables: network name → its `KeyTable` (the one that names the base weights).
    Returns:
      `(tensors, modules)`: `{"unet.<module>.lora_A.weight": [rank, in], "...lora_B.weight":
      [out, rank]}` (a 1x1 conv in the checkpoint gets `[rank, in, 1, 1]` / `[out, rank, 1, 1]`,
      as PEFT's Conv2d adapter), and `{network: [<module>, ...]}`.
    """
    flat = traverse_util.flatten_dict(meta.unbox(adapters), sep="/")
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, list[str]] = {}
    for path in flat:
        if not path.endswith(f"/{DOWN}"):
            continue
        module = path.removesuffix(f"/{DOWN}")
        network, inner = module.split("/", 1)
        match = tables[network].to_torch_key(f"{inner}/kernel") if network in tables else None
        if match is None or not match[0].endswith(".weight"):
            raise ConfigError(f"LoRA export: {module} has no Linear weight in the {network} key table")
        key, transform = match
        name = key.removesuffix(".weight")
        # The kernel's own transform turns the adapters, Dense-shaped [in, r] / [r, out], into
        # the layout of PEFT's lora_A / lora_B layers built around that torch layer.
        for leaf, peft_name in ((DOWN, "lora_A"), (UP, "lora_B")):
            value = np.asarray(jax.device_get(flat[f"{module}/{leaf}"]), np.float32)
            tensors[f"{network}.{name}.{peft_name}.weight"] = np.ascontiguousarray(transform.to_torch(value))
        modules.setdefault(network, []).append(name)
    return tensors, modules


def save_lora_weights(
    adapters: PyTree, cfg: LoraConfig, *, unet_config: Any, text_encoder_config: Any, directory: str | Path
) -> Path:
    """Writes `directory/pytorch_lora_weights.safetensors` for diffusers' `load_lora_weights`.

    Args:
      adapters: the tree with the adapter leaves (see `lora_state_dict`).
      cfg: the LoRA config (rank and alpha go into the metadata).
      unet_config, text_encoder_config: the base models' configs, for their key tables.
      directory: the output folder (created if missing).
    Returns:
      The file written.
    """
    tables = {"unet": unet_key_table(unet_config), "text_encoder": clip_text_key_table(text_encoder_config)}
    tensors, modules = lora_state_dict(adapters, tables)
    if not tensors:
        raise ConfigError("LoRA export: the params hold no adapters (is train.lora.rank > 0?)")
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    metadata: dict[str, Any] = {}
    for network, names in modules.items():
        # PEFT matches target_modules by suffix; without `text_model.` the names fit both
        # transformers 4's CLIPTextModel and transformers 5's flattened one.
        targets = [n.removeprefix("text_model.") for n in names]
        metadata.update(
            {f"{network}.r": cfg.rank, f"{network}.lora_alpha": alpha, f"{network}.target_modules": targets}
        )
    path = Path(directory) / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path
