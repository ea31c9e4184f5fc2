"""A whole diffusers Stable Diffusion directory: `model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/` — loaded into jaxvision modules, and written back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.errors import ConfigError
from jaxvision.models.hf_config import DIFFUSERS_VERSION
from jaxvision.pretrained import from_pretrained, save_pretrained

# component → the (library, class) pairs jaxvision implements for it.
SUPPORTED = {
    "text_encoder": {("transformers", "CLIPTextModel")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "unet": {("diffusers", "UNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL")},
}
# Components a Stable Diffusion directory may carry that the sampler does not run. The safety
# checker is a separate classifier on the output images; jaxvision does not implement it.
OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")
SCHEDULER_CLASSES = {
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler",
}
PIPELINE_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}


@dataclasses.dataclass
class StableDiffusionComponents:
    """The networks (module + params), the tokenizer and the scheduler config of one checkpoint."""

    text_encoder: nn.Module
    text_encoder_params: dict
    unet: nn.Module
    unet_params: dict
    vae: nn.Module
    vae_params: dict
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: Path | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def read_model_index(path: str | Path) -> dict[str, Any]:
    """Reads and checks `model_index.json`; names any component or class jaxvision lacks."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ConfigError(f"{index_file}: missing; a diffusers pipeline folder starts with model_index.json")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{index_file}: not valid JSON ({e})") from None
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ConfigError(
            f"{index_file}: pipeline class {index.get('_class_name')!r} is not implemented; "
            f"jaxvision runs {sorted(PIPELINE_CLASSES)}"
        )
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if name in OPTIONAL or entry == [None, None]:
            continue
        if name == "scheduler":
            if entry[1] not in SCHEDULER_CLASSES:
                raise ConfigError(
                    f"{index_file}: scheduler class {entry[1]!r} is not implemented; "
                    f"supported: {sorted(SCHEDULER_CLASSES)}"
                )
            continue
        if name not in SUPPORTED:
            raise ConfigError(f"{index_file}: component {name!r} ({entry[0]}.{entry[1]}) is not implemented")
        if tuple(entry) not in SUPPORTED[name]:
            raise ConfigError(
                f"{index_file}: {name} is {entry[0]}.{entry[1]}, which jaxvision does not implement; "
                f"supported: {sorted('.'.join(s) for s in SUPPORTED[name])}"
            )
    for name in (*SUPPORTED, "scheduler"):
        if name not in index or index[name] == [None, None]:
            raise ConfigError(f"{index_file}: the pipeline needs a {name!r} component, which it does not list")
        if not (path / name).is_dir():
            raise ConfigError(f"{path / name}: component folder missing (model_index.json lists {name!r})")
    return index


def load_components(
    path: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> StableDiffusionComponents:
    """Loads every component of a local diffusers Stable Diffusion folder."""
    from jaxvision.tokenizer import load_tokenizer

    path = Path(path)
    read_model_index(path)
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant, allow_pickle=allow_pickle)
    text_encoder, text_params = from_pretrained(path / "text_encoder", **kw)
    unet, unet_params = from_pretrained(path / "unet", **kw)
    vae, vae_params = from_pretrained(path / "vae", **kw)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise ConfigError(f"{sched_file}: missing; copy scheduler/ from the original checkpoint")
    return StableDiffusionComponents(
        text_encoder,
        text_params,
        unet,
        unet_params,
        vae,
        vae_params,
        load_tokenizer(path / "tokenizer"),
        json.loads(sched_file.read_text()),
        path,
    )


def save_components(c: StableDiffusionComponents, path: str | Path) -> Path:
    """Writes a diffusers directory that `diffusers.StableDiffusionPipeline.from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained(c.text_encoder, c.text_encoder_params, path / "text_encoder")
    save_pretrained(c.unet, c.unet_params, path / "unet")
    save_pretrained(c.vae, c.vae_params, path / "vae")
    c.tokenizer.save_pretrained(str(path / "tokenizer"))
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(c.scheduler_config, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", c.scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
