"""DPM-Solver++ multistep (Lu et al., 2022) in its 2M form, with or without Karras sigmas,
matching diffusers' `DPMSolverMultistepScheduler` (`algorithm_type="dpmsolver++"`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.diffusion import schedule


@flax.struct.dataclass
class DPMSolverState:
    """Arrays and history of one sampling run.

    Attributes:
        timesteps: `[n]` int32 model timesteps, descending.
        sigmas: `[n + 1]` float32 noise levels (the last one 0 for `final_sigmas_type="zero"`).
        first_order: `[n]` bool, whether step i takes a first-order (DDIM-like) update.
        prev_x0: `[*sample_shape]` the previous step's predicted x0 (the 2M history).
        init_noise_sigma: scalar 1.
    """

    timesteps: jnp.ndarray
    sigmas: jnp.ndarray
    first_order: jnp.ndarray
    prev_x0: jnp.ndarray
    init_noise_sigma: jnp.ndarray


def _alpha_sigma(sigma: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(schedule.SchedulerConfig):
    """diffusers' `DPMSolverMultistepScheduler.__init__` arguments, with its defaults.

    `sigma_min` / `sigma_max` are not `__init__` arguments of this class, but diffusers keeps them
    as hidden config entries when the config comes from a class that has them (Euler), and its
    Karras conversion reads them; they are fields here for the same effect.
    """

    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
    order: ClassVar[int] = 1  # diffusers' `order`: model evaluations per inference step

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_lu_lambdas: bool | None = False
    use_flow_sigmas: bool | None = False
    flow_shift: float | None = 1.0
    final_sigmas_type: str | None = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = dataclasses.field(default=None, metadata={"hidden": True})
    sigma_max: float | None = dataclasses.field(default=None, metadata={"hidden": True})

    def __post_init__(self) -> None:
        # diffusers' own remapping for configs written by DEIS / UniPC schedulers.
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        self._check_common()
        self._check("algorithm_type", ("dpmsolver++",))
        self._check("solver_order", (1, 2))
        self._check("solver_type", ("midpoint", "heun"))
        self._check("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check("final_sigmas_type", ("zero", "sigma_min"))
        self._check("variance_type", (None,))
        for key in (
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ):
            self._check(key, (False, None))

    def _timesteps(self, n: int, ac: np.ndarray) -> np.ndarray:
        alpha_t = np.sqrt(ac)
        sigma_t = np.sqrt(np.float32(1) - ac)
        lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(np.float32)
        clipped_idx = int(np.searchsorted(lambda_t[::-1], np.float32(self.lambda_min_clipped)))
        last = self.num_train_timesteps - clipped_idx
        if self.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + self.steps_offset
        ratio = self.num_train_timesteps / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...]) -> DPMSolverState:
        """Precomputes the schedule and zeroes the history for samples shaped `sample_shape`."""
        ac = self.alphas_cumprod()
        timesteps = self._timesteps(num_inference_steps, ac)
        train = schedule.train_sigmas(ac)
        if self.use_karras_sigmas:
            flipped = train[::-1].copy()
            lo = self.sigma_min if self.sigma_min is not None else float(flipped[-1])
            hi = self.sigma_max if self.sigma_max is not None else float(flipped[0])
            sigmas = schedule.karras_sigmas(lo, hi, num_inference_steps)
            timesteps = schedule.sigma_to_t(sigmas, np.log(train))
            if self.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        timesteps = timesteps.astype(np.int64)
        n = len(timesteps)
        final_low = self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        first_order = np.array([self.solver_order == 1 or i < 1 or (i == n - 1 and final_low) for i in range(n)])
        return DPMSolverState(
            timesteps=schedule.i32(timesteps),
            sigmas=schedule.f32(sigmas),
            first_order=jnp.asarray(first_order),
            prev_x0=jnp.zeros(tuple(sample_shape), jnp.float32),
            init_noise_sigma=schedule.f32(1.0),
        )

    def set_begin_index(self, state: DPMSolverState, begin_index: int) -> DPMSolverState:
        """Starts the run at step `begin_index` (image-to-image): that step has no history, so it is
        first order, as diffusers' `lower_order_nums` (counted from the first step run) makes it."""
        first = np.asarray(state.first_order) | (np.arange(state.first_order.shape[0]) == begin_index)
        return state.replace(first_order=jnp.asarray(first))

    def add_noise_at(
        self,
        state: DPMSolverState,
        original_samples: jnp.ndarray,
        noise: jnp.ndarray,
        step_index: int | jnp.ndarray,
    ) -> jnp.ndarray:
        """`alpha_i x + sigma_i noise` at `sigmas[step_index]`, diffusers' `add_noise` at the begin index.

        Args:
            state: from `set_timesteps`.
            original_samples: `[batch, ...]` clean samples.
            noise: standard-normal noise shaped like `original_samples`.
            step_index: int scalar (may be traced).

        Returns:
            The noisy samples, shaped like `original_samples`.
        """
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[step_index])
        return alpha_t * original_samples + sigma_t * noise

    def scale_model_input(self, state: DPMSolverState, sample: jnp.ndarray, step_index: jnp.ndarray) -> jnp.ndarray:
        """DPM-Solver does not scale the model input."""
        return sample

    def step(
        self,
        state: DPMSolverState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
    ) -> tuple[jnp.ndarray, DPMSolverState]:
        """One DPM-Solver++ step (first order on the first and, by default, last step; else 2M).

        Args:
            state: from `set_timesteps` or the previous step.
            model_output: `[*sample_shape]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar (may be traced); steps must run in order from 0.
            sample: `[*sample_shape]` the current sample.
            key: unused (the ODE solver is deterministic).

        Returns:
            (next sample, updated state).
        """
        del key
        i = jnp.asarray(step_index)
        sigma_s0 = state.sigmas[i]
        sigma_t = state.sigmas[i + 1]
        sigma_s1 = state.sigmas[jnp.maximum(i - 1, 0)]
        alpha_s0, sig_s0 = _alpha_sigma(sigma_s0)
        if self.prediction_type == "epsilon":
            x0 = (sample - sig_s0 * model_output) / alpha_s0
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s0 * sample - sig_s0 * model_output
        else:
            x0 = model_output

        alpha_t, sig_t = _alpha_sigma(sigma_t)
        alpha_s1, sig_s1 = _alpha_sigma(sigma_s1)
        lambda_t = jnp.log(alpha_t) - jnp.log(sig_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sig_s0)
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sig_s1)
        h = lambda_t - lambda_s0

        def first_order() -> jnp.ndarray:
            return sig_t / sig_s0 * sample - alpha_t * (jnp.exp(-h) - 1.0) * x0

        def second_order() -> jnp.ndarray:
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = 1.0 / r0 * (x0 - state.prev_x0)
            base = sig_t / sig_s0 * sample - alpha_t * (jnp.exp(-h) - 1.0) * x0
            if self.solver_type == "midpoint":
                return base - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
            return base + alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0) * d1

        prev_sample = jax.lax.cond(state.first_order[i], first_order, second_order)
        return prev_sample, state.replace(prev_x0=x0)
