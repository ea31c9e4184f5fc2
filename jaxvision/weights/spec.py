"""`ModelSpec`: how one model family maps between a Hugging Face folder and jaxvision."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn

from jaxvision.weights.mapping import KeyTable


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How one family maps between a Hugging Face folder and jaxvision.

    Attributes:
      name: shown in messages.
      matches: is this `config.json` dict ours?
      config_type: the config dataclass, to recognise a module's family on save; its `to_hf()`
        writes `config.json` there.
      config_from_hf: `(config.json dict, source) → config`, usually `config_type.from_hf`.
      build: `(config, **module_kwargs) → module`.
      key_table: `config → KeyTable`.
      example_inputs: `config → tuple of jax.ShapeDtypeStruct` for `module.init`.
      weights_name: the file `save_pretrained` writes.
      extra_files: `(module, directory) → None`, writes companions (e.g. preprocessor config).
      normalize_state: `(config, state) → state` in the key table's naming, for families whose
        checkpoints exist under more than one naming (CLIP text: with/without `text_model.`).
    """

    name: str
    matches: Callable[[dict], bool]
    config_type: type
    config_from_hf: Callable[[dict, str], Any]
    build: Callable[..., nn.Module]
    key_table: Callable[[Any], KeyTable]
    example_inputs: Callable[[Any], tuple]
    weights_name: str = "model.safetensors"
    extra_files: Callable[[nn.Module, Path], None] | None = None
    normalize_state: Callable[[Any, dict], dict] | None = None
