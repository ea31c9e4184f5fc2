"""Euler and Euler-ancestral samplers of Karras et al. (k-diffusion), matching diffusers'
`EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

Both work on the sigma parameterisation (`sigmas.SigmaScheduler`: the start noise is scaled by
`init_noise_sigma`, the model input by `1 / sqrt(sigma^2 + 1)`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.diffusion import schedule
from jaxvision.diffusion import sigmas as sigmas_lib
from jaxvision.diffusion.prediction import sigma_to_x0


@flax.struct.dataclass
class SigmaState:
    """Arrays for one sampling run of a sigma-parameterised scheduler.

    Attributes:
        timesteps: `[n]` float32 model timesteps, descending.
        sigmas: `[n + 1]` float32 noise levels, the last one the final sigma (0 by default).
        init_noise_sigma: scalar std of the start noise.
    """

    timesteps: jnp.ndarray
    sigmas: jnp.ndarray
    init_noise_sigma: jnp.ndarray


def _interpolated_sigmas(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    sigmas = schedule.train_sigmas(alphas_cumprod)
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(sigmas_lib.SigmaScheduler, schedule.SchedulerConfig):
    """diffusers' `EulerDiscreteScheduler.__init__` arguments, with its defaults.

    Supported beyond the SD defaults: `use_karras_sigmas`, `final_sigmas_type="sigma_min"`,
    `sigma_min`/`sigma_max` (with Karras sigmas). `s_churn` stochasticity is not implemented.
    """

    diffusers_class: ClassVar[str] = "EulerDiscreteScheduler"
    order: ClassVar[int] = 1  # diffusers' `order`: model evaluations per inference step

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        self._check_common()
        self._check("prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"))
        self._check("interpolation_type", ("linear",))
        self._check("use_exponential_sigmas", (False, None))
        self._check("use_beta_sigmas", (False, None))
        self._check("timestep_type", ("discrete",))
        self._check("final_sigmas_type", ("zero", "sigma_min"))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] = ()) -> SigmaState:
        """Precomputes timesteps and sigmas of a `num_inference_steps` run (`sample_shape` is unused)."""
        del sample_shape
        ac = self.alphas_cumprod()
        timesteps = schedule.sigma_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        sigmas = _interpolated_sigmas(ac, timesteps)
        if self.use_karras_sigmas:
            log_sigmas = np.log(schedule.train_sigmas(ac))
            lo = self.sigma_min if self.sigma_min is not None else float(sigmas[-1])
            hi = self.sigma_max if self.sigma_max is not None else float(sigmas[0])
            sigmas = schedule.karras_sigmas(lo, hi, num_inference_steps)
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
        last = schedule.train_sigmas(ac)[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return SigmaState(
            timesteps=schedule.f32(timesteps),
            sigmas=schedule.f32(sigmas),
            init_noise_sigma=schedule.f32(sigmas_lib.init_noise_sigma(sigmas, self.timestep_spacing)),
        )

    def step(
        self,
        state: SigmaState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
    ) -> tuple[jnp.ndarray, SigmaState]:
        """One Euler step from sigma_i to sigma_{i+1} (deterministic; `key` is unused).

        Args:
            state: from `set_timesteps`.
            model_output: `[batch, ...]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar (may be traced).
            sample: `[batch, ...]` the current (unscaled) sample.

        Returns:
            (next sample, state); the state is unchanged.
        """
        del key
        sigma = state.sigmas[step_index]
        x0 = sigma_to_x0(
            "sample" if self.prediction_type == "original_sample" else self.prediction_type, model_output, sample, sigma
        )
        derivative = (sample - x0) / sigma
        dt = state.sigmas[step_index + 1] - sigma
        return sample + derivative * dt, state


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(sigmas_lib.SigmaScheduler, schedule.SchedulerConfig):
    """diffusers' `EulerAncestralDiscreteScheduler.__init__` arguments, with its defaults."""

    diffusers_class: ClassVar[str] = "EulerAncestralDiscreteScheduler"
    order: ClassVar[int] = 1  # diffusers' `order`: model evaluations per inference step

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        self._check("prediction_type", ("epsilon", "v_prediction"))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] = ()) -> SigmaState:
        """Precomputes timesteps and sigmas of a `num_inference_steps` run (`sample_shape` is unused)."""
        del sample_shape
        ac = self.alphas_cumprod()
        timesteps = schedule.sigma_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        sigmas = np.concatenate([_interpolated_sigmas(ac, timesteps), [0.0]]).astype(np.float32)
        return SigmaState(
            timesteps=schedule.f32(timesteps),
            sigmas=schedule.f32(sigmas),
            init_noise_sigma=schedule.f32(sigmas_lib.init_noise_sigma(sigmas, self.timestep_spacing)),
        )

    def step(
        self,
        state: SigmaState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
        *,
        noise: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, SigmaState]:
        """One ancestral step: deterministic Euler to sigma_down, then fresh noise of std sigma_up.

        Args:
            state: from `set_timesteps`.
            model_output: `[batch, ...]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar (may be traced).
            sample: `[batch, ...]` the current (unscaled) sample.
            key: PRNG key for the noise (required unless `noise` is given); diffusers draws noise
                on every step, the last one included (where sigma_up is 0).
            noise: explicit standard-normal noise shaped like `sample` (overrides `key`).

        Returns:
            (next sample, state); the state is unchanged.
        """
        sigma_from = state.sigmas[step_index]
        sigma_to = state.sigmas[step_index + 1]
        x0 = sigma_to_x0(self.prediction_type, model_output, sample, sigma_from)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma_from
        prev_sample = sample + derivative * (sigma_down - sigma_from)
        if noise is None:
            if key is None:
                raise ValueError("EulerAncestralDiscreteScheduler.step needs a PRNG `key` (or explicit `noise`)")
            noise = jax.random.normal(key, model_output.shape, model_output.dtype)
        return prev_sample + noise * sigma_up, state
