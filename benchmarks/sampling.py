"""Stable Diffusion sampling, text to image: seconds per image and per denoising step.

jaxvision's `StableDiffusionPipeline` (the whole loop — text encoding, CFG, DDIM, VAE decode — is
one `jax.jit`) against diffusers' `StableDiffusionPipeline` (PyTorch), same weights, same start
latents, guidance 7.5. `p`: `checkpoint` (a diffusers SD folder), `resolution`, `steps`, `batch`,
`gpu`, `dtype`, `warmup`, `iters`. The per-step figure is the per-image time over the step count,
so it includes the (once per image) text encoding and VAE decode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from benchmarks.timing import log, lowered_gflop, row, time_calls, timed, torch_device

WORKLOAD = "sd15_sampling"


def write_sd15(directory: Path) -> None:
    """Writes SD 1.5's UNet / VAE / CLIP ViT-L/14 text encoder configs with random weights
    (diffusers' and transformers' `save_pretrained`, safetensors) and a test tokenizer."""
    import diffusers
    import torch
    import transformers

    from jaxvision.diffusion.schedule import SD_SCHEDULER_CONFIG
    from jaxvision.testing.clip_tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280)
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = transformers.CLIPTextModel(
        # SD 1.5's CLIP ViT-L/14 text tower (transformers' CLIPTextConfig defaults are the smaller B/32)
        transformers.CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=0,
            eos_token_id=2,
        )
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory / "_tok"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)


def _inputs(p: dict, vae_scale_factor: int) -> tuple[dict, Any]:
    import numpy as np

    side = p["resolution"] // vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((p["batch"], side, side, 4)).astype(np.float32)
    kw = dict(
        prompt=["a photo of an astronaut riding a horse"] * p["batch"],
        num_inference_steps=p["steps"],
        guidance_scale=7.5,
        height=p["resolution"],
        width=p["resolution"],
        output_type="np",
    )
    return kw, latents


def _setting(p: dict) -> str:
    return f"{p['resolution']} px, {p['steps']} DDIM steps, batch {p['batch']}, {p['dtype']}"


def _row(p: dict, impl: str, t: Any, compile_s: float, gflop: float | None) -> dict[str, Any]:
    return row(
        WORKLOAD,
        _setting(p),
        impl,
        t,
        per_call=p["batch"],
        unit="image",
        compile_s=compile_s,
        gflop=gflop,
        s_per_step=t.median_s / p["batch"] / p["steps"],
    )


def sampling_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision: the jitted sampler; its first call compiles (reported as compile_s)."""
    import jax.numpy as jnp

    from jaxvision.diffusion.components import load_components
    from jaxvision.diffusion.pipeline import StableDiffusionPipeline

    dtype = jnp.dtype(p["dtype"])
    # Weights stored in the compute dtype, as diffusers' `torch_dtype=` does.
    comps = load_components(p["checkpoint"], dtype=dtype, param_dtype=dtype)
    if p.get("attention_impl"):
        comps = dataclasses.replace(comps, unet=comps.unet.clone(attention_impl=p["attention_impl"]))
    pipe = StableDiffusionPipeline(comps)
    kw, latents = _inputs(p, pipe.components.vae_scale_factor)

    def call() -> None:
        pipe(**kw, latents=latents, scheduler="ddim")  # returns host numpy: synchronised

    _, first_s = timed(call)
    t = time_calls(call, warmup=max(0, p["warmup"] - 1), iters=p["iters"])
    log(f"sampling: first call {first_s:.1f} s, then {t.median_s:.1f} s")
    return [_row(p, "jaxvision", t, first_s - t.median_s, _gflop(pipe, latents.shape, p["steps"], dtype))]


def _gflop(pipe: Any, shape: tuple[int, ...], steps: int, dtype: Any) -> float | None:
    """GFLOP of one sampling call: `steps` CFG UNet passes (batch 2 × images), one VAE decode and
    the text encoder on both prompts, from XLA's cost analysis of each lowered piece."""
    import jax
    import jax.numpy as jnp

    c, params = pipe.components, pipe.params
    b, sds = shape[0], jax.ShapeDtypeStruct
    tokens = c.text_encoder.config.max_position_embeddings
    unet = lowered_gflop(
        lambda p, x, t, ctx: c.unet.apply({"params": p}, x, t, ctx),
        params["unet"],
        sds((2 * b, *shape[1:]), dtype),
        sds((2 * b,), jnp.int32),
        sds((2 * b, tokens, c.unet.config.context_width), dtype),
    )
    vae = lowered_gflop(lambda p, z: c.vae.apply({"params": p}, z, method="decode"), params["vae"], sds(shape, dtype))
    text = lowered_gflop(
        lambda p, ids: c.text_encoder.apply({"params": p}, ids).last_hidden_state,
        params["text_encoder"],
        sds((2 * b, tokens), jnp.int32),
    )
    return steps * unet + vae + text if unet and vae and text else None


def sampling_torch(p: dict) -> list[dict[str, Any]]:
    """diffusers' `StableDiffusionPipeline` with `DDIMScheduler`, under `torch.inference_mode`."""
    import diffusers
    import torch

    device, sync = torch_device(p["gpu"])
    dtype = getattr(torch, p["dtype"])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(p["checkpoint"], torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    kw, latents = _inputs(p, pipe.vae_scale_factor)
    tl = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()).to(device, dtype)

    def call() -> None:
        with torch.inference_mode():
            pipe(**kw, latents=tl)
        sync()

    _, first_s = timed(call)
    t = time_calls(call, warmup=max(0, p["warmup"] - 1), iters=p["iters"])
    return [_row(p, "torch", t, first_s - t.median_s, p.get("gflop"))]
