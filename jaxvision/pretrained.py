"""`from_pretrained` / `save_pretrained`: Hugging Face directories ↔ (Flax module, params).

A `ModelSpec` per architecture family (`jaxvision.weights.spec`) says how to recognise its
`config.json`, build the config and module, and which key table converts its weights.
Loading builds a shape-only template with `jax.eval_shape` (no random init of a 1B-parameter model just to overwrite it),
then fills it strictly from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.errors import ConfigError
from jaxvision.models import kernels
from jaxvision.models.hf_config import read_config_json
from jaxvision.weights.checkpoint_files import read_state_dict
from jaxvision.weights.clip_text_keys import SPEC as CLIP_TEXT_SPEC
from jaxvision.weights.mapping import export_params, load_params
from jaxvision.weights.safetensors_io import write_safetensors
from jaxvision.weights.spec import ModelSpec
from jaxvision.weights.unet_keys import SPEC as UNET_SPEC
from jaxvision.weights.vae_keys import SPEC as VAE_SPEC
from jaxvision.weights.vit_keys import SPEC as VIT_SPEC

# One entry per family; each *_keys module defines its SPEC next to its key table.
SPECS: list[ModelSpec] = [VIT_SPEC, CLIP_TEXT_SPEC, VAE_SPEC, UNET_SPEC]


def spec_for_config(cfg: dict, source: str) -> ModelSpec:
    for spec in SPECS:
        if spec.matches(cfg):
            return spec
    kind = cfg.get("_class_name") or cfg.get("model_type") or "<none>"
    raise ConfigError(
        f"{source}: {kind!r} is not an architecture jaxvision implements; supported: "
        + ", ".join(s.name for s in SPECS)
    )


def spec_for_module(module: nn.Module) -> ModelSpec:
    for spec in SPECS:
        if isinstance(getattr(module, "config", None), spec.config_type):
            return spec
    raise TypeError(f"{type(module).__name__} is not a jaxvision model that can be saved")


def param_template(spec: ModelSpec, module: nn.Module) -> dict:
    """Shape/dtype-only params (with logical partitioning boxes) for `module`."""
    inputs = spec.example_inputs(module.config)
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


def build_module(spec: ModelSpec, config: Any, **module_kwargs: Any) -> nn.Module:
    """`spec`'s module for `config`, its kernels resolved for the default devices.

    `attention_impl` / `conv_impl` left out or "auto" are resolved by `kernels.resolve` for the
    platform of `jax.devices()` with the inference rules (on a CPU: "cpu" attention and "matmul"
    convolutions, its fastest forms); explicit values are kept. A caller that will run the module
    elsewhere sets its own with `kernels.with_kernels`.

    Args:
      module_kwargs: module attributes (`dtype`, `param_dtype`, `remat_policy`, `attention_impl`,
        `conv_impl`, ...).
    """
    explicit = {name: module_kwargs.pop(name) for name in ("attention_impl", "conv_impl") if name in module_kwargs}
    chosen = kernels.resolve(
        kernels.platform_of(),
        attention=explicit.get("attention_impl", "auto"),
        conv=explicit.get("conv_impl", "auto"),
        dtype=module_kwargs.get("dtype", jnp.float32),
    )
    # Explicit kernels go to the constructor too, so a field the model lacks is an error there.
    module = spec.build(config, **module_kwargs, **explicit)
    return kernels.with_kernels(module, chosen)


def from_pretrained(
    path: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    variant: str | None = None,
    **module_kwargs: Any,
) -> tuple[nn.Module, dict]:
    """Loads a local Hugging Face model folder as `(module, params)`.

    Args:
      path: a transformers model folder (`config.json` with `model_type` "vit" or
        "clip_text_model") or a diffusers component folder (`_class_name`
        "UNet2DConditionModel" / "AutoencoderKL").
      dtype: compute dtype; param_dtype: storage dtype of the returned params.
      allow_pickle: permit PyTorch `.bin` weights (read with `torch.load(weights_only=True)`).
      variant: e.g. "fp16" to read `*.fp16.safetensors`.
      module_kwargs: extra module attributes (`remat_policy`, `attention_impl`, `conv_impl`, ...).
        Kernels left out or "auto" are resolved for the default devices (`build_module`).
    Returns:
      `(module, params)`; run with `module.apply({"params": params}, ...)`.
    """
    path = Path(path)
    cfg = read_config_json(path)
    source = str(path / "config.json")
    spec = spec_for_config(cfg, source)
    config = spec.config_from_hf(cfg, source)
    module = build_module(spec, config, dtype=dtype, param_dtype=param_dtype, **module_kwargs)
    state, weights_file = read_state_dict(path, allow_pickle=allow_pickle, variant=variant)
    if spec.normalize_state is not None:
        state = spec.normalize_state(config, state)
    params = load_params(param_template(spec, module), state, spec.key_table(config), source=str(weights_file))
    return module, jax.tree.map(jnp.asarray, params)


def save_pretrained(module: nn.Module, params: dict, path: str | Path, *, dtype: Any = None) -> Path:
    """Writes `config.json` + safetensors that the PyTorch library loads with its `from_pretrained`.

    Args:
      dtype: optionally cast floating weights (e.g. `np.float16`) on the way out.
    Returns:
      The directory written.
    """
    spec = spec_for_module(module)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype) if dtype is not None else None
    tensors = export_params(params, spec.key_table(module.config), dtype=np_dtype)
    write_safetensors(path / spec.weights_name, tensors, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(module.config.to_hf(), indent=2, sort_keys=True) + "\n")
    if spec.extra_files is not None:
        spec.extra_files(module, path)
    return path
