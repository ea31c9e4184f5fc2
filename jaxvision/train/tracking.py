"""Experiment tracking for trainers: `metrics.jsonl`, TensorBoard, optional Weights & Biases, a progress bar.

One `Tracker` per run, writing under the run directory::

    output_dir/metrics.jsonl    {"step": int, "loss": float, ...} per logged step, flushed per line
    output_dir/tensorboard/     tensorboardX event files (scalars, images, the config as text)
    output_dir/wandb/           Weights & Biases files when `log.wandb=true` (offline by default)

Only process 0 (`jax.process_index() == 0`) writes anything; on every other process the tracker
is a no-op, so trainers call it unconditionally. On resume the tracker is built with the restored
step and first drops what was logged after it (lines of `metrics.jsonl`; TensorBoard events via
`purge_step`), so both stay one consistent curve.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxvision.errors import ConfigError
from jaxvision.train.config import LogSection, to_dict, to_yaml

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
_WANDB_ID_FILENAME = "wandb_run_id.txt"


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of `output_dir/metrics.jsonl` in file order; an incomplete last line is skipped."""
    return _read_records(Path(output_dir) / METRICS_FILENAME)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash mid-write
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _to_float(key: str, value: Any) -> float:
    """A Python float from a scalar (Python number, NumPy or fully-addressable JAX array)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"log_scalars: {key!r} must be a scalar, got an array of shape {array.shape}")
    return float(array.reshape(()))


def _image_uint8(tag: str, image: Any) -> np.ndarray:
    """`[H, W, C]` uint8 from uint8, or from floats in [0, 1] (clipped), with C in 1, 3, 4."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"log_images: {tag!r} must be [height, width, channels] with 1, 3 or 4 channels, got {array.shape}"
        )
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"log_images: {tag!r} must be uint8 or float in [0, 1], got dtype {array.dtype}")
    return np.round(np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)


class Tracker:
    """Logs a run's metrics, images and config; a no-op except on process 0.

    Typical use in a trainer::

        with Tracker(cfg.output_dir, cfg.log, config=cfg, max_steps=cfg.train.max_steps,
                     start_step=restored_step) as tracker:
            for step in range(restored_step + 1, cfg.train.max_steps + 1):
                ...
                tracker.update_progress(step)
                if step % cfg.log.every_steps == 0:
                    tracker.log_scalars(step, {"loss": loss, "grad_norm": grad_norm})

    Args:
      output_dir: the run directory.
      log: the `log` section (TensorBoard / W&B switches); None uses `LogSection()` defaults.
      config: the resolved run config (a dataclass); written to TensorBoard as text and to W&B as its config.
      max_steps: total steps, for the progress bar's ETA; None shows no total.
      start_step: the step the run starts from (0, or the restored checkpoint's step). Metrics
        logged earlier for later steps are dropped (see `truncate_after`).
      progress: show a tqdm progress bar (steps/s, ETA) on stderr.
      process_index: this process's index; None asks `jax.process_index()`.

    Raises:
      ConfigError: `log.wandb` is true but `wandb` is not installed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        log: LogSection | None = None,
        *,
        config: Any = None,
        max_steps: int | None = None,
        start_step: int = 0,
        progress: bool = True,
        process_index: int | None = None,
    ):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        log = log if log is not None else LogSection()
        self.output_dir = Path(output_dir)
        self.active = process_index == 0
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._bar = None
        if not self.active:
            return

        if log.wandb:
            # Checked before any file is written, so a missing package fails the run cleanly.
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "log.wandb=true needs Weights & Biases: `pip install wandb`, or set log.wandb=false"
                ) from None

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.truncate_after(start_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

        if log.tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step makes TensorBoard hide events a crashed run logged after the restored step.
            self._tb = SummaryWriter(
                logdir=str(self.output_dir / TENSORBOARD_DIRNAME), purge_step=start_step + 1, flush_secs=10
            )
        if log.wandb:
            self._wandb_run = wandb.init(
                project=log.wandb_project,
                mode=log.wandb_mode,
                dir=str(self.output_dir),
                id=self._wandb_run_id(),
                resume="allow",
                config=_config_dict(config),
            )
        if config is not None:
            self.log_config(config, step=start_step)

        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress, leave=True
        )

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILENAME

    def _wandb_run_id(self) -> str:
        """A W&B run id kept in the run directory, so a resumed run continues the same W&B run."""
        path = self.output_dir / _WANDB_ID_FILENAME
        if path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        path.write_text(run_id + "\n")
        return run_id

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends `{"step": step, **scalars}` to `metrics.jsonl` and logs the scalars to TensorBoard / W&B.

        Args:
          step: the optimizer step the values belong to.
          scalars: name -> scalar (Python number, NumPy or replicated JAX scalar); written as floats.
            A NaN or infinite value is written as JSON `null` (the file stays strict JSON) and as
            the float itself to TensorBoard.
        """
        if not self.active:
            return
        step = int(step)
        values = {}
        for key, value in scalars.items():
            if key == "step":
                raise ValueError("log_scalars: 'step' is reserved for the step number; rename the metric")
            values[str(key)] = _to_float(key, value)
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        # Flushed per line: a crash loses nothing that was already logged.
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def log_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Logs images to TensorBoard / W&B.

        Args:
          step: the step the images belong to.
          images: tag -> `[height, width, channels]` array, uint8, or float in [0, 1]; channels 1, 3 or 4.
        """
        if not self.active:
            return
        step = int(step)
        converted = {str(tag): _image_uint8(tag, image) for tag, image in images.items()}
        if self._tb is not None:
            for tag, image in converted.items():
                self._tb.add_image(tag, image, step, dataformats="HWC")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({tag: wandb.Image(image) for tag, image in converted.items()}, step=step)

    def log_config(self, config: Any, step: int = 0) -> None:
        """Writes the resolved config to TensorBoard's text tab (as an indented YAML block)."""
        if not self.active or self._tb is None:
            return
        text = to_yaml(config) if not isinstance(config, str) else config
        # Four-space indentation makes TensorBoard's markdown renderer show it verbatim.
        self._tb.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), int(step))

    def update_progress(self, step: int) -> None:
        """Moves the progress bar to `step` (steps/s and ETA are computed by tqdm)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(int(step) - self._bar.n)

    def truncate_after(self, step: int) -> None:
        """Drops the `metrics.jsonl` lines with a step greater than `step` (and any half-written line).

        Called with the restored step when a run resumes, so the file is one consistent curve.
        The file is rewritten under a temporary name and renamed, so a crash here loses nothing.
        """
        if not self.active:
            return
        path = self.metrics_path
        if not path.exists():
            return
        kept = [r for r in _read_records(path) if r["step"] <= step]
        reopen = self._file is not None
        if reopen:
            self._file.close()
        tmp = path.with_name(f".{METRICS_FILENAME}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        if reopen:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (metrics.jsonl is flushed on every write)."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes every sink; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _config_dict(config: Any) -> dict | None:
    """The config as nested plain dicts for W&B, or None."""
    if config is None or isinstance(config, str):
        return None
    return to_dict(config)
