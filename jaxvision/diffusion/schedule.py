"""Noise schedules shared by every scheduler: betas, alphas_cumprod, sigmas, timestep spacing,
and the training-time `add_noise` / `get_velocity`.

Everything that depends only on the config and the number of inference steps is computed here
in numpy, once, outside any jitted loop, reproducing diffusers' float32/float64 arithmetic so
that the arrays are bit-identical (or within one float32 ulp) to what the PyTorch schedulers
hold. The per-step maths then runs in JAX on those arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import jax.numpy as jnp
import numpy as np

from jaxvision.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# Stable Diffusion 1.x / 2.x's training schedule: `scheduler/scheduler_config.json` as
# stabilityai/stable-diffusion-2-1-base ships it (runwayml/stable-diffusion-v1-5's differs only in
# leaving `prediction_type` to its default, epsilon). Like the real file it has no
# `timestep_spacing`: diffusers then lists that key in `_use_default_values`, so a config
# converted to another scheduler class takes that class's own default spacing.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(..., dtype=torch.float32)` to within one float32 ulp.

    torch's CPU kernel rounds differently depending on the host's SIMD width, so no numpy
    expression reproduces it bit for bit on every machine; the correctly rounded float64
    linspace is the closest portable choice (relative error <= 1.2e-7 per beta).
    """
    return np.linspace(start, end, steps, dtype=np.float64).astype(np.float32)


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (diffusers' `betas_for_alpha_bar`), float64 → float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The training betas, `[num_train_timesteps]` float32, as diffusers' schedulers build them."""
    if trained_betas is not None:
        return np.asarray(trained_betas, np.float32)
    if beta_schedule == "linear":
        return _linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        root = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return (root * root).astype(np.float32)
    if beta_schedule == "squaredcos_cap_v2":
        return _betas_for_alpha_bar(num_train_timesteps)
    raise ConfigError(f"beta_schedule={beta_schedule!r} is not supported; use one of {list(BETA_SCHEDULES)}")


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """`cumprod(1 - betas)`, `[T]` float32. torch's CPU cumprod accumulates float32 in double."""
    alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """`((1 - a) / a) ** 0.5` in float32 for every training timestep, `[T]`, ascending in t."""
    a = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - a) / a).astype(np.float32)


def discrete_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int
) -> np.ndarray:
    """Descending integer timesteps, `[num_inference_steps]` int64, as DDPM/DDIM space them."""
    n, big_t = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = big_t // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
    raise ConfigError(f"timestep_spacing={spacing!r} is not supported; use one of {list(TIMESTEP_SPACINGS)}")


def sigma_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int) -> np.ndarray:
    """Descending float32 timesteps as the sigma schedulers (Euler, LMS) space them (linspace unrounded)."""
    n, big_t = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = big_t // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32) + np.float32(steps_offset)
    if spacing == "trailing":
        return np.arange(big_t, 0, -big_t / n).round().copy().astype(np.float32) - np.float32(1)
    raise ConfigError(f"timestep_spacing={spacing!r} is not supported; use one of {list(TIMESTEP_SPACINGS)}")


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by interpolating in log-sigma (diffusers' `_sigma_to_t`)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, `[num_inference_steps]` float64, descending."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _per_sample(coeff: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """`[batch]` → `[batch, 1, ..., 1]` so it broadcasts over an NHWC sample."""
    coeff = coeff.reshape(-1)
    return coeff.reshape(coeff.shape + (1,) * (ndim - 1))


def add_noise(
    alphas_cumprod: jnp.ndarray, original_samples: jnp.ndarray, noise: jnp.ndarray, timesteps: jnp.ndarray
) -> jnp.ndarray:
    """Forward diffusion `sqrt(a_t) x0 + sqrt(1 - a_t) noise` (diffusers' `DDPMScheduler.add_noise`).

    Args:
        alphas_cumprod: `[num_train_timesteps]` float32.
        original_samples: `[batch, ...]` clean samples (e.g. NHWC latents).
        noise: same shape as `original_samples`.
        timesteps: `[batch]` integer training timesteps.

    Returns:
        The noisy samples, shaped like `original_samples`.
    """
    a = jnp.asarray(alphas_cumprod, original_samples.dtype)[timesteps]
    sqrt_alpha = _per_sample(a**0.5, original_samples.ndim)
    sqrt_one_minus_alpha = _per_sample((1 - a) ** 0.5, original_samples.ndim)
    return sqrt_alpha * original_samples + sqrt_one_minus_alpha * noise


def add_noise_at_step(
    state: Any, original_samples: jnp.ndarray, noise: jnp.ndarray, step_index: int | jnp.ndarray
) -> jnp.ndarray:
    """`original_samples` noised to step `step_index`'s timestep: diffusers' `add_noise(x, noise,
    timesteps[step_index:step_index + 1])` for the alphas-cumprod schedulers (DDPM, DDIM, PNDM).

    Args:
        state: a scheduler state with `timesteps` and `alphas_cumprod` (from `set_timesteps`).
        original_samples: `[batch, ...]` clean samples.
        noise: standard-normal noise shaped like `original_samples`.
        step_index: int scalar (may be traced).

    Returns:
        The noisy samples, shaped like `original_samples`.
    """
    t = jnp.broadcast_to(state.timesteps[step_index], original_samples.shape[:1])
    return add_noise(state.alphas_cumprod, original_samples, noise, t)


def get_velocity(
    alphas_cumprod: jnp.ndarray, sample: jnp.ndarray, noise: jnp.ndarray, timesteps: jnp.ndarray
) -> jnp.ndarray:
    """The v-prediction target `sqrt(a_t) noise - sqrt(1 - a_t) x0` (diffusers' `get_velocity`).

    Args:
        alphas_cumprod: `[num_train_timesteps]` float32.
        sample: `[batch, ...]` clean samples.
        noise: same shape as `sample`.
        timesteps: `[batch]` integer training timesteps.

    Returns:
        The velocity, shaped like `sample`.
    """
    a = jnp.asarray(alphas_cumprod, sample.dtype)[timesteps]
    sqrt_alpha = _per_sample(a**0.5, sample.ndim)
    sqrt_one_minus_alpha = _per_sample((1 - a) ** 0.5, sample.ndim)
    return sqrt_alpha * noise - sqrt_one_minus_alpha * sample


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(float(v) for v in value)
    return value


class SchedulerConfig:
    """Mixin for a frozen scheduler dataclass whose fields are its diffusers class's `__init__` arguments.

    `from_config` reproduces diffusers' `XScheduler.from_config(config, **overrides)`: keys listed
    in `_use_default_values` are dropped (so the target class's own defaults apply to them), the
    target's own keys are taken, and keys that belong to other scheduler classes are ignored.
    Values jaxvision does not implement are rejected by each class's `__post_init__`.
    """

    diffusers_class: ClassVar[str]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Self:
        """Builds the scheduler from a diffusers `scheduler_config.json` dict (any scheduler class's)."""
        used_defaults = set(config.get("_use_default_values", ()) or ())
        cfg = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: _hashable(v) for k, v in cfg.items() if k in names}
        kwargs.update({k: _hashable(v) for k, v in overrides.items()})
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"{cls.diffusers_class}: unknown override(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**kwargs)  # type: ignore[call-arg]

    def _check(self, key: str, allowed: tuple[Any, ...]) -> None:
        value = getattr(self, key)
        if value not in allowed:
            raise ConfigError(
                f"{self.diffusers_class} config: {key}={value!r} is not supported by jaxvision "
                f"(supported: {list(allowed)}); remove the key from scheduler_config.json or pick a supported value"
            )

    def _check_common(self) -> None:
        self._check("beta_schedule", BETA_SCHEDULES)
        self._check("timestep_spacing", TIMESTEP_SPACINGS)
        if getattr(self, "rescale_betas_zero_snr", False):
            self._check("rescale_betas_zero_snr", (False,))
        if getattr(self, "thresholding", False):
            self._check("thresholding", (False,))

    def alphas_cumprod(self) -> np.ndarray:
        """`[num_train_timesteps]` float32 cumulative products of `1 - beta`."""
        betas = make_betas(
            self.num_train_timesteps,  # type: ignore[attr-defined]
            self.beta_start,  # type: ignore[attr-defined]
            self.beta_end,  # type: ignore[attr-defined]
            self.beta_schedule,  # type: ignore[attr-defined]
            self.trained_betas,  # type: ignore[attr-defined]
        )
        return alphas_cumprod_from_betas(betas)


def f32(x: Any) -> jnp.ndarray:
    """A float32 device array (schedule arrays are float32 like diffusers', whatever x64 says)."""
    return jnp.asarray(np.asarray(x, np.float32))


def i32(x: Any) -> jnp.ndarray:
    """An int32 device array for integer timesteps."""
    return jnp.asarray(np.asarray(x, np.int32))
