"""Shared timing helpers of the benchmark suite: warm-up, median of several runs, compile time apart.

Every workload module times its calls through `time_calls` and returns rows built by `row`, so
every number in `benchmarks/results/*.json` means the same thing: `median_s` is the median
wall-clock seconds of one *call* (a forward, a train step, a sampling run) after `warmup`
untimed calls, with the device synchronised inside the timed region (`block_until_ready`,
`torch.cuda.synchronize`). Compile time (JAX: `lower().compile()`; torch: its first call) is
measured and reported on its own, never mixed into the median.

This module imports only the standard library (and jax / torch lazily, inside functions), so the
Flax peers' separate virtual environment runs it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Where the suite keeps random-weight checkpoints between runs (gitignored with the rest of build/).
CACHE_DIR = Path(__file__).resolve().parents[1] / "build" / "bench-cache"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the timed calls: their median, minimum and every value."""

    median_s: float
    min_s: float
    runs: tuple[float, ...]


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 3) -> Timing:
    """Runs `fn` `warmup` times untimed, then `iters` times timed.

    Args:
      fn: a call that returns only once its work is done on the device (the caller blocks).
      warmup: untimed calls first (caches, allocator, autotuning).
      iters: timed calls; the median is reported.
    Returns:
      The `Timing` of the timed calls.
    """
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(statistics.median(runs), min(runs), tuple(runs))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`(fn(), seconds)`: one call, e.g. a compilation or a first (warm-up) call."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def lower_and_compile(lower: Callable[[], Any]) -> tuple[Any, Any, float]:
    """`(lowered, compiled, seconds)`: `lower()` (a `jax.jit(...).lower(...)` call) and its compilation,
    timed together, so the reported compile time includes tracing; the lowered program is kept for
    `program_flops`."""
    t0 = time.perf_counter()
    lowered = lower()
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - t0


def block(tree: Any) -> Any:
    """Waits for every JAX array in `tree` (`jax.block_until_ready`)."""
    import jax

    return jax.block_until_ready(tree)


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of one call of an AOT-compiled (or lowered) JAX program, from XLA's cost analysis (None if absent).

    XLA counts 2 FLOPs per multiply-add of dots and convolutions and one per elementwise op, so
    the figure is slightly above the matmul-only counts usually quoted (ViT-L/16-384: ~382 GFLOP).
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it; the row says "n/a")
        return None
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def program_flops(lowered: Any, compiled: Any) -> float | None:
    """FLOPs of one call, counted on the *lowered* program where XLA can (else the compiled one).

    The lowered (pre-optimisation) program still has every dot and convolution as an HLO op on
    every backend; a compiled GPU program has turned them into cuBLAS / cuDNN custom calls that
    XLA's cost analysis does not count (an H100 run credited the SD 1.5 UNet with 8x too few FLOPs).
    """
    return cost_flops(lowered) or cost_flops(compiled)


def lowered_gflop(fn: Callable[..., Any], *args: Any) -> float | None:
    """GFLOP of `fn(*args)` from XLA's cost analysis of the *lowered* program (no compilation);
    `args` may be `jax.ShapeDtypeStruct`s."""
    import jax

    flops = cost_flops(jax.jit(fn).lower(*args))
    return flops / 1e9 if flops else None


def memory_bytes(compiled: Any) -> dict[str, int] | None:
    """`compiled.memory_analysis()` as a dict of bytes (arguments, outputs, temporaries, aliases)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {n.removesuffix("_size_in_bytes"): int(getattr(m, n, 0)) for n in names}


def row(
    workload: str,
    setting: str,
    impl: str,
    timing: Timing | None = None,
    *,
    per_call: int = 1,
    unit: str = "call",
    compile_s: float | None = None,
    gflop: float | None = None,
    status: str = "ok",
    **extra: Any,
) -> dict[str, Any]:
    """One result row, the unit of `results/<machine>.json`.

    Args:
      workload: e.g. "vit_l16_384_inference"; rows of one workload and setting are compared.
      setting: e.g. "batch 8, fp32".
      impl: "jaxvision", "torch" or "flax-peer".
      timing: the timed calls, or None when the row only says why nothing was measured.
      per_call: units (images, steps) done by one call; `median_s / per_call` is reported too.
      unit: what `per_call` counts ("image", "step").
      compile_s: compile time (JAX) or first-call time (torch), apart from the median.
      gflop: GFLOP of one call; achieved GFLOP/s is `gflop / median_s`.
      status: "ok", or "not available: <reason>" / "failed: <reason>".
      extra: anything else worth keeping (memory, versions, FLOP source).
    """
    out: dict[str, Any] = {"workload": workload, "setting": setting, "impl": impl, "status": status}
    if timing is not None:
        out.update(
            median_s=timing.median_s,
            min_s=timing.min_s,
            runs=list(timing.runs),
            per_call=per_call,
            unit=unit,
            s_per_unit=timing.median_s / per_call,
        )
        if gflop:
            out["gflops"] = gflop / timing.median_s
    out["compile_s"] = compile_s
    out["gflop"] = gflop
    out.update(extra)
    return out


def unavailable(workload: str, setting: str, impl: str, reason: str) -> dict[str, Any]:
    """A row that records why an implementation was not measured (never a made-up number)."""
    return row(workload, setting, impl, status=f"not available: {reason}")


def machine_name() -> str:
    """A file-name-safe machine label: the host's CPU (or the GPU, when JAX sees one)."""
    name = os.environ.get("JAXVISION_BENCH_MACHINE")
    if name:
        return name
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    label = f"{cpu}-{os.cpu_count()}cores"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-").replace("--", "-")


def write_rows(rows: list[dict[str, Any]], out: str | None) -> None:
    """Writes a worker's rows as JSON to `out` (the orchestrator's temp file), or prints them."""
    text = json.dumps(rows, indent=2, default=str)
    if out:
        Path(out).write_text(text)
    else:
        print(text)


def log(message: str) -> None:
    """Progress to stderr (the orchestrator shows it; stdout stays free)."""
    print(message, file=sys.stderr, flush=True)


def torch_device(gpu: bool) -> tuple[Any, Callable[[], None]]:
    """`(device, sync)` for the torch references: CUDA in `--gpu` mode, else the CPU with every core.

    Raises:
      RuntimeError: `gpu` is set but this torch has no CUDA device (the row says so).
    """
    import torch

    if gpu:
        if not torch.cuda.is_available():
            raise RuntimeError(f"not available: torch {torch.__version__} sees no CUDA device (install a CUDA build)")
        return torch.device("cuda"), torch.cuda.synchronize
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu"), lambda: None
