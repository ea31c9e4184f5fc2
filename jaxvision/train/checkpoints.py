"""Orbax checkpoints of a training run: train state, run config and data-iterator position.

One `ocp.CheckpointManager` with three named items per step:

- "state": the `TrainState` (trainable params, optimizer state, RNG, EMA, loss scale) via
  `StandardSave`/`StandardRestore`. Restoring goes into an abstract state whose leaves carry
  the *target* shardings, so a checkpoint written on one mesh restores onto any other.
- "config": JSON — the run config and where frozen weights come from (they are never saved:
  they are reloaded from their source, e.g. the pretrained model directory).
- "data": JSON — the data iterator's position, so a resumed run sees the same batches.

Saves happen every `every_steps`, at the end, and at the first step boundary after SIGTERM
(preemption). Async saves return once arrays are copied to host memory, so the donated state
can be reused right away; `close()` waits for the last write. Every process calls `save`;
Orbax writes the shards cooperatively and commits atomically (a temporary directory renamed on
success), so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxvision.errors import ConfigError
from jaxvision.train.state import TrainState

ITEMS = ("state", "config", "data")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Attributes:
    every_steps: save when the step count is a multiple of this (0: only at the end / on SIGTERM).
    max_to_keep: keep this many latest checkpoints (None: all).
    async_save: write in a background thread (the step loop only waits for the host copy).
    """

    every_steps: int = 1000
    max_to_keep: int | None = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps={self.every_steps}: must be >= 0")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ConfigError(f"checkpoint.max_to_keep={self.max_to_keep}: must be >= 1 or None")


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns: the step and the three items."""

    step: int
    state: TrainState
    config: dict[str, Any]
    data: dict[str, Any]


class Checkpointer:
    """Saves and restores a run's checkpoints under `directory` (the run's `checkpoints/`).

    Args:
      directory: the CheckpointManager directory (created if missing).
      config: when and how to save.
      run_config: JSON-able dict saved with every checkpoint (the resolved run config).
      frozen_sources: `{subtree: path}` of the frozen weights' origin, recorded in the
        "config" item instead of saving the weights.
    """

    def __init__(
        self,
        directory: str | Path,
        config: CheckpointConfig = CheckpointConfig(),
        *,
        run_config: dict[str, Any] | None = None,
        frozen_sources: dict[str, str] | None = None,
    ):
        self.config = config
        self.directory = Path(directory).absolute()
        self._config_item = {"run": run_config or {}, "frozen_sources": frozen_sources or {}}
        self._preempt = threading.Event()
        self._previous_handler: Any = None
        self._last_saved: int | None = None
        # Set by the save that answered a preemption: the loop should exit after it.
        self.should_stop = False
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.max_to_keep,
                enable_async_checkpointing=config.async_save,
                create=True,
            ),
            item_names=ITEMS,
        )

    # -- preemption ---------------------------------------------------------------------------
    def install_sigterm_handler(self) -> None:
        """On SIGTERM, request a save at the next step boundary (see `preemption_requested`)."""
        self._previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: self._preempt.set())

    def uninstall_sigterm_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def preemption_requested(self) -> bool:
        """Whether any process got SIGTERM (agreed across processes, so all save the same step)."""
        local = self._preempt.is_set()
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))

    # -- save / restore -----------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data: dict[str, Any] | None = None, *, force: bool = False) -> bool:
        """Saves if `step` is due (a multiple of `every_steps`), forced, or preemption was requested.

        Call it after each step with the *new* state and the data position that goes with it
        (every process, with the same `step`). Returns True if a save was started. After a
        preemption save it has also waited for the write to finish and set `should_stop`, so
        the loop can exit; in multi-process runs the SIGTERM flag is agreed by a tiny
        all-gather on every call.
        """
        preempted = self.preemption_requested()
        due = self.config.every_steps > 0 and step % self.config.every_steps == 0
        if not (due or force or preempted) or step == self._last_saved:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(self._config_item),
            data=ocp.args.JsonSave(data or {}),
        )
        self.manager.save(step, args=args, force=True)
        self._last_saved = step
        if preempted:
            self.manager.wait_until_finished()
            self.should_stop = True
        return True

    def restore(self, abstract_state: TrainState, step: int | None = None) -> Restored | None:
        """Restores `step` (default: the latest complete one) onto `abstract_state`'s shardings.

        Args:
          abstract_state: `jax.ShapeDtypeStruct` leaves with `.sharding` (from
            `abstract_train_state` on the *current* mesh).
        Returns:
          The restored step, state, config item and data item; None if there is no checkpoint.
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
                data=ocp.args.JsonRestore(),
            ),
        )
        return Restored(step=step, state=out.state, config=out.config, data=out.data)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases the manager (call before the process exits)."""
        self.manager.wait_until_finished()
        self.manager.close()
        self.uninstall_sigterm_handler()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
