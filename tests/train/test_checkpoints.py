"""Orbax checkpoints: preemption, crashes, bit-identical resume, and restore onto other meshes.

Each run is a real subprocess (`tests/train_helpers.py train`) of the tiny ViT on a 2-device
FSDP mesh, 12 steps, a checkpoint every 4 (max_to_keep=2), async saves. One run goes straight
through; a second chain of processes is interrupted three ways and resumed each time:

  A: SIGTERM after step 5   → saves checkpoint 6 at the next step boundary, exits 0
  B: SIGKILL after step 9   → checkpoint 8 is the latest (steps 8, 9 are lost)
  C: SIGKILL inside save 12 → checkpoint 12 is left uncommitted; 8 stays the latest
  D: resumes from 8, runs to the end.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
import pytest
import train_helpers
from jax.sharding import PartitionSpec as P

from jaxvision.train import checkpoints, sharding
from jaxvision.train import mesh as mesh_lib
from jaxvision.train import state as state_lib

ARGS = {"total_steps": 12, "every": 4, "fsdp": 2}


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    straight_dir, chain_dir = base / "straight", base / "chain"
    straight = train_helpers.run_script("train", {"out": str(straight_dir), **ARGS}, devices=2)
    phases = {}
    for name, extra in (("A", {"sigterm_at": 5}), ("B", {"kill_at": 9}), ("C", {"kill_in_save_at": 12}), ("D", {})):
        proc = train_helpers.run_script("train", {"out": str(chain_dir), **ARGS, **extra}, devices=2)
        rc, output = train_helpers.finish(proc)
        phases[name] = {
            "rc": rc,
            "output": output[-3000:],
            "steps": committed_steps(chain_dir),
            "logged": len(losses(chain_dir)),
            "tmp": sorted(p.name for p in (chain_dir / "checkpoints").iterdir() if not p.name.isdigit()),
        }
    rc, output = train_helpers.finish(straight)
    assert rc == 0, output[-3000:]
    return straight_dir, chain_dir, phases


def test_sigterm_saves_at_the_next_step_boundary(runs):
    a = runs[2]["A"]
    assert a["rc"] == 0, a["output"]
    assert a["steps"] == [4, 6] and a["logged"] == 6


def test_sigkill_mid_run_leaves_the_last_checkpoint(runs):
    b = runs[2]["B"]
    assert b["rc"] == -9, b["output"]
    assert b["steps"] == [6, 8] and b["logged"] == 6 + 4  # steps 6..9 ran; 8 and 9 are redone


def test_sigkill_during_save_leaves_the_previous_checkpoint(runs):
    """The save of step 12 died after writing part of it: Orbax never committed it, so the
    latest complete checkpoint is still 8, and the next run restores it."""
    c = runs[2]["C"]
    assert c["rc"] == -9, c["output"]
    assert c["steps"] == [6, 8] and "12.orbax-checkpoint-tmp" in c["tmp"]
    d = runs[2]["D"]
    assert d["rc"] == 0, d["output"]
    assert d["steps"] == [8, 12]


def test_resumed_run_is_bit_identical_to_the_straight_run(runs):
    """Every loss logged by the interrupted chain (including redone steps) equals the straight
    run's loss for that step exactly, and the final params, Adam moments and EMA are
    bit-identical."""
    straight_dir, chain_dir, _ = runs
    reference = {m["step"]: m["loss"] for m in losses(straight_dir)}
    assert sorted(reference) == list(range(12))
    seen = defaultdict(set)
    for m in losses(chain_dir):
        seen[m["step"]].add(m["loss"])
    assert sorted(seen) == list(range(12))
    for step, values in seen.items():
        assert values == {reference[step]}, (step, values, reference[step])
    got, want = np.load(chain_dir / "final.npz"), np.load(straight_dir / "final.npz")
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_restore_on_one_device_without_frozen_weights(runs):
    """The 2-device FSDP checkpoint restores onto this process's single device; frozen weights
    are not in it, their source is recorded in the config item instead."""
    straight_dir = runs[0]
    mesh = mesh_lib.make_mesh()
    opt = train_helpers.optimizers.make_optimizer(train_helpers.OPTIMIZER)
    abstract_state, _ = state_lib.abstract_train_state(
        train_helpers.init_fn, opt, jax.random.PRNGKey(0), mesh, min_shard_size=0
    )
    ckpt = checkpoints.Checkpointer(straight_dir / "checkpoints")
    restored = ckpt.restore(abstract_state)
    ckpt.close()
    assert restored.step == 12 and restored.data == {"next_index": 12}
    assert restored.config["frozen_sources"] == {"vit/embeddings/patch_embeddings": "init_fn(PRNGKey(0))"}
    assert restored.config["run"] == {"total_steps": 12}
    assert "patch_embeddings" not in restored.state.params["vit"]["embeddings"]
    want = np.load(straight_dir / "final.npz")
    got = train_helpers.flat_numpy((restored.state.params, restored.state.opt_state, restored.state.ema_params))
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    leaf = restored.state.params["vit"]["layer_0"]["intermediate"]["kernel"]
    assert leaf.sharding == sharding.shardings_of(abstract_state).params["vit"]["layer_0"]["intermediate"]["kernel"]


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved on mesh (2,2,2) of 8 devices, restored onto (2,4,1) (in the subprocess: values
    equal, every leaf carries the target sharding) and onto 1 device (here)."""
    train_helpers.run_script_ok("reshard", {"out": str(tmp_path)}, devices=8)
    info = json.loads((tmp_path / "reshard.json").read_text())
    assert info == {"query_spec": str(P("fsdp", "tensor")), "mesh": {"data": 2, "fsdp": 4, "tensor": 1}}
    mesh = mesh_lib.make_mesh()
    opt = train_helpers.optimizers.make_optimizer(train_helpers.OPTIMIZER)
    abstract_state, _ = state_lib.abstract_train_state(
        train_helpers.init_fn, opt, jax.random.PRNGKey(0), mesh, min_shard_size=0
    )
    with checkpoints.Checkpointer(tmp_path / "checkpoints") as ckpt:
        restored = ckpt.restore(abstract_state)
    saved = np.load(tmp_path / "saved.npz")
    got = train_helpers.flat_numpy(restored.state)
    assert sorted(got) == sorted(saved.files)
    for key in saved.files:
        np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
