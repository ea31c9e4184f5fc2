"""The train step, state and optimizers on one device, with a small MLP (fast to compile).

Multi-device equivalence is in test_train_sharding.py; crash/resume in test_checkpoints.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvision.errors import ConfigError
from jaxvision.models import layers
from jaxvision.train import checkpoints, freeze, optimizers, sharding
from jaxvision.train import mesh as mesh_lib
from jaxvision.train import state as state_lib
from jaxvision.train import step as step_lib
from jaxvision.train.loss_scale import DynamicLossScale


class MLP(nn.Module):
    """`[batch, 8]` → `[batch, 3]` logits; `dtype` is the compute dtype over fp32 params."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.dense(16, (layers.EMBED, layers.MLP), dtype=self.dtype, name="hidden")(x.astype(self.dtype))
        h = layers.layer_norm(1e-6, name="norm")(jax.nn.gelu(h)).astype(self.dtype)
        return layers.dense(3, (layers.MLP, layers.CLASSES), dtype=self.dtype, name="head")(h)


def make(dtype: Any = jnp.float32, batch: int = 16, loss_weight: float = 1.0, **opt_kwargs: Any):
    """(state, frozen, train_step, mesh) for the MLP on a 1-device mesh; the loss is
    `loss_weight` x the mean cross-entropy."""
    model = MLP(dtype)
    chex.clear_trace_counter()  # chex counts per code location, across make() calls

    def init_fn(rng: jax.Array) -> Any:
        return model.init(rng, jnp.zeros((1, 8)))["params"]

    def loss_fn(params: Any, b: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = model.apply({"params": params}, b["x"]).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()
        return loss_weight * loss, {"accuracy": (logits.argmax(-1) == b["y"]).mean()}

    config = optimizers.OptimizerConfig(**{"learning_rate": 0.05, **opt_kwargs})
    opt = optimizers.make_optimizer(config)
    mesh = mesh_lib.make_mesh()
    rng = jax.random.PRNGKey(0)
    abstract_state, abstract_frozen = state_lib.abstract_train_state(init_fn, opt, rng, mesh)
    spec = {"x": jax.ShapeDtypeStruct((batch, 8), jnp.float32), "y": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    train_step = step_lib.make_train_step(
        chex.assert_max_traces(loss_fn, n=2 if config.accumulation_steps > 1 else 1),
        opt,
        mesh,
        abstract_state,
        abstract_frozen,
        spec,
        has_aux=True,
    )
    state, frozen = state_lib.create_train_state(init_fn, opt, rng, mesh)
    return state, frozen, train_step, mesh


def data(index: int, batch: int = 16, scale: float = 1.0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(index)
    x = r.normal(size=(batch, 8)).astype(np.float32)
    return {"x": (x * scale).astype(np.float32), "y": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)}


def host(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.array(a), tree)


def test_step_compiles_once_and_reports_health():
    """AOT-compiled once (trace counter and `chex.assert_max_traces(n=1)` on the loss), metrics
    carry loss / grad, param and update norms / learning rate / aux, and the loss goes down."""
    state, frozen, train_step, mesh = make(schedule="linear", warmup_steps=2, total_steps=10)
    losses, lrs = [], []
    for i in range(6):
        state, metrics = train_step(state, frozen, sharding.shard_batch(data(0), mesh))
        m = step_lib.host_metrics(metrics)
        assert {"loss", "grad_norm", "param_norm", "update_norm", "learning_rate", "accuracy", "step"} <= set(m)
        assert m["step"] == i and m["grad_norm"] > 0 and m["param_norm"] > 0
        losses.append(m["loss"])
        lrs.append(m["learning_rate"])
    assert train_step.trace_count == 1
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(lrs, [0.0, 0.025, 0.05, 0.04375, 0.0375, 0.03125], rtol=1e-6)
    assert int(state.step) == 6


def test_frozen_params_are_bit_identical_and_have_no_optimizer_state():
    state, frozen, train_step, mesh = make(freeze=("^hidden/",))
    assert list(frozen) == ["hidden"] and "hidden" not in state.params
    before = host(frozen)
    trainable_before = host(state.params)
    for i in range(3):
        state, _ = train_step(state, frozen, sharding.shard_batch(data(i), mesh))
    chex.assert_trees_all_equal(host(frozen), before)  # not donated, not updated
    assert not np.array_equal(state.params["head"]["kernel"], trainable_before["head"]["kernel"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert paths and not any("hidden" in p for p in paths)
    # Adam: mu and nu per trainable element, plus scalar counts — zero bytes for frozen leaves.
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    opt_elements = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_elements == 2 * trainable


def test_freeze_patterns_are_checked():
    params = {"a": {"kernel": np.zeros(2)}, "b": {"bias": np.zeros(2)}}
    trainable, frozen = freeze.partition_params(params, ["^a/"])
    assert freeze.param_paths(trainable) == ["b/bias"] and freeze.param_paths(frozen) == ["a/kernel"]
    assert freeze.param_paths(freeze.merge_params(trainable, frozen)) == ["b/bias", "a/kernel"]
    with pytest.raises(ConfigError, match="matches no parameter"):
        freeze.partition_params(params, ["encoder"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        freeze.partition_params(params, ["("])


def test_gradient_accumulation_equals_one_big_batch():
    """k=4 microbatches of 4 == one batch of 16 (SGD, so the update is the gradient itself):
    params after a step agree to atol 1e-6 (measured ~1e-8), loss to rtol 1e-6."""
    kwargs = dict(name="sgd", momentum=0.0, clip_norm=None, learning_rate=0.5)
    s1, f1, step1, mesh = make(**kwargs)
    s4, f4, step4, _ = make(accumulation_steps=4, **kwargs)
    start = host(s1.params)
    batch = data(3)
    s1, m1 = step1(s1, f1, sharding.shard_batch(batch, mesh))
    s4, m4 = step4(s4, f4, sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["accuracy"]), float(m1["accuracy"]), rtol=1e-6)
    delta = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), s1.params, start)
    assert max(jax.tree.leaves(delta)) > 1e-3  # the step moved the params
    chex.assert_trees_all_close(host(s4.params), host(s1.params), atol=1e-6, rtol=0)


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps():
    """fp16 compute with the loss weighted x64: at the initial scale 2**15 the scaled fp16
    gradients overflow (> 65504), so the step leaves params and optimizer state bit-identical and
    halves the scale; after 4 skips (scale 2048) the steps go through and the loss falls."""
    state, frozen, train_step, mesh = make(jnp.float16, loss_scale="dynamic", loss_weight=64.0)
    assert state.loss_scale is not None and float(state.loss_scale.scale) == 2.0**15
    batch = sharding.shard_batch(data(0), mesh)
    params0, opt0 = host(state.params), host(state.opt_state)
    state, metrics = train_step(state, frozen, batch)
    assert bool(metrics["skipped"]) and float(metrics["loss_scale"]) == 2.0**15
    assert float(state.loss_scale.scale) == 2.0**14 and int(state.step) == 1
    chex.assert_trees_all_equal(host(state.params), params0)
    chex.assert_trees_all_equal(host(state.opt_state), opt0)
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # fp32 masters
    skipped, losses = [True], [float(metrics["loss"])]
    for _ in range(6):
        state, metrics = train_step(state, frozen, batch)
        skipped.append(bool(metrics["skipped"]))
        losses.append(float(metrics["loss"]))
    assert skipped == [True] * 4 + [False] * 3
    assert float(state.loss_scale.scale) == 2048.0
    assert losses[-1] < losses[4] == losses[0]


def test_loss_scale_grows_after_period():
    ls = DynamicLossScale.create(initial_scale=8.0, period=2)
    ls = ls.adjust(jnp.asarray(True))
    assert float(ls.scale) == 8.0 and int(ls.good_steps) == 1
    ls = ls.adjust(jnp.asarray(True))
    assert float(ls.scale) == 16.0 and int(ls.good_steps) == 0
    ls = ls.adjust(jnp.asarray(False))
    assert float(ls.scale) == 8.0 and int(ls.good_steps) == 0
    small = DynamicLossScale.create(initial_scale=1.0).adjust(jnp.asarray(False))
    assert float(small.scale) == 1.0  # min_scale


def test_divergence_raises_and_the_last_good_checkpoint_restores(tmp_path):
    """A NaN batch makes the loss NaN: `TrainingDivergedError` names step 2; the state passed in
    was donated, and the caller restores checkpoint 2 (bit-identical to the state before, with
    its EMA, loss-scale state and RNG)."""
    state, frozen, train_step, mesh = make(ema_decay=0.9, loss_scale="dynamic")
    abstract = sharding.abstract_like(state)
    ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", checkpoints.CheckpointConfig(every_steps=1, async_save=False))
    for i in range(2):
        state, _ = train_step(state, frozen, sharding.shard_batch(data(i), mesh))
        ckpt.save(i + 1, state, {"next_index": i + 1})
    good = host(state)
    bad = data(2)
    bad["x"][0, 0] = np.nan
    with pytest.raises(step_lib.TrainingDivergedError, match="diverged at step 2") as error:
        train_step(state, frozen, sharding.shard_batch(bad, mesh))
    assert error.value.step == 2 and np.isnan(error.value.loss)
    restored = ckpt.restore(abstract)
    ckpt.close()
    assert restored.step == 2 and restored.data == {"next_index": 2}
    chex.assert_trees_all_equal(host(restored.state), good)
    assert restored.state.loss_scale is not None and restored.state.ema_params is not None
    state, metrics = train_step(restored.state, frozen, sharding.shard_batch(data(2), mesh))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("name", ["adafactor", "sgd"])
def test_other_optimizers_train(name):
    state, frozen, train_step, mesh = make(name=name, weight_decay=1e-4, learning_rate=0.1)
    losses = []
    for _ in range(4):
        state, metrics = train_step(state, frozen, sharding.shard_batch(data(0), mesh))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


def test_bf16_compute_keeps_fp32_masters_and_ema():
    """bf16 compute over fp32 params; EMA with decay 0.5 is the mean of old and new params."""
    state, frozen, train_step, mesh = make(jnp.bfloat16, ema_decay=0.5)
    p0 = host(state.params)
    state, metrics = train_step(state, frozen, sharding.shard_batch(data(0), mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    expected = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * np.asarray(b), p0, state.params)
    chex.assert_trees_all_close(host(state.ema_params), expected, atol=1e-7)


def test_schedules_and_decay_mask():
    def lrs(**kw):
        schedule = optimizers.make_schedule(optimizers.OptimizerConfig(learning_rate=1.0, **kw))
        return [float(schedule(jnp.asarray(s))) for s in (0, 2, 4, 7, 10)]

    np.testing.assert_allclose(lrs(schedule="constant"), [1, 1, 1, 1, 1])
    np.testing.assert_allclose(lrs(schedule="constant_with_warmup", warmup_steps=4), [0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(lrs(schedule="linear", warmup_steps=4, total_steps=10), [0, 0.5, 1, 0.5, 0])
    np.testing.assert_allclose(lrs(schedule="cosine", warmup_steps=4, total_steps=10), [0, 0.5, 1, 0.5, 0], atol=1e-6)
    mask = optimizers.decay_mask(
        {"dense": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}, "norm": {"scale": np.zeros(2)}}
    )
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
    with pytest.raises(ConfigError, match="needs total_steps > warmup_steps"):
        optimizers.OptimizerConfig(schedule="cosine", warmup_steps=5, total_steps=5)
    with pytest.raises(ConfigError, match="optimizer.name='lion'"):
        optimizers.OptimizerConfig(name="lion")


def test_lr_groups_equal_separate_optimizers_per_group():
    """`lr_groups` (used for DreamBooth's text-encoder learning rate) gives each group exactly the
    update of its own AdamW with its own peak LR, after one global-norm clip over all params."""
    params = {"unet": {"k": jnp.ones((3, 2))}, "text_encoder": {"k": jnp.full((2, 2), 0.5), "b": jnp.ones(2)}}
    grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 1.0, params)
    kw = dict(learning_rate=1e-2, schedule="linear", warmup_steps=1, total_steps=10, weight_decay=0.1, clip_norm=2.0)
    config = optimizers.OptimizerConfig(lr_groups=((r"^text_encoder/", 3e-4),), **kw)
    tx = optimizers.make_optimizer(config).tx
    opt_state = tx.init(params)
    got = params
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, got)
        got = optax.apply_updates(got, updates)

    # Reference: clip once globally, then two independent AdamWs.
    clipped = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())[0]
    expected = {}
    for name, lr in (("unet", 1e-2), ("text_encoder", 3e-4)):
        ref = optimizers.make_optimizer(dataclasses.replace(config, lr_groups=(), clip_norm=None, learning_rate=lr))
        p, s = params[name], ref.tx.init(params[name])
        for _ in range(3):
            u, s = ref.tx.update(clipped[name], s, p)
            p = optax.apply_updates(p, u)
        expected[name] = p
    chex.assert_trees_all_close(got, expected, atol=1e-7, rtol=1e-6)
    labels = optimizers.lr_group_labels(params, config.lr_groups)
    assert labels == {"unet": {"k": "default"}, "text_encoder": {"k": "group_0", "b": "group_0"}}
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        optimizers.OptimizerConfig(lr_groups=(("(", 1.0),))


def test_adam_mu_dtype_stores_the_first_moment_in_bfloat16():
    """`train.adam_mu_dtype=bfloat16` (a memory knob for large fine-tunes) stores AdamW's first
    moment in bf16 and keeps the second moment and the params fp32; three updates stay within
    bf16's rounding (relative 1e-2) of the fp32-moment AdamW; other values are config errors."""
    from jaxvision.train.config import TrainSection

    params = {"k": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    grads = {"k": jnp.cos(jnp.arange(12.0)).reshape(3, 4)}
    section = TrainSection(max_steps=10, batch_size=1, learning_rate=1e-2, adam_mu_dtype="bfloat16")
    config = optimizers.OptimizerConfig.from_train_section(section)
    assert config.mu_dtype == "bfloat16"
    results = []
    for c in (config, dataclasses.replace(config, mu_dtype=None)):
        tx = optimizers.make_optimizer(c).tx
        state, p = tx.init(params), params
        for _ in range(3):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results.append((p, state))
    (p16, s16), (p32, s32) = results
    dtypes = {x.dtype for x in jax.tree.leaves(s16) if x.ndim == 2}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # mu bf16, nu fp32
    assert p16["k"].dtype == jnp.float32
    np.testing.assert_allclose(p16["k"], p32["k"], rtol=1e-2, atol=1e-4)
    with pytest.raises(ConfigError, match="adam_mu_dtype"):
        TrainSection(max_steps=10, batch_size=1, learning_rate=1e-2, adam_mu_dtype="float16")
