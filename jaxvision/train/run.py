"""The run scaffold: what every trainer does around its step, composed once.

A trainer's `run` builds its mesh, model, data and compiled step, then hands the run directory
to a `Run` (composition, not a base class):

    run = Run(cfg, frozen_sources={"vae": ...})        # prints the resolved config (process 0)
    state, frozen, restored = run.restore_or_create(step, init_fn, optimizer, rng, mesh, params)
    with run.tracker(start) as tracker:                # metrics.jsonl, TensorBoard, W&B
        ... step, tracker.log_scalars(...), run.checkpointer.save(...) ...
    run.close()
    with run.export_directory("export") as tmp:        # atomic: old export or new, never half
        ... write the model into tmp ...

Every trainer gets the same behaviour from it: the config is converted to plain data once;
`config.yaml` is written (process 0) only after a restore succeeds, so a rejected rerun never
overwrites the record of the run it refused; a checkpoint beyond `train.max_steps` is an error
that says what to do; a new run's state is created only when there is nothing to restore (the
weights are never built twice); messages come from process 0 only; exports are written to a
temporary sibling folder and swapped in with `os.replace`, so a crash or kill midway leaves the
previous export (or, between the two renames, none) and never a mix of two steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

from jaxvision.errors import ConfigError
from jaxvision.train import sharding as sharding_lib
from jaxvision.train.checkpoints import Checkpointer, Restored
from jaxvision.train.config import format_config, save_resolved, to_dict
from jaxvision.train.freeze import partition_params
from jaxvision.train.optimizers import Optimizer
from jaxvision.train.state import TrainState, create_train_state
from jaxvision.train.step import TrainStep
from jaxvision.train.tracking import Tracker

PyTree = Any
CHECKPOINTS_DIRNAME = "checkpoints"


def log(message: str) -> None:
    """Prints `message` to stderr on process 0 only (stdout stays free for a command's result)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary sibling of `path` to write into; on success it becomes `path`.

    The previous `path` is renamed aside, the new folder renamed into place, then the old one
    deleted: a crash while writing leaves the old folder untouched, and a kill between the two
    renames leaves no `path` (the old one survives as `.<name>.old`), never a half-written one.
    Call it on one process only.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class Run:
    """One trainer run's directory (`cfg.output_dir`): config, checkpoints, tracker, export.

    Args:
      cfg: the trainer's resolved config; it must have `output_dir`, `train.max_steps`,
        `checkpoint` (a `CheckpointConfig`) and `log` (a `LogSection`).
      frozen_sources: `{subtree: path}` where the frozen weights come from (recorded in each
        checkpoint instead of the weights themselves).
      log: where messages go (process 0's stderr by default).

    Raises:
      ConfigError: `output_dir` holds a checkpoint beyond `train.max_steps` (checked first, before
        the trainer loads anything).
    """

    def __init__(self, cfg: Any, *, frozen_sources: Mapping[str, str] | None = None, log: Callable[[str], None] = log):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.log = log
        self.config = to_dict(cfg)  # the one conversion: checkpoints, config.yaml, TensorBoard, W&B
        self.log(format_config(cfg, self.config))
        self.checkpointer = Checkpointer(
            self.output_dir / CHECKPOINTS_DIRNAME,
            cfg.checkpoint,
            run_config=self.config,
            frozen_sources=dict(frozen_sources or {}),
        )
        # Before the trainer loads a model or generates data: a rerun that cannot resume fails now.
        latest = self.checkpointer.latest_step()
        if latest is not None:
            self._check_resumable(latest)

    def _check_resumable(self, step: int) -> None:
        max_steps = self.cfg.train.max_steps
        if step > max_steps:
            self.checkpointer.close()
            raise ConfigError(
                f"{self.checkpointer.directory} holds step {step}, beyond train.max_steps={max_steps}; "
                "raise train.max_steps to continue this run, or use a new output_dir"
            )

    def restore_or_create(
        self,
        step: TrainStep,
        init_fn: Callable[[jax.Array], PyTree],
        optimizer: Optimizer,
        rng: jax.Array,
        mesh: jax.sharding.Mesh,
        params: PyTree | None,
    ) -> tuple[TrainState, PyTree, Restored | None]:
        """The latest checkpoint restored onto `step`'s shardings, or a new state from `params`.

        The frozen params are never checkpointed: on a restore they are rebuilt from `params`
        (or from `init_fn` when the run started from a random init). Writes `config.yaml` once
        the restore is accepted.

        Returns:
          `(state, frozen, restored)`; `restored` is None for a new run.
        Raises:
          ConfigError: the restored checkpoint is beyond `train.max_steps`.
        """
        restored = self.checkpointer.restore(step.abstract_state)
        if restored is None:
            state, frozen = create_train_state(init_fn, optimizer, rng, mesh, params=params)
        else:
            self._check_resumable(restored.step)
            state = restored.state
            if params is None:
                _, frozen = create_train_state(init_fn, optimizer, rng, mesh)
            else:
                frozen_host = partition_params(params, optimizer.config.freeze)[1]
                frozen = jax.device_put(frozen_host, sharding_lib.shardings_of(step.abstract_frozen))
            self.log(f"resumed from {self.checkpointer.directory} at step {restored.step}")
        save_resolved(cfg=self.cfg, output_dir=self.output_dir, data=self.config)
        self.checkpointer.install_sigterm_handler()
        return state, frozen, restored

    def tracker(self, start_step: int) -> Tracker:
        """The run's tracker (metrics.jsonl truncated to `start_step`, TensorBoard, W&B)."""
        return Tracker(
            self.output_dir, self.cfg.log, config=self.config, max_steps=self.cfg.train.max_steps, start_step=start_step
        )

    def stop_requested(self, step: int) -> bool:
        """True after the save that answered a SIGTERM; logs where the run stopped."""
        if self.checkpointer.should_stop:
            self.log(f"stopped at step {step} (SIGTERM): saved; rerun the same command to resume")
        return self.checkpointer.should_stop

    def close(self) -> None:
        """Waits for pending checkpoint writes and releases the checkpointer."""
        self.checkpointer.close()

    @contextlib.contextmanager
    def export_directory(self, name: str) -> Iterator[Path | None]:
        """`atomic_directory(output_dir / name)` on process 0; yields None on the others."""
        if jax.process_index() != 0:
            yield None
            return
        with atomic_directory(self.output_dir / name) as tmp:
            yield tmp
