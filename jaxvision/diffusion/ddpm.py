"""DDPM (Ho et al., 2020): the training noise schedule and the ancestral sampling step,
matching diffusers' `DDPMScheduler` (variance types `fixed_small`, the SD default, and `fixed_large`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.diffusion import schedule
from jaxvision.diffusion.prediction import to_x0


@flax.struct.dataclass
class DDPMState:
    """Arrays for one sampling run.

    Attributes:
        timesteps: `[n]` int32, descending.
        alpha_prod_t: `[n]` alphas_cumprod at each step's timestep.
        alpha_prod_t_prev: `[n]` alphas_cumprod at the next timestep (1 after the last).
        alphas_cumprod: `[num_train_timesteps]`, for `add_noise` / `get_velocity`.
        init_noise_sigma: scalar, the std of the start noise.
    """

    timesteps: jnp.ndarray
    alpha_prod_t: jnp.ndarray
    alpha_prod_t_prev: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    init_noise_sigma: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(schedule.SchedulerConfig):
    """diffusers' `DDPMScheduler.__init__` arguments, with its defaults."""

    diffusers_class: ClassVar[str] = "DDPMScheduler"
    order: ClassVar[int] = 1  # diffusers' `order`: model evaluations per inference step

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        self._check("variance_type", ("fixed_small", "fixed_large"))
        self._check("prediction_type", ("epsilon", "v_prediction", "sample"))

    def train_state(self) -> jnp.ndarray:
        """`[num_train_timesteps]` float32 alphas_cumprod, the only array training needs."""
        return schedule.f32(self.alphas_cumprod())

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] = ()) -> DDPMState:
        """Precomputes the schedule of a `num_inference_steps` run (`sample_shape` is unused)."""
        del sample_shape
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} > num_train_timesteps={self.num_train_timesteps}"
            )
        ac = self.alphas_cumprod()
        ts = schedule.discrete_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        prev = np.concatenate([ts[1:], [-1]])
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0))
        return DDPMState(
            timesteps=schedule.i32(ts),
            alpha_prod_t=schedule.f32(ac[ts]),
            alpha_prod_t_prev=schedule.f32(a_prev),
            alphas_cumprod=schedule.f32(ac),
            init_noise_sigma=schedule.f32(1.0),
        )

    def set_begin_index(self, state: DDPMState, begin_index: int) -> DDPMState:
        """Starting mid-schedule (image-to-image) changes nothing: each step reads its own timestep."""
        del begin_index
        return state

    def add_noise_at(
        self, state: DDPMState, original_samples: jnp.ndarray, noise: jnp.ndarray, step_index: int | jnp.ndarray
    ) -> jnp.ndarray:
        """See `schedule.add_noise_at_step`."""
        return schedule.add_noise_at_step(state, original_samples, noise, step_index)

    def scale_model_input(self, state: DDPMState, sample: jnp.ndarray, step_index: jnp.ndarray) -> jnp.ndarray:
        """DDPM does not scale the model input."""
        return sample

    def step(
        self,
        state: DDPMState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
        *,
        noise: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, DDPMState]:
        """One ancestral step x_t → x_{t-1}.

        Args:
            state: from `set_timesteps`.
            model_output: `[batch, ...]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar (may be traced).
            sample: `[batch, ...]` x_t.
            key: PRNG key for the injected noise (required unless `noise` is given).
            noise: explicit standard-normal noise shaped like `sample` (overrides `key`).

        Returns:
            (x_{t-1}, state); the state is unchanged.
        """
        t = state.timesteps[step_index]
        a_t = state.alpha_prod_t[step_index]
        a_prev = state.alpha_prod_t_prev[step_index]
        beta_prod_t = 1 - a_t
        beta_prod_t_prev = 1 - a_prev
        current_alpha_t = a_t / a_prev
        current_beta_t = 1 - current_alpha_t
        x0 = to_x0(self.prediction_type, model_output, sample, a_t, beta_prod_t)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        x0_coeff = a_prev**0.5 * current_beta_t / beta_prod_t
        sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if self.variance_type == "fixed_small":
            variance = jnp.maximum(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20)
        else:  # fixed_large
            variance = current_beta_t
        if noise is None:
            if key is None:
                raise ValueError("DDPMScheduler.step needs a PRNG `key` (or explicit `noise`) for its noise")
            noise = jax.random.normal(key, model_output.shape, model_output.dtype)
        # diffusers adds no noise on the step that lands on t = 0.
        prev_sample = jnp.where(t > 0, prev_sample + variance**0.5 * noise, prev_sample)
        return prev_sample, state
