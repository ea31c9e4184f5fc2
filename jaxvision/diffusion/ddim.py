"""DDIM (Song et al., 2021), matching diffusers' `DDIMScheduler` (eta = 0 deterministic, eta > 0 noisy)."""

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
class DDIMState:
    """Arrays for one sampling run.

    Attributes:
        timesteps: `[n]` int32, descending.
        alpha_prod_t: `[n]` alphas_cumprod at each step's timestep.
        alpha_prod_t_prev: `[n]` alphas_cumprod at `t - T // n` (`final_alpha_cumprod` below 0).
        init_noise_sigma: scalar 1.
    """

    timesteps: jnp.ndarray
    alpha_prod_t: jnp.ndarray
    alpha_prod_t_prev: jnp.ndarray
    init_noise_sigma: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(schedule.SchedulerConfig):
    """diffusers' `DDIMScheduler.__init__` arguments, with its defaults."""

    diffusers_class: ClassVar[str] = "DDIMScheduler"
    order: ClassVar[int] = 1  # diffusers' `order`: model evaluations per inference step

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        self._check_common()
        self._check("prediction_type", ("epsilon", "v_prediction", "sample"))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...] = ()) -> DDIMState:
        """Precomputes the schedule of a `num_inference_steps` run (`sample_shape` is unused)."""
        del sample_shape
        if num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} > num_train_timesteps={self.num_train_timesteps}"
            )
        ac = self.alphas_cumprod()
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        ts = schedule.discrete_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        # diffusers steps back by T // n whatever the spacing (so "trailing"/"linspace" skip unevenly).
        prev = ts - self.num_train_timesteps // num_inference_steps
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        return DDIMState(
            timesteps=schedule.i32(ts),
            alpha_prod_t=schedule.f32(ac[ts]),
            alpha_prod_t_prev=schedule.f32(a_prev),
            init_noise_sigma=schedule.f32(1.0),
        )

    def set_begin_index(self, state: DDIMState, begin_index: int) -> DDIMState:
        """Starting mid-schedule (image-to-image) changes nothing: each step reads its own timestep."""
        del begin_index
        return state

    def add_noise_at(
        self, state: DDIMState, original_samples: jnp.ndarray, noise: jnp.ndarray, step_index: int | jnp.ndarray
    ) -> jnp.ndarray:
        """`original_samples` noised to step `step_index`'s timestep, as diffusers' `add_noise(x, noise,
        timesteps[step_index:step_index + 1])`.

        Args:
            state: from `set_timesteps`.
            original_samples: `[batch, ...]` clean samples.
            noise: standard-normal noise shaped like `original_samples`.
            step_index: int scalar (may be traced).

        Returns:
            The noisy samples, shaped like `original_samples`.
        """
        # alpha_prod_t[i] is alphas_cumprod at timesteps[i], so it serves as the lookup table.
        i = jnp.broadcast_to(jnp.asarray(step_index), original_samples.shape[:1])
        return schedule.add_noise(state.alpha_prod_t, original_samples, noise, i)

    def scale_model_input(self, state: DDIMState, sample: jnp.ndarray, step_index: jnp.ndarray) -> jnp.ndarray:
        """DDIM does not scale the model input."""
        return sample

    def step(
        self,
        state: DDIMState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
        *,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        noise: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, DDIMState]:
        """One DDIM step x_t → x_prev.

        Args:
            state: from `set_timesteps`.
            model_output: `[batch, ...]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar (may be traced).
            sample: `[batch, ...]` x_t.
            key: PRNG key, needed only when `eta > 0` and `noise` is not given.
            eta: static; 0 is deterministic DDIM, 1 is DDPM-like.
            use_clipped_model_output: static; recompute epsilon from the clipped x0 (diffusers' flag).
            noise: explicit standard-normal noise shaped like `sample` for `eta > 0`.

        Returns:
            (x_prev, state); the state is unchanged.
        """
        a_t = state.alpha_prod_t[step_index]
        a_prev = state.alpha_prod_t_prev[step_index]
        beta_prod_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = to_x0("epsilon", model_output, sample, a_t, beta_prod_t)
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / beta_prod_t**0.5
        else:
            x0 = to_x0("v_prediction", model_output, sample, a_t, beta_prod_t)
            eps = a_t**0.5 * model_output + beta_prod_t**0.5 * sample
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        variance = (1 - a_prev) / beta_prod_t * (1 - a_t / a_prev)
        std_dev_t = eta * variance**0.5
        if use_clipped_model_output:
            eps = (sample - a_t**0.5 * x0) / beta_prod_t**0.5
        direction = (1 - a_prev - std_dev_t**2) ** 0.5 * eps
        prev_sample = a_prev**0.5 * x0 + direction
        if eta > 0:
            if noise is None:
                if key is None:
                    raise ValueError("DDIMScheduler.step with eta > 0 needs a PRNG `key` (or explicit `noise`)")
                noise = jax.random.normal(key, model_output.shape, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample, state
