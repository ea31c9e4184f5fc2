"""Optimizers and learning-rate schedules: one Optax chain built from a small frozen config.

The chain is `clip_by_global_norm → optimizer (with masked weight decay)`. Weight decay skips
biases, norm scales and every other 1-D parameter (BERT/ViT practice; decaying a LayerNorm
scale towards 0 only hurts). Gradient accumulation is done by the train step (a `lax.scan`
over microbatches, see `jaxvision.train.step`), not by the optimizer, so one step is one update
whatever `accumulation_steps` is.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxvision.errors import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
LOSS_SCALES = ("none", "dynamic")
PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Everything that shapes the parameter update.

    Attributes:
      name: "adamw", "adafactor" or "sgd" (with `momentum`; 0 is plain SGD).
      learning_rate: peak learning rate.
      schedule: "constant", "constant_with_warmup", "linear" (warmup, then linear decay to 0 at
        `total_steps`) or "cosine" (warmup, then cosine decay to 0 at `total_steps`).
      warmup_steps: linear warmup from 0 (ignored by "constant").
      total_steps: schedule length (needed by "linear" and "cosine").
      weight_decay: decoupled weight decay, skipping 1-D params (biases, norm scales).
      clip_norm: clip gradients to this global norm; None or 0 disables.
      b1, b2, eps: Adam moments and epsilon.
      mu_dtype: storage dtype of Adam's first moment (e.g. "bfloat16"); None: the params' dtype.
      momentum: SGD momentum (None or 0: none).
      accumulation_steps: microbatches per step (the step scans over them).
      ema_decay: keep an exponential moving average of the trainable params (None: off).
      freeze: regexes over "/"-joined param paths that are not trained.
      loss_scale: "none" (fp32 / bf16) or "dynamic" (fp16: scaled loss, skip non-finite steps).
      lr_groups: `(regex, peak learning rate)` pairs over "/"-joined param paths; a param takes the
        first group it matches (`re.search`) and the default `learning_rate` otherwise. Every group
        follows the same schedule shape (torch's param groups under one LR scheduler).
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    mu_dtype: str | None = None
    momentum: float | None = 0.9
    accumulation_steps: int = 1
    ema_decay: float | None = None
    freeze: tuple[str, ...] = ()
    loss_scale: str = "none"
    lr_groups: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name={self.name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.loss_scale not in LOSS_SCALES:
            raise ConfigError(f"optimizer.loss_scale={self.loss_scale!r}: choose one of {', '.join(LOSS_SCALES)}")
        if self.schedule in ("linear", "cosine") and self.total_steps <= self.warmup_steps:
            raise ConfigError(
                f"optimizer.schedule={self.schedule!r} needs total_steps > warmup_steps "
                f"(got total_steps={self.total_steps}, warmup_steps={self.warmup_steps})"
            )
        if self.accumulation_steps < 1:
            raise ConfigError(f"optimizer.accumulation_steps={self.accumulation_steps}: must be >= 1")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optimizer.ema_decay={self.ema_decay}: must be in [0, 1)")
        if isinstance(self.freeze, str | list):
            object.__setattr__(self, "freeze", (self.freeze,) if isinstance(self.freeze, str) else tuple(self.freeze))
        object.__setattr__(self, "lr_groups", tuple((str(p), float(lr)) for p, lr in self.lr_groups))
        for pattern, lr in self.lr_groups:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"optimizer.lr_groups: {pattern!r} is not a valid regular expression ({e})") from e
            if lr < 0:
                raise ConfigError(f"optimizer.lr_groups: learning rate {lr} for {pattern!r} must be >= 0")

    @classmethod
    def from_train_section(cls, train: Any, freeze: tuple[str, ...] | None = None) -> OptimizerConfig:
        """From a run config's `train` section (`jaxvision.train.config.TrainSection` or a subclass).

        `freeze` replaces `train.freeze` (trainers add the networks they always keep frozen);
        fp16 compute turns on dynamic loss scaling.
        """
        return cls(
            name=train.optimizer,
            learning_rate=train.learning_rate,
            schedule=train.schedule,
            warmup_steps=train.warmup_steps,
            total_steps=train.max_steps,
            weight_decay=train.weight_decay,
            clip_norm=train.clip_norm,
            mu_dtype=train.adam_mu_dtype,
            accumulation_steps=train.grad_accum_steps,
            freeze=tuple(train.freeze) if freeze is None else freeze,
            loss_scale="dynamic" if train.dtype == "float16" else "none",
        )


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An Optax transformation with the schedule it uses (for logging the learning rate)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    config: OptimizerConfig


def make_schedule(config: OptimizerConfig, peak: float | None = None) -> optax.Schedule:
    """The learning rate as a function of the step (a jnp scalar in, a jnp scalar out).

    `peak` replaces `config.learning_rate` (for `lr_groups`)."""
    lr = config.learning_rate if peak is None else peak
    warmup = config.warmup_steps
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "constant_with_warmup":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
        )
    if config.schedule == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, max(warmup, 1)),
                optax.linear_schedule(lr, 0.0, config.total_steps - warmup),
            ],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, config.total_steps, end_value=0.0)


def decay_mask(params: PyTree) -> PyTree:
    """True for leaves that get weight decay: kernels and embeddings, not biases or norm scales."""

    def one(path: tuple[Any, ...], leaf: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1])) if path else ""
        return leaf.ndim > 1 and name not in ("bias", "scale")

    return jax.tree_util.tree_map_with_path(one, params)


def _update_rule(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimizer proper (after clipping), with weight decay masked to kernels and embeddings."""
    if config.name == "adamw":
        return optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            mu_dtype=config.mu_dtype and jnp.dtype(config.mu_dtype),
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    if config.name == "adafactor":
        return optax.adafactor(
            schedule,
            clipping_threshold=None,  # the chain clips by global norm already
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=decay_mask,
        )
    sgd = optax.sgd(schedule, momentum=config.momentum or None)
    return (
        optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask), sgd)
        if config.weight_decay
        else sgd
    )


def lr_group_labels(params: PyTree, lr_groups: tuple[tuple[str, float], ...]) -> PyTree:
    """Each leaf's group label: `"group_{i}"` for the first matching `lr_groups` regex, else "default"."""
    patterns = [re.compile(p) for p, _ in lr_groups]
    flat = traverse_util.flatten_dict(params, sep="/")
    labels = {}
    for path in flat:
        labels[path] = next((f"group_{i}" for i, p in enumerate(patterns) if p.search(path)), "default")
    return traverse_util.unflatten_dict(labels, sep="/")


def make_optimizer(config: OptimizerConfig) -> Optimizer:
    """The Optax chain for `config` (apply it to the *trainable* params only).

    Clipping is global over all trainable params; with `lr_groups` the update rule is an
    `optax.multi_transform` with one copy of the rule per group (same schedule shape, own peak).
    """
    schedule = make_schedule(config)
    parts: list[optax.GradientTransformation] = []
    if config.clip_norm:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.lr_groups:
        rules = {"default": _update_rule(config, schedule)}
        for i, (_, lr) in enumerate(config.lr_groups):
            rules[f"group_{i}"] = _update_rule(config, make_schedule(config, lr))
        parts.append(optax.multi_transform(rules, lambda params: lr_group_labels(params, config.lr_groups)))
    else:
        parts.append(_update_rule(config, schedule))
    return Optimizer(tx=optax.chain(*parts), schedule=schedule, config=config)
