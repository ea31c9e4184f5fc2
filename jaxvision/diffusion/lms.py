"""Linear multistep (k-diffusion's `sample_lms`), matching diffusers' `LMSDiscreteScheduler`
with its default order 4.

diffusers integrates each Lagrange basis polynomial numerically (`scipy.integrate.quad`) on every
step; the integrands are polynomials of degree <= 3, so here they are integrated exactly, once,
in `set_timesteps`, into a `[n, 4]` coefficient table.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial as P

from jaxvision.diffusion import schedule
from jaxvision.diffusion import sigmas as sigmas_lib
from jaxvision.diffusion.prediction import sigma_to_x0

ORDER = 4


@flax.struct.dataclass
class LMSState:
    """Arrays and history of one sampling run.

    Attributes:
        timesteps: `[n]` float32 model timesteps, descending.
        sigmas: `[n + 1]` float32 noise levels ending in 0.
        coeffs: `[n, 4]` float32; `coeffs[i, j]` weighs the derivative from step `i - j`.
        derivatives: `[4, *sample_shape]` the last four derivatives, oldest first.
        init_noise_sigma: scalar std of the start noise.
    """

    timesteps: jnp.ndarray
    sigmas: jnp.ndarray
    coeffs: jnp.ndarray
    derivatives: jnp.ndarray
    init_noise_sigma: jnp.ndarray


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
    """`[n, order]` integrals of the Lagrange basis over [sigma_i, sigma_{i+1}] (diffusers' `get_lms_coefficient`)."""
    s = sigmas.astype(np.float64)
    n = len(sigmas) - 1
    out = np.zeros((n, order))
    for t in range(n):
        cur_order = min(t + 1, order)
        for j in range(cur_order):
            poly = np.array([1.0])
            for k in range(cur_order):
                if k != j:
                    poly = P.polymul(poly, np.array([-s[t - k], 1.0]) / (s[t - j] - s[t - k]))
            antiderivative = P.polyint(poly)
            out[t, j] = P.polyval(s[t + 1], antiderivative) - P.polyval(s[t], antiderivative)
    return out


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler(sigmas_lib.SigmaScheduler, schedule.SchedulerConfig):
    """diffusers' `LMSDiscreteScheduler.__init__` arguments, with its defaults."""

    diffusers_class: ClassVar[str] = "LMSDiscreteScheduler"
    order: ClassVar[int] = 1  # diffusers' `order`: model evaluations per inference step

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        self._check("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check("use_exponential_sigmas", (False, None))
        self._check("use_beta_sigmas", (False, None))

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...]) -> LMSState:
        """Precomputes sigmas and LMS coefficients and zeroes the history for `sample_shape` samples."""
        ac = self.alphas_cumprod()
        train = schedule.train_sigmas(ac)
        timesteps = schedule.sigma_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        if self.use_karras_sigmas:
            sigmas = schedule.karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
            timesteps = schedule.sigma_to_t(sigmas, np.log(train))
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return LMSState(
            timesteps=schedule.f32(timesteps),
            sigmas=schedule.f32(sigmas),
            coeffs=schedule.f32(lms_coefficients(sigmas)),
            derivatives=jnp.zeros((ORDER, *sample_shape), jnp.float32),
            init_noise_sigma=schedule.f32(sigmas_lib.init_noise_sigma(sigmas, self.timestep_spacing)),
        )

    def step(
        self,
        state: LMSState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
    ) -> tuple[jnp.ndarray, LMSState]:
        """One order-4 linear multistep step (lower order on the first three steps).

        Args:
            state: from `set_timesteps` or the previous step.
            model_output: `[*sample_shape]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar (may be traced); steps must run in order from 0.
            sample: `[*sample_shape]` the current (unscaled) sample.
            key: unused (deterministic).

        Returns:
            (next sample, updated state).
        """
        del key
        sigma = state.sigmas[step_index]
        x0 = sigma_to_x0(self.prediction_type, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        history = jnp.concatenate([state.derivatives[1:], derivative[None]], axis=0)
        coeffs = state.coeffs[step_index]
        # Unused history slots have coefficient 0 (and hold finite values), so adding them is exact.
        total = coeffs[0] * history[-1]
        for j in range(1, ORDER):
            total = total + coeffs[j] * history[-1 - j]
        return sample + total, state.replace(derivatives=history)
