"""What a DreamBooth run writes besides checkpoints: validation grids and the diffusers export."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxvision.diffusion.components import save_components
from jaxvision.pretrained import save_pretrained
from jaxvision.trainers.dreambooth.config import DreamBoothConfig


def export_model(cfg: DreamBoothConfig, comps: Any, params: dict, directory: Path) -> Path:
    """Writes the trained model to `directory` in diffusers layout.

    The whole pipeline (`model_index.json` and every component) by default; with
    `train.export_trained_only` only the networks that trained (`unet/`, and `text_encoder/` when
    `train.train_text_encoder`): the rest is the base model's, unchanged, so a user swaps them into
    the base pipeline (`UNet2DConditionModel.from_pretrained(directory / "unet")`).

    Args:
      params: `{"unet", "text_encoder", "vae"}` host params (adapters already merged).
    """
    if not cfg.train.export_trained_only:
        trained = dict(unet_params=params["unet"], text_encoder_params=params["text_encoder"])
        return save_components(dataclasses.replace(comps, **trained, vae_params=params["vae"]), directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_pretrained(comps.unet, params["unet"], directory / "unet")
    if cfg.train.train_text_encoder:
        save_pretrained(comps.text_encoder, params["text_encoder"], directory / "text_encoder")
    return directory


def sample_grid(pipe: Any, cfg: DreamBoothConfig) -> tuple[Any, np.ndarray]:
    """Validation images of every prompt (rows) × seed (columns): a PIL grid and `[N, H, W, 3]` floats."""
    v = cfg.validation
    prompts = [p for p in v.prompts for _ in range(v.num_images_per_prompt)]
    seeds = [v.seed + i for _ in v.prompts for i in range(v.num_images_per_prompt)]
    images = pipe(
        prompts,
        num_inference_steps=v.num_inference_steps,
        guidance_scale=v.guidance_scale,
        height=cfg.data.resolution,
        width=cfg.data.resolution,
        seed=seeds,
        scheduler=v.scheduler,
        output_type="np",
    )
    n, h, w, _ = images.shape
    rows, cols = len(v.prompts), v.num_images_per_prompt
    grid = images.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)
    return Image.fromarray((grid * 255).round().astype(np.uint8)), grid
