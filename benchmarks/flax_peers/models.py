"""Peer workloads in the Flax-peers venv: HF Flax ViT inference and the diffusers Flax UNet CFG step.

The peers initialise random weights of the *same configs* the jaxvision and torch rows load (the
checkpoint's `config.json`), in JAX, so no torch is needed here; speed does not depend on the
weight values. Inputs are NCHW, as those libraries take them (they transpose to NHWC inside).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.timing import block, cost_flops, row, time_calls, timed

# Mirrors benchmarks.vit / benchmarks.unet (not imported: those modules need jaxvision).
VIT_INFERENCE = "vit_l16_384_inference"
UNET_CFG_STEP = "sd15_unet_cfg_step"
IMPL = "flax-peer"


def _check_device(p: dict) -> None:
    """In `--gpu` mode the peers must run on the GPU too, not silently on the CPU."""
    import jax

    if p.get("gpu") and jax.devices()[0].platform != "gpu":
        raise RuntimeError(
            f"not available: the Flax peers' jax {jax.__version__} sees no GPU; rebuild their venv "
            "with `bash benchmarks/setup_flax_peers.sh --gpu`"
        )


def _versions() -> dict[str, str]:
    import diffusers
    import flax
    import jax
    import transformers

    return {
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "device": str(jax.devices()[0].device_kind),
    }


def vit_inference(p: dict) -> list[dict[str, Any]]:
    """transformers 4.57 `FlaxViTForImageClassification`: jit of `model(pixel_values, params=...)`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    _check_device(p)
    config = transformers.ViTConfig.from_pretrained(p["checkpoint"])
    dtype = jnp.dtype(p["dtype"])
    model = transformers.FlaxViTForImageClassification(config, seed=0, dtype=dtype)
    params = model.params if dtype == jnp.float32 else model.to_bf16(model.params)
    size = config.image_size
    x = jnp.asarray(np.random.default_rng(0).standard_normal((p["batch"], 3, size, size)), dtype)
    forward = jax.jit(lambda params, x: model(x, params=params).logits)
    compiled, compile_s = timed(lambda: forward.lower(params, x).compile())
    t = time_calls(lambda: block(compiled(params, x)), warmup=p["warmup"], iters=p["iters"])
    flops = cost_flops(compiled)
    setting = f"batch {p['batch']}, {p['dtype']}"
    return [
        row(
            VIT_INFERENCE,
            setting,
            IMPL,
            t,
            per_call=p["batch"],
            unit="image",
            compile_s=compile_s,
            xla_gflop=flops / 1e9 if flops else None,
            versions=_versions(),
        )
    ]


def unet_cfg_step(p: dict) -> list[dict[str, Any]]:
    """diffusers 0.39 `FlaxUNet2DConditionModel`: one classifier-free-guidance step (the UNet on the
    unconditional and conditional halves of a batch of 2 × `batch`, then the guidance mix)."""
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np

    _check_device(p)
    config = json.loads((Path(p["checkpoint"]) / "unet" / "config.json").read_text())
    dtype = jnp.dtype(p["dtype"])
    unet = diffusers.FlaxUNet2DConditionModel.from_config(config, dtype=dtype)
    params = jax.jit(unet.init_weights)(jax.random.PRNGKey(0))
    if dtype != jnp.float32:
        params = unet.to_bf16(params)
    b, side = p["batch"], p["latent"]
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((b, config["in_channels"], side, side)), dtype)
    context = jnp.asarray(rng.standard_normal((2 * b, 77, config["cross_attention_dim"])), dtype)
    t = jnp.full((2 * b,), 500, jnp.int32)

    def step(params, latents, t, context):
        x = jnp.concatenate([latents, latents])
        eps = unet.apply({"params": params}, x, t, context).sample
        uncond, cond = jnp.split(eps, 2)
        return uncond + 7.5 * (cond - uncond)

    compiled, compile_s = timed(lambda: jax.jit(step).lower(params, latents, t, context).compile())
    timing = time_calls(lambda: block(compiled(params, latents, t, context)), warmup=p["warmup"], iters=p["iters"])
    flops = cost_flops(compiled)
    return [
        row(
            UNET_CFG_STEP,
            p["setting"],
            IMPL,
            timing,
            per_call=1,
            unit="step",
            compile_s=compile_s,
            xla_gflop=flops / 1e9 if flops else None,
            versions=_versions(),
        )
    ]
