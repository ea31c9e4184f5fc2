"""SD 1.5 UNet: one classifier-free-guidance denoising step.

The UNet runs on a batch of 2 × `batch` (unconditional and conditional halves, 77-token CLIP-L
contexts), then the guidance mix `uncond + 7.5 (cond - uncond)`; the scheduler's update is a few
elementwise ops and is left out. `p`: `checkpoint` (a diffusers SD folder), `latent` (side of the
latents: 64 for 512 px, 32 for 256 px), `batch`, `dtype`, `gpu`, `attention_impl`, `warmup`, `iters`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.timing import block, lower_and_compile, program_flops, row, time_calls, timed, torch_device

WORKLOAD = "sd15_unet_cfg_step"


def setting(p: dict) -> str:
    return f"{p['latent']}x{p['latent']} latents, batch {p['batch']}, {p['dtype']}"


def cfg_step_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision's `UNet2DConditionModel`, `jax.jit` of the CFG step, AOT-compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxvision

    dtype = jnp.dtype(p["dtype"])
    unet, params = jaxvision.from_pretrained(Path(p["checkpoint"]) / "unet", dtype=dtype, param_dtype=dtype)
    if p.get("attention_impl"):
        unet = unet.clone(attention_impl=p["attention_impl"])
    b, side = p["batch"], p["latent"]
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((b, side, side, unet.config.in_channels)), dtype)
    context = jnp.asarray(rng.standard_normal((2 * b, 77, unet.config.context_width)), dtype)
    t = jnp.full((2 * b,), 500, jnp.int32)

    def cfg_step(module):
        def step(params, latents, t, context):
            eps = module.apply({"params": params}, jnp.concatenate([latents, latents]), t, context)
            uncond, cond = jnp.split(eps, 2)
            return uncond + 7.5 * (cond - uncond)

        return step

    step = cfg_step(unet)

    lowered, compiled, compile_s = lower_and_compile(lambda: jax.jit(step).lower(params, latents, t, context))
    timing = time_calls(lambda: block(compiled(params, latents, t, context)), warmup=p["warmup"], iters=p["iters"])
    # Counted on the same network with XLA's attention: the blocked (CPU) attention is a loop, and
    # XLA's cost analysis counts a loop body once.
    counted = jax.jit(cfg_step(unet.clone(attention_impl="xla")))
    flops = program_flops(counted.lower(params, latents, t, context), compiled)
    return [
        row(
            WORKLOAD,
            setting(p),
            "jaxvision",
            timing,
            unit="step",
            compile_s=compile_s,
            gflop=flops / 1e9 if flops else None,
            gflop_source="XLA cost analysis",
        )
    ]


def cfg_step_torch(p: dict) -> list[dict[str, Any]]:
    """diffusers' `UNet2DConditionModel` (PyTorch, default SDPA attention), the same CFG step."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    device, sync = torch_device(p["gpu"])
    dtype = getattr(torch, p["dtype"])
    unet = UNet2DConditionModel.from_pretrained(Path(p["checkpoint"]) / "unet").eval().to(device, dtype)
    b, side = p["batch"], p["latent"]
    rng = np.random.default_rng(0)
    latents = torch.from_numpy(rng.standard_normal((b, unet.config.in_channels, side, side))).to(device, dtype)
    context = torch.from_numpy(rng.standard_normal((2 * b, 77, unet.config.cross_attention_dim))).to(device, dtype)
    t = torch.full((2 * b,), 500, dtype=torch.long, device=device)

    def call() -> None:
        with torch.inference_mode():
            eps = unet(torch.cat([latents, latents]), t, context).sample
            uncond, cond = eps.chunk(2)
            uncond + 7.5 * (cond - uncond)
        sync()

    _, first_s = timed(call)
    timing = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(WORKLOAD, setting(p), "torch", timing, unit="step", compile_s=first_s)]
