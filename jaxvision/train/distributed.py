"""Multi-process start-up: join the processes of a multi-host run into one JAX runtime.

After `jax.distributed.initialize`, `jax.devices()` lists every process's devices, the mesh
spans them all, each process feeds its own slice of the global batch
(`sharding.shard_batch`), and Orbax writes checkpoints cooperatively. The same code runs on
one process, on GPU clusters (NCCL), on TPU pods and on CPU (gloo collectives) in tests.
"""

from __future__ import annotations

import os

import jax

from jaxvision.errors import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> bool:
    """Calls `jax.distributed.initialize` when this is a multi-process run; a no-op otherwise.

    Arguments win over the environment variables `JAX_COORDINATOR_ADDRESS` (`host:port` of
    process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. With neither, the run is single-process
    and nothing happens (on TPU pods and SLURM, set the variables or call
    `jax.distributed.initialize()` yourself to use cluster auto-detection). Must run before
    anything touches `jax.devices()`. CPU collectives use gloo, so CPU multi-process runs work.

    Returns:
      True if the distributed runtime is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator_address is None and num_processes in (None, 1):
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ConfigError(
            "multi-process run is half configured: need coordinator_address, num_processes and process_id "
            f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
            f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
        )
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    # Only the CPU client reads this; GPUs use NCCL and TPUs their own runtime.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )
    return True
