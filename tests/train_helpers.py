"""Shared pieces of the training-core tests, and a runner for the scenarios that need their own process.

Multi-device scenarios need `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX
starts, and multi-host / crash scenarios need real processes, so the tests run this file with
`sys.executable tests/train_helpers.py <scenario> <json args>`; each scenario writes JSON/npz
results into its output directory for the test to check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvision.models import vit
from jaxvision.train import checkpoints, optimizers, plan, sharding, step
from jaxvision.train import mesh as mesh_lib
from jaxvision.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
# LLVM's expensive passes dominate CPU compile time of these tiny programs (3-4x), and the tests
# compare runs compiled with the same flags, so they are switched off in every subprocess.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# qkv_bias=False: the key bias has an exactly-zero gradient (softmax ignores a per-query shift), so
# Adam would turn rounding noise into full-size updates and make mesh-vs-mesh parity meaningless.
CONFIG = vit.ViTConfig.from_variant(
    "tiny", image_size=(16, 16), num_hidden_layers=1, qkv_bias=False, labels=("a", "b", "c")
)
MODEL = vit.build(CONFIG)
# Adam with warmup + cosine, clipping, decay, EMA and a frozen subtree: every moving part at once.
OPTIMIZER = optimizers.OptimizerConfig(
    name="adamw",
    learning_rate=3e-3,
    schedule="cosine",
    warmup_steps=0,
    total_steps=40,
    weight_decay=0.05,
    clip_norm=1.0,
    ema_decay=0.9,
    freeze=(r"^vit/embeddings/patch_embeddings/",),
)


def init_fn(rng: jax.Array) -> Any:
    return MODEL.init(rng, jnp.zeros((1, *CONFIG.image_size, CONFIG.num_channels)))["params"]


def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
    del rng
    logits = MODEL.apply({"params": params}, batch["image"]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def batch_at(index: int, size: int = BATCH) -> dict[str, np.ndarray]:
    """The deterministic global batch number `index` (what a seeded data pipeline would yield)."""
    r = np.random.default_rng(1000 + index)
    return {
        "image": r.normal(size=(size, *CONFIG.image_size, 3)).astype(np.float32),
        "label": r.integers(0, CONFIG.num_labels, size).astype(np.int32),
    }


def batch_spec(size: int = BATCH) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        "image": jax.ShapeDtypeStruct((size, *CONFIG.image_size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((size,), jnp.int32),
    }


def setup(mesh: Any, config: optimizers.OptimizerConfig = OPTIMIZER, size: int = BATCH, seed: int = 0):
    """(optimizer, abstract_state, abstract_frozen, compiled step) for the tiny ViT on `mesh`."""
    opt = optimizers.make_optimizer(config)
    rng = jax.random.PRNGKey(seed)
    abstract_state, abstract_frozen = state_lib.abstract_train_state(init_fn, opt, rng, mesh, min_shard_size=0)
    train_step = step.make_train_step(loss_fn, opt, mesh, abstract_state, abstract_frozen, batch_spec(size))
    return opt, abstract_state, abstract_frozen, train_step


def flat_numpy(tree: Any) -> dict[str, np.ndarray]:
    """`{"/"-joined path: host array}` of a tree of (possibly sharded, multi-process) arrays."""
    from jax.experimental import multihost_utils

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's slice of a global batch."""
    n, i = jax.process_count(), jax.process_index()
    return {k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in batch.items()}


def run_script(scenario: str, args: dict[str, Any], devices: int = 1, env: dict[str, str] | None = None, **kw):
    """Starts this file as a subprocess with `devices` fake CPU devices; returns the Popen."""
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
    full_env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    full_env.update(env or {})
    cmd = [sys.executable, str(Path(__file__).resolve()), scenario, json.dumps(args)]
    return subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Waits for a runner subprocess; kills it (never leaving it behind) if it hangs."""
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        raise AssertionError(f"runner timed out after {timeout}s:\n{out.decode()[-4000:]}") from None
    return proc.returncode, out.decode()


def run_script_ok(scenario: str, args: dict[str, Any], devices: int = 1, timeout: float = 240) -> str:
    rc, out = finish(run_script(scenario, args, devices), timeout)
    if rc != 0:
        raise AssertionError(f"{scenario} failed with rc={rc}:\n{out[-4000:]}")
    return out


# ----------------------------------------------------------------------------------------------
# Scenarios (run in a subprocess).


def scenario_sharding(out: Path, steps: int = 3) -> None:
    """The same steps on 1 device and on meshes (8,1,1), (2,4,1), (2,2,2); specs; FSDP memory plans."""
    devices = jax.devices()
    assert len(devices) == 8, devices
    results: dict[str, Any] = {"specs": {}, "losses": {}, "plan": {}}
    meshes = {"1": ((1, 1, 1), devices[:1]), "8,1,1": ((8, 1, 1), devices)}
    meshes.update({"2,4,1": ((2, 4, 1), devices), "2,2,2": ((2, 2, 2), devices), "1,8,1": ((1, 8, 1), devices)})
    for name, (sizes, devs) in meshes.items():
        mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*sizes), devs)
        opt, abstract_state, abstract_frozen, train_step = setup(mesh)
        state, frozen = state_lib.create_train_state(init_fn, opt, jax.random.PRNGKey(0), mesh, min_shard_size=0)
        losses = []
        for i in range(steps):
            state, metrics = train_step(state, frozen, sharding.shard_batch(batch_at(i), mesh))
            losses.append(float(metrics["loss"]))
        results["losses"][name] = losses
        results["trace_count"] = train_step.trace_count
        np.savez(out / f"params_{name}.npz", **flat_numpy((state.params, state.opt_state, state.ema_params)))
        layer = state.params["vit"]["layer_0"]
        specs = {
            "query": layer["attention"]["query"]["kernel"],
            "attention_output": layer["attention"]["output"]["kernel"],
            "intermediate": layer["intermediate"]["kernel"],
            "layernorm_scale": layer["layernorm_before"]["scale"],
            "classifier": state.params["classifier"]["kernel"],
            "query_adam_mu": state.opt_state[1][0].mu["vit"]["layer_0"]["attention"]["query"]["kernel"],
            "frozen_patch_kernel": frozen["vit"]["embeddings"]["patch_embeddings"]["kernel"],
        }
        results["specs"][name] = {k: str(v.sharding.spec) for k, v in specs.items()}
        results["plan"][name] = plan.plan_train_step(train_step)
    (out / "results.json").write_text(json.dumps(results))


def scenario_train(out: Path, total_steps: int, every: int, kill_at: int = -1, kill_in_save_at: int = -1,
                   sigterm_at: int = -1, fsdp: int = 1) -> None:  # fmt: skip
    """A training loop with checkpoints that resumes, and can die at chosen points.

    kill_at: SIGKILL itself right after step index `kill_at`.
    kill_in_save_at: SIGKILL itself inside the save of checkpoint `kill_in_save_at`, after the
      "data" item is written and before Orbax commits the step.
    sigterm_at: send itself SIGTERM after step index `sigterm_at` (a preemption notice).
    """
    if kill_in_save_at >= 0:
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

        original = jch.JsonCheckpointHandler._save_fn

        async def dying_save(self, x, directory):
            await original(self, x, directory)
            if x.get("next_index") == kill_in_save_at:
                os.kill(os.getpid(), signal.SIGKILL)

        jch.JsonCheckpointHandler._save_fn = dying_save

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=-1, fsdp=fsdp))
    opt, abstract_state, abstract_frozen, train_step = setup(mesh)
    ckpt = checkpoints.Checkpointer(
        out / "checkpoints",
        checkpoints.CheckpointConfig(every_steps=every, max_to_keep=2, async_save=True),
        run_config={"total_steps": total_steps},
        frozen_sources={"vit/embeddings/patch_embeddings": "init_fn(PRNGKey(0))"},
    )
    # Frozen weights come from their source (here: the seeded init), never from the checkpoint.
    state, frozen = state_lib.create_train_state(init_fn, opt, jax.random.PRNGKey(0), mesh, min_shard_size=0)
    position = 0
    restored = ckpt.restore(abstract_state)
    if restored is not None:
        state, position = restored.state, restored.data["next_index"]
        assert restored.step == int(state.step) == position, (restored.step, int(state.step), position)
    ckpt.install_sigterm_handler()
    log = (out / f"metrics{jax.process_index()}.jsonl").open("a")
    while position < total_steps:
        batch = sharding.shard_batch(local_rows(batch_at(position)), mesh)
        state, metrics = train_step(state, frozen, batch)
        log.write(json.dumps({"step": position, "loss": float(metrics["loss"]), "pid": os.getpid()}) + "\n")
        log.flush()
        if position == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        position += 1
        ckpt.save(position, state, {"next_index": position}, force=position == total_steps)
        if ckpt.should_stop:
            break
        if position - 1 == kill_at:
            ckpt.wait()  # die between checkpoints, not inside one (that is kill_in_save_at)
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    final = flat_numpy((state.params, state.opt_state, state.ema_params))  # a collective: every process
    if jax.process_index() == 0:
        np.savez(out / "final.npz", **final)


def scenario_reshard(out: Path) -> None:
    """Save on mesh (2,2,2); restore onto (2,4,1) with the target shardings."""
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
    opt, abstract_state, _, train_step = setup(mesh)
    state, frozen = state_lib.create_train_state(init_fn, opt, jax.random.PRNGKey(0), mesh, min_shard_size=0)
    for i in range(2):
        state, _ = train_step(state, frozen, sharding.shard_batch(batch_at(i), mesh))
    saved = flat_numpy(state)
    np.savez(out / "saved.npz", **saved)
    with checkpoints.Checkpointer(out / "checkpoints", checkpoints.CheckpointConfig(every_steps=1)) as ckpt:
        ckpt.save(2, state, {"next_index": 2})
    mesh2 = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 4, 1))
    _, abstract2, _, _ = setup(mesh2)
    restored = checkpoints.Checkpointer(out / "checkpoints").restore(abstract2)
    got = flat_numpy(restored.state)
    assert got.keys() == saved.keys()
    for key in saved:
        np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
    targets = jax.tree.leaves(sharding.shardings_of(abstract2))
    for leaf, target in zip(jax.tree.leaves(restored.state), targets, strict=True):
        assert leaf.sharding == target, (leaf.sharding, target)
    query = restored.state.params["vit"]["layer_0"]["attention"]["query"]["kernel"]
    (out / "reshard.json").write_text(json.dumps({"query_spec": str(query.sharding.spec), "mesh": dict(mesh2.shape)}))


def scenario_multihost(out: Path, port: int, process_id: int, steps: int) -> None:
    """One of two processes joined by `jax.distributed`; FSDP over both processes' devices."""
    from jaxvision.train.distributed import maybe_initialize_distributed

    assert maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=120)
    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    scenario_train(out, total_steps=steps, every=steps, fsdp=2)
    if process_id == 0:
        (out / "done.json").write_text(json.dumps({"devices": len(jax.devices())}))


def cli_env(tmp: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: CPU, the fast-compile flags, and a persistent
    compilation cache under `tmp` that the runs of one test module share."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": FAST_COMPILE_FLAGS,
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_cli(tmp: Path, *argv: str) -> tuple[dict, str]:
    """Runs `python -m jaxvision ARGV...`; returns the JSON summary it prints last (stdout), and
    everything it printed (stdout, then the progress messages process 0 writes to stderr).

    A subprocess lets the fast-compile flags apply (every run compiles its own step), and the runs of
    one test module share compiled programs through a persistent compilation cache under `tmp`.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "jaxvision", *argv], env=cli_env(tmp), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def file_digests(folder: Path) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `folder` (empty when it does not exist)."""
    import hashlib

    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


if __name__ == "__main__":
    scenarios = {
        "sharding": scenario_sharding,
        "train": scenario_train,
        "reshard": scenario_reshard,
        "multihost": scenario_multihost,
    }
    kwargs = json.loads(sys.argv[2])
    out_dir = Path(kwargs.pop("out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios[sys.argv[1]](out_dir, **kwargs)
