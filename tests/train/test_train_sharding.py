"""Mesh, logical-axis rules and sharded training on 8 fake CPU devices.

The multi-device part runs `tests/train_helpers.py sharding` in a subprocess with
`--xla_force_host_platform_device_count=8` (this process has one CPU device and JAX cannot
change that after start-up).
"""

from __future__ import annotations

import json

import chex
import flax.linen
import jax
import numpy as np
import pytest
import train_helpers
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxvision.errors import ConfigError
from jaxvision.models import layers
from jaxvision.train import mesh as mesh_lib
from jaxvision.train import sharding

MESHES = ("8,1,1", "2,4,1", "2,2,2", "1,8,1")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    train_helpers.run_script_ok("sharding", {"out": str(out)}, devices=8)
    return out, json.loads((out / "results.json").read_text())


def test_meshes_match_single_device(sharded_run):
    """3 steps of the tiny ViT (AdamW, clipping, decay, EMA, a frozen subtree) under every mesh
    give the single-device losses (rtol 1e-6) and params, Adam moments and EMA (atol 1e-6; max
    measured 6e-8): sharding changes where numbers live, not what they are."""
    out, results = sharded_run
    reference = np.load(out / "params_1.npz")
    ref_losses = results["losses"]["1"]
    assert ref_losses[-1] != ref_losses[0]  # the model did train
    for name in MESHES:
        np.testing.assert_allclose(results["losses"][name], ref_losses, rtol=1e-6, err_msg=name)
        got = np.load(out / f"params_{name}.npz")
        assert sorted(got.files) == sorted(reference.files)
        for key in reference.files:
            np.testing.assert_allclose(got[key], reference[key], atol=1e-6, rtol=0, err_msg=f"{name} {key}")
    assert results["trace_count"] == 1


def test_concrete_partition_specs(sharded_run):
    """The rules give Megatron + FSDP layouts; the 3-way classifier falls back to replication
    on `tensor` (3 % 2 != 0); Adam moments follow their param; frozen params are sharded too."""
    specs = sharded_run[1]["specs"]["2,2,2"]
    assert specs["query"] == str(P("fsdp", "tensor"))
    assert specs["attention_output"] == str(P("tensor", "fsdp"))
    assert specs["intermediate"] == str(P("fsdp", "tensor"))
    assert specs["layernorm_scale"] == str(P())
    assert specs["classifier"] == str(P("fsdp"))
    assert specs["query_adam_mu"] == str(P("fsdp", "tensor"))
    assert specs["frozen_patch_kernel"] == str(P(None, None, None, "fsdp"))
    assert sharded_run[1]["specs"]["8,1,1"]["classifier"] == str(P("fsdp", "tensor"))  # sizes 1 divide


def test_fsdp_plan_shrinks_params_per_device(sharded_run):
    """`plan_train_step`: per-device param and optimizer bytes drop to ~1/N with FSDP over N
    devices (within 5 points: 1-D biases and norm scales stay replicated) and stay put with
    pure data parallelism."""
    plans = sharded_run[1]["plan"]
    one = plans["1"]["per_device_bytes"]
    assert plans["1"]["devices"] == 1 and plans["1,8,1"]["devices"] == 8
    assert plans["8,1,1"]["per_device_bytes"]["params"] == one["params"]
    assert plans["8,1,1"]["per_device_bytes"]["opt_state"] == one["opt_state"]
    for name, n in (("2,4,1", 4), ("1,8,1", 8)):
        got = plans[name]["per_device_bytes"]
        for key in ("params", "opt_state"):
            ratio = got[key] / one[key]
            assert 1 / n <= ratio <= 1 / n + 0.05, (name, key, ratio)
        assert got["temp"] > 0
        assert got["total"] >= got["params"] + got["opt_state"] + got["temp"]


def test_every_logical_name_has_a_rule():
    """Flax replicates unknown names silently; the table must cover the whole vocabulary."""
    ruled = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    assert set(layers.LOGICAL_AXIS_NAMES) <= ruled
    mesh_axes = set(mesh_lib.MESH_AXES)
    for _, axes in sharding.LOGICAL_AXIS_RULES:
        assert set((axes,) if isinstance(axes, str) else (axes or ())) <= mesh_axes


def test_rules_fallbacks_on_abstract_mesh():
    """Minimum size, divisibility fallback, one mesh axis per array, unknown names fail."""
    mesh = AbstractMesh((2, 2, 2), mesh_lib.MESH_AXES)
    spec = sharding.logical_to_mesh_spec
    assert spec(("embed", "mlp"), (1024, 4096), mesh) == P("fsdp", "tensor")
    assert spec(("embed", "mlp"), (32, 64), mesh) == P()  # below MIN_SHARD_SIZE
    assert spec(("embed", "mlp"), (32, 64), mesh, min_shard_size=0) == P("fsdp", "tensor")
    assert spec(("embed", "classes"), (1024, 1001), mesh, min_shard_size=0) == P("fsdp")
    assert spec(("embed", "embed"), (64, 64), mesh, min_shard_size=0) == P("fsdp")
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 320, 640), mesh) == P(None, None, None, "fsdp")
    assert spec(("batch", None), (8, 3), mesh, min_shard_size=0) == P(("data", "fsdp"))
    assert spec(("batch", None), (6, 3), mesh, min_shard_size=0) == P("data")
    with pytest.raises(KeyError, match="'nonsense' has no rule"):
        spec(("nonsense",), (1024,), mesh, min_shard_size=0)


def test_mesh_config_resolution():
    assert mesh_lib.MeshConfig().resolve(8) == (8, 1, 1)
    assert mesh_lib.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="at most one"):
        mesh_lib.MeshConfig(-1, -1, 1)
    with pytest.raises(ConfigError, match="needs 6 devices"):
        mesh_lib.MeshConfig(2, 3, 1).resolve(8)
    with pytest.raises(ConfigError, match="do not divide"):
        mesh_lib.MeshConfig(-1, 3, 1).resolve(8)
    mesh = mesh_lib.make_mesh()
    assert mesh.axis_names == mesh_lib.MESH_AXES and mesh.devices.size == len(jax.devices())


def test_shard_batch_single_process():
    mesh = mesh_lib.make_mesh()
    batch = train_helpers.batch_at(0)
    placed = sharding.shard_batch(batch, mesh)
    assert placed["image"].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(placed["image"]), batch["image"])
    spec = sharding.global_batch_spec(batch, mesh)
    assert spec["label"].shape == (train_helpers.BATCH,)


def test_sharded_init_and_batch_divisibility():
    """`sharded_init` gives the plain init's values with the rules' shardings; a batch the
    data-parallel ways do not divide is a clear error."""
    mesh = mesh_lib.make_mesh()
    rng = jax.random.PRNGKey(1)
    params = sharding.sharded_init(train_helpers.init_fn, mesh, rng, min_shard_size=0)
    plain = flax.linen.unbox(train_helpers.init_fn(rng))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, plain))
    kernel = params["vit"]["layer_0"]["intermediate"]["kernel"]
    assert kernel.sharding == jax.sharding.NamedSharding(mesh, P("fsdp", "tensor"))
    with pytest.raises(ValueError, match="not divisible by the data-parallel ways data \\* fsdp = 4"):
        sharding.global_batch_spec({"x": np.zeros((6, 2))}, AbstractMesh((2, 2, 2), mesh_lib.MESH_AXES))
