"""SD VAE decode: latents `[batch, side, side, 4]` → images `[batch, 8 side, 8 side, 3]`.

`p`: `checkpoint` (a diffusers SD folder), `latent`, `batch`, `dtype`, `gpu`, `warmup`, `iters`.
The decoder's mid-block attention runs over all `side²` positions (4096 at 512 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.timing import block, lower_and_compile, program_flops, row, time_calls, timed, torch_device

WORKLOAD = "sd_vae_decode"


def setting(p: dict) -> str:
    return f"{p['latent']}x{p['latent']} latents, batch {p['batch']}, {p['dtype']}"


def decode_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision's `AutoencoderKL.decode` under `jax.jit` (its attention stays in fp32 inside)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxvision

    dtype = jnp.dtype(p["dtype"])
    vae, params = jaxvision.from_pretrained(Path(p["checkpoint"]) / "vae", dtype=dtype, param_dtype=dtype)
    side = p["latent"]
    z = jnp.asarray(np.random.default_rng(0).standard_normal((p["batch"], side, side, 4)), dtype)
    decode = jax.jit(lambda params, z: vae.apply({"params": params}, z, method="decode"))
    lowered, compiled, compile_s = lower_and_compile(lambda: decode.lower(params, z))
    timing = time_calls(lambda: block(compiled(params, z)), warmup=p["warmup"], iters=p["iters"])
    # Counted with XLA's attention: a blocked attention is a loop, whose body XLA counts once.
    counted = vae.clone(attention_impl="xla")
    counted_decode = jax.jit(lambda params, z: counted.apply({"params": params}, z, method="decode"))
    flops = program_flops(counted_decode.lower(params, z), compiled)
    return [
        row(
            WORKLOAD,
            setting(p),
            "jaxvision",
            timing,
            per_call=p["batch"],
            unit="image",
            compile_s=compile_s,
            gflop=flops / 1e9 if flops else None,
            gflop_source="XLA cost analysis",
        )
    ]


def decode_torch(p: dict) -> list[dict[str, Any]]:
    """diffusers' `AutoencoderKL.decode` (PyTorch)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    device, sync = torch_device(p["gpu"])
    dtype = getattr(torch, p["dtype"])
    vae = AutoencoderKL.from_pretrained(Path(p["checkpoint"]) / "vae").eval().to(device, dtype)
    side = p["latent"]
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((p["batch"], 4, side, side))).to(device, dtype)

    def call() -> None:
        with torch.inference_mode():
            vae.decode(z)
        sync()

    _, first_s = timed(call)
    timing = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(WORKLOAD, setting(p), "torch", timing, per_call=p["batch"], unit="image", compile_s=first_s)]
