"""Tracker: metrics.jsonl, TensorBoard event files read back record by record, resume truncation, process 0 only."""

import io
import json
import struct
import sys
import time
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from jaxvision.errors import ConfigError
from jaxvision.train.config import LogSection
from jaxvision.train.tracking import Tracker, read_metrics


@dataclass(frozen=True)
class _Cfg:
    output_dir: str = "/runs/x"
    max_steps: int = 10


def _read_events(logdir):
    """Every Event in the TFRecord files under `logdir`, checking both CRCs of each record."""
    events = []
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            assert header_crc == masked_crc32c(header)
            payload = data[offset + 12 : offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert payload_crc == masked_crc32c(payload)
            events.append(event_pb2.Event.FromString(payload))
            offset += 16 + length
    return events


def _scalars(events):
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def _strict_json(line):
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def test_metrics_jsonl_has_int_steps_and_float_values(tmp_path):
    with Tracker(tmp_path, LogSection(tensorboard=False), progress=False, process_index=0) as tracker:
        tracker.log_scalars(1, {"loss": np.float32(0.5), "lr": jnp.asarray(1e-3), "tokens": 7})
        # flushed per line: readable before close
        assert _strict_json(tracker.metrics_path.read_text().splitlines()[0])["step"] == 1
        tracker.log_scalars(np.int64(2), {"loss": float("nan"), "grad_norm": jnp.asarray([2.5])})
        with pytest.raises(ValueError, match="'step' is reserved"):
            tracker.log_scalars(3, {"step": 1.0})
        with pytest.raises(ValueError, match="'bad' must be a scalar"):
            tracker.log_scalars(3, {"bad": np.zeros(2)})
    lines = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "loss": 0.5, "lr": pytest.approx(1e-3), "tokens": 7.0},
        {"step": 2, "loss": None, "grad_norm": 2.5},
    ]
    assert type(lines[0]["step"]) is int and all(type(v) is float for k, v in lines[0].items() if k != "step")
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_event_files_read_back(tmp_path):
    image_u8 = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
    image_f = np.linspace(0.0, 1.0, 4 * 5, dtype=np.float32).reshape(4, 5, 1)
    with Tracker(tmp_path, LogSection(), config=_Cfg(), progress=False, process_index=0) as tracker:
        tracker.log_scalars(10, {"loss": 0.25, "train/grad_norm": 3.0})
        tracker.log_scalars(20, {"loss": 0.125})
        tracker.log_images(20, {"sample_u8": image_u8, "sample_f": image_f})
        with pytest.raises(ValueError, match=r"\[height, width, channels\]"):
            tracker.log_images(20, {"bad": np.zeros((2, 3))})
    events = _read_events(tmp_path / "tensorboard")
    assert _scalars(events) == {("loss", 10): 0.25, ("train/grad_norm", 10): 3.0, ("loss", 20): 0.125}

    images = {v.tag: v.image for e in events for v in e.summary.value if v.HasField("image")}
    assert (images["sample_u8"].height, images["sample_u8"].width) == (4, 5)
    decoded = np.asarray(Image.open(io.BytesIO(images["sample_u8"].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image_u8)
    gray = np.asarray(Image.open(io.BytesIO(images["sample_f"].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(gray[..., 0], np.round(image_f[..., 0] * 255).astype(np.uint8))

    texts = [v for e in events for v in e.summary.value if v.tag.startswith("config")]
    assert texts and b"max_steps: 10" in texts[0].tensor.string_val[0]


def test_resume_truncates_metrics_and_purges_tensorboard(tmp_path):
    with Tracker(tmp_path, LogSection(), progress=False, process_index=0) as tracker:
        for step in range(1, 6):
            tracker.log_scalars(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a crash
    # resumed from the step-3 checkpoint: steps 4, 5 and the broken line go
    with Tracker(tmp_path, LogSection(), start_step=3, progress=False, process_index=0) as tracker:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        tracker.log_scalars(4, {"loss": 40.0})
        tracker.truncate_after(2)  # the open file is reopened after the rewrite
        tracker.log_scalars(3, {"loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    # TensorBoard hides events at steps >= purge_step of the earlier run
    starts = [e.step for e in _read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert 4 in starts


def test_other_processes_write_nothing(tmp_path):
    out = tmp_path / "run"
    with Tracker(out, LogSection(wandb=True), config=_Cfg(), max_steps=10, process_index=1) as tracker:
        assert not tracker.active
        tracker.log_scalars(1, {"loss": 1.0})
        tracker.log_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
        tracker.update_progress(1)
        tracker.truncate_after(0)
        tracker.flush()
    assert not out.exists()


def test_wandb_without_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install wandb.*log\.wandb=false"):
        Tracker(tmp_path / "run", LogSection(wandb=True), progress=False, process_index=0)
    assert not (tmp_path / "run").exists()


def test_progress_bar_shows_rate_and_position(tmp_path, capsys):
    with Tracker(tmp_path, LogSection(tensorboard=False), max_steps=10, start_step=2, process_index=0) as tracker:
        tracker.update_progress(5)
        tracker.log_scalars(5, {"loss": 0.5})
    err = capsys.readouterr().err
    assert "5/10" in err and "step/s" in err


def test_wandb_offline_run_records_scalars_images_and_resumes_the_same_run(tmp_path, monkeypatch):
    """With `log.wandb=true` (offline: nothing leaves the machine) the run's scalars, images and
    config reach W&B's own files under output_dir/wandb, and a resumed run reuses the run id."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    log = LogSection(tensorboard=False, wandb=True, wandb_mode="offline")
    with Tracker(tmp_path, log, config=_Cfg(), progress=False, process_index=0) as tracker:
        tracker.log_scalars(1, {"loss": 0.75})
        tracker.log_scalars(2, {"loss": 0.5})
        tracker.log_images(2, {"sample": np.zeros((4, 5, 3), np.uint8)})
        first_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and first_id in runs[0].name
    # The history records are protobufs holding each value as a JSON string in W&B's run file.
    # W&B's core process writes the run file shortly after `finish()` returns: wait up to 20 s.
    run_file, deadline = runs[0] / f"run-{first_id}.wandb", time.monotonic() + 20
    while b"max_steps" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    record = run_file.read_bytes()
    assert b"loss" in record and b"0.75" in record and b"max_steps" in record
    assert list((runs[0] / "files" / "media" / "images").glob("sample_2_*.png"))
    with Tracker(tmp_path, log, start_step=2, progress=False, process_index=0) as tracker:
        tracker.log_scalars(3, {"loss": 0.25})
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == first_id
