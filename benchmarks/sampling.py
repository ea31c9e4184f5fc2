"""Stable Diffusion sampling: seconds per image, jaxvision vs diffusers (PyTorch), same weights.

    python -m benchmarks.sampling                       # full SD 1.5 config, 256 px, 10 DDIM steps
    python -m benchmarks.sampling --tiny --steps 5      # the test-size model, a quick smoke run

Random weights (the full SD 1.5 UNet / VAE / CLIP-L configs) are written once by diffusers'
`save_pretrained` and loaded by both libraries. Both start from the same latents, with CFG
(guidance 7.5). jaxvision's compile time is reported separately from its steady-state time;
torch's first call is a warm-up. Nothing here is asserted: it is a measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _sd15_pipeline(directory: Path, tiny: bool):
    import diffusers
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures.clip_tokenizer import write_clip_tokenizer
    from fixtures.tiny_sd import SD15_SCHEDULER, write_tiny_sd

    if tiny:
        return write_tiny_sd(directory)
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
        scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return diffusers.StableDiffusionPipeline.from_pretrained(directory)


def main(argv: list[str] | None = None) -> dict:
    import diffusers
    import jax
    import torch

    from jaxvision.diffusion.pipeline import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of the SD 1.5 config")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    res = 16 if args.tiny else args.resolution
    with tempfile.TemporaryDirectory() as tmp:
        reference = _sd15_pipeline(Path(tmp), args.tiny)
        reference.set_progress_bar_config(disable=True)
        reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
        ours = StableDiffusionPipeline.from_pretrained(tmp)
    latent = res // ours.components.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((args.batch, latent, latent, 4)).astype(np.float32)
    kw = dict(
        prompt=["a photo of an astronaut"] * args.batch,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        height=res,
        width=res,
        output_type="np",
    )

    t0 = time.perf_counter()
    ours(**kw, latents=latents, scheduler="ddim")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours(**kw, latents=latents, scheduler="ddim")
    jax_s = time.perf_counter() - t0

    torch.set_num_threads(torch.get_num_threads())
    tl = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        reference(**kw, latents=tl)
        t0 = time.perf_counter()
        reference(**kw, latents=tl)
        torch_s = time.perf_counter() - t0
    row = dict(
        model="tiny" if args.tiny else "sd15",
        resolution=res,
        steps=args.steps,
        batch=args.batch,
        jax_s_per_image=jax_s / args.batch,
        torch_s_per_image=torch_s / args.batch,
        jax_compile_s=first - jax_s,
        ratio=torch_s / jax_s,
        platform=jax.devices()[0].platform,
    )
    print(f"SD sampling ({row['model']}, {res}px, {args.steps} DDIM steps, CFG, batch {args.batch}, {row['platform']})")
    print(f"  jaxvision: {row['jax_s_per_image']:.2f} s/image (compile {row['jax_compile_s']:.1f} s, once)")
    print(f"  diffusers: {row['torch_s_per_image']:.2f} s/image")
    print(f"  speed-up : {row['ratio']:.2f}x")
    return row


if __name__ == "__main__":
    main()
