"""The SD 1.5 UNet's two hot kernels at 64×64 latents, alone: where a UNet step's time goes.

- attention: the highest-resolution self-attention, 4096 tokens × 8 heads × 40, CFG batch 2.
  jaxvision's row is `layers.attention` with the implementation the UNet uses (`attention_impl`;
  absent or None: what `kernels.resolve` picks for the device, "cpu" on a CPU); `variant="einsum"`
  is the plain einsum/softmax (`layers.reference_attention`), which is also how diffusers' Flax
  UNet attends (the Flax peer's row). torch: `scaled_dot_product_attention`.
- conv: a 3×3, 320 → 320 channel convolution over `[2, 64, 64, 320]`.

`p`: `dtype`, `gpu`, `attention_impl`, `variant` ("seam" / "einsum"), `impl` (row label), `warmup`, `iters`.
"""

from __future__ import annotations

from typing import Any

from benchmarks.timing import block, lower_and_compile, program_flops, row, time_calls, torch_device

ATTENTION = "kernel_sd15_self_attention"
CONV = "kernel_sd15_conv3x3"
B, L, H, D = 2, 4096, 8, 40  # CFG batch, 64×64 tokens, SD 1.5's first-level heads × head_dim
CONV_SHAPE, CHANNELS = (2, 64, 64, 320), 320
ATTENTION_GFLOP = 4 * B * H * L * L * D / 1e9  # q·kᵀ and weights·v, 2 FLOPs per multiply-add


def _check_device(p: dict) -> None:
    import jax

    if p.get("gpu") and jax.devices()[0].platform != "gpu":
        raise RuntimeError(f"not available: jax {jax.__version__} here sees no GPU")


def attention_setting(p: dict) -> str:
    return f"{L} tokens, {H} heads x {D}, batch {B}, {p['dtype']}"


def conv_setting(p: dict) -> str:
    return f"3x3, {CHANNELS}->{CHANNELS} ch, {CONV_SHAPE[1]}x{CONV_SHAPE[2]}, batch {CONV_SHAPE[0]}, {p['dtype']}"


def attention_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision's attention seam (`variant="seam"`), or plain einsum attention (`"einsum"`; runs in
    the Flax peers' venv too, where it is what diffusers' Flax attention does)."""
    import jax
    import jax.numpy as jnp

    _check_device(p)
    dtype = jnp.dtype(p["dtype"])
    q, k, v = (jax.random.normal(key, (B, L, H, D), dtype) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    if p.get("variant", "seam") == "seam":
        from jaxvision.models import kernels, layers

        impl = kernels.resolve(
            kernels.platform_of(), attention=p.get("attention_impl") or "auto", dtype=dtype
        ).attention

        def fn(q, k, v):
            return layers.attention(q, k, v, implementation=impl)
    else:

        def fn(q, k, v):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * D**-0.5
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)

    lowered, compiled, compile_s = lower_and_compile(lambda: jax.jit(fn).lower(q, k, v))
    t = time_calls(lambda: block(compiled(q, k, v)), warmup=p["warmup"], iters=p["iters"])
    flops = program_flops(lowered, compiled)
    workload = ATTENTION if p.get("variant", "seam") == "seam" else ATTENTION + "_einsum"
    return [
        row(
            workload,
            attention_setting(p),
            p.get("impl", "jaxvision"),
            t,
            compile_s=compile_s,
            gflop=ATTENTION_GFLOP,
            xla_gflop=flops / 1e9 if flops else None,
            library=f"jax {jax.__version__}",
        )
    ]


def attention_torch(p: dict) -> list[dict[str, Any]]:
    """`torch.nn.functional.scaled_dot_product_attention` (what diffusers' UNet calls)."""
    import torch

    device, sync = torch_device(p["gpu"])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, getattr(torch, p["dtype"])) for _ in range(3))

    def call() -> None:
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        sync()

    t = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [
        row(ATTENTION, attention_setting(p), "torch", t, gflop=ATTENTION_GFLOP, library=f"torch {torch.__version__}")
    ]


def conv_jax(p: dict) -> list[dict[str, Any]]:
    """`lax.conv_general_dilated` in NHWC / HWIO, what Flax's `nn.Conv` lowers to (any jax version)."""
    import jax
    import jax.numpy as jnp

    _check_device(p)
    dtype = jnp.dtype(p["dtype"])
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, CONV_SHAPE, dtype)
    w = jax.random.normal(kw, (3, 3, CHANNELS, CHANNELS), dtype) * 0.05

    def fn(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    lowered, compiled, compile_s = lower_and_compile(lambda: jax.jit(fn).lower(x, w))
    t = time_calls(lambda: block(compiled(x, w)), warmup=p["warmup"], iters=p["iters"])
    flops = program_flops(lowered, compiled)
    return [
        row(
            CONV,
            conv_setting(p),
            p.get("impl", "jaxvision"),
            t,
            compile_s=compile_s,
            gflop=flops / 1e9 if flops else None,
            library=f"jax {jax.__version__}",
        )
    ]


def conv_torch(p: dict) -> list[dict[str, Any]]:
    """`torch.nn.functional.conv2d` in NCHW."""
    import torch

    device, sync = torch_device(p["gpu"])
    dtype = getattr(torch, p["dtype"])
    n, h, w_, c = CONV_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w_, generator=g).to(device, dtype)
    w = (torch.randn(CHANNELS, c, 3, 3, generator=g) * 0.05).to(device, dtype)

    def call() -> None:
        with torch.inference_mode():
            torch.nn.functional.conv2d(x, w, padding=1)
        sync()

    t = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(CONV, conv_setting(p), "torch", t, library=f"torch {torch.__version__}")]
