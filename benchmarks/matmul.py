"""The machine's measured matmul ceiling: GFLOP/s of one square `n × n` matmul, JAX and torch.

Each implementation's achieved GFLOP/s in the results table is divided by its own library's
ceiling measured here, in the same run, on the same machine, so "fraction of roofline" (MFU on a
GPU, against the card's *measured* bf16 matmul rate) is visible beside every time.
`p`: `n`, `dtype`, `gpu`, `warmup`, `iters`.
"""

from __future__ import annotations

from typing import Any

from benchmarks.timing import block, row, time_calls, timed, torch_device

WORKLOAD = "matmul_ceiling"


def setting(p: dict) -> str:
    return f"{p['n']}x{p['n']} @ {p['n']}x{p['n']}, {p['dtype']}"


def matmul_jax(p: dict) -> list[dict[str, Any]]:
    """`jax.jit(a @ b)`, AOT-compiled."""
    import jax
    import jax.numpy as jnp

    if p.get("gpu") and jax.devices()[0].platform != "gpu":
        raise RuntimeError(f"not available: jax {jax.__version__} here sees no GPU")
    n, dtype = p["n"], jnp.dtype(p["dtype"])
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
    compiled, compile_s = timed(lambda: jax.jit(jnp.matmul).lower(a, b).compile())
    timing = time_calls(lambda: block(compiled(a, b)), warmup=p["warmup"], iters=p["iters"])
    gflop = 2 * n**3 / 1e9
    impl = p.get("impl", "jaxvision")  # the Flax peers' venv measures its own (older) jax too
    return [row(WORKLOAD, setting(p), impl, timing, compile_s=compile_s, gflop=gflop, library=f"jax {jax.__version__}")]


def matmul_torch(p: dict) -> list[dict[str, Any]]:
    """`torch.matmul`."""
    import torch

    device, sync = torch_device(p["gpu"])
    n, dtype = p["n"], getattr(torch, p["dtype"])
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)

    def call() -> None:
        torch.matmul(a, b)
        sync()

    timing = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(WORKLOAD, setting(p), "torch", timing, gflop=2 * n**3 / 1e9, library=f"torch {torch.__version__}")]
