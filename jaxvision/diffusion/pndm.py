"""PNDM in its PLMS form (`skip_prk_steps=True`, the Stable Diffusion 1.x default), matching
diffusers' `PNDMScheduler` step for step.

diffusers' PLMS schedule repeats the second timestep (`[901, 801, 801, 701, ...]` for 10 steps):
step 0 takes an Euler-like step from x_T with eps_0 and remembers x_T; step 1 re-evaluates the
model at the repeated timestep and restarts from x_T with the average of the two predictions
(a second-order Heun-like start); later steps use linear multistep combinations of the last 2, 3
and then 4 stored predictions. The history holds eps_0 (not eps_1), exactly as diffusers' `ets`.

Image-to-image starts at `begin_index` > 0. diffusers' PNDM counts its steps from the first one
run (`counter`), not from the start of the schedule, so the Euler-like start and the Heun-like
restart happen at `begin_index` and `begin_index + 1` — the restart then redoes the interval
above that step's timestep — while each step's alphas still come from its own timestep.
`set_begin_index` rebuilds the alpha tables for that.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.diffusion import schedule

HISTORY = 4


@flax.struct.dataclass
class PNDMState:
    """Arrays and history of one sampling run (n inference steps → n + 1 model evaluations).

    Attributes:
        timesteps: `[n + 1]` int32, with diffusers' repeated entry.
        alpha_prod_t: `[n + 1]` alphas_cumprod at the timestep each step integrates from.
        alpha_prod_t_prev: `[n + 1]` alphas_cumprod at the timestep it lands on.
        alphas_cumprod: `[num_train_timesteps]`, for `add_noise_at`.
        begin_index: int32 scalar, the first step run (0, or later for image-to-image).
        ets: `[4, *sample_shape]` the last four stored model outputs, oldest first.
        cur_sample: `[*sample_shape]` x_T, remembered by step 0 for step 1.
        init_noise_sigma: scalar 1.
    """

    timesteps: jnp.ndarray
    alpha_prod_t: jnp.ndarray
    alpha_prod_t_prev: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    begin_index: jnp.ndarray
    ets: jnp.ndarray
    cur_sample: jnp.ndarray
    init_noise_sigma: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(schedule.SchedulerConfig):
    """diffusers' `PNDMScheduler.__init__` arguments, with its defaults."""

    diffusers_class: ClassVar[str] = "PNDMScheduler"
    # diffusers' `order` (model evaluations per inference step) is 1 for PNDM too: the repeated
    # timestep makes the schedule n + 1 long, but image-to-image slices it at `t_start * 1`.
    order: ClassVar[int] = 1

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        self._check_common()
        # The Runge-Kutta warm-up (skip_prk_steps=False) is not implemented; every Stable
        # Diffusion scheduler_config.json sets skip_prk_steps=true.
        self._check("skip_prk_steps", (True,))
        self._check("prediction_type", ("epsilon", "v_prediction"))

    def _ascending_timesteps(self, n: int) -> np.ndarray:
        big_t = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, big_t - 1, n).round().astype(np.int64)
        if self.timestep_spacing == "leading":
            return (np.arange(0, n) * (big_t // n)).round().astype(np.int64) + self.steps_offset
        return np.round(np.arange(big_t, 0, -big_t / n))[::-1].astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int, sample_shape: tuple[int, ...]) -> PNDMState:
        """Precomputes the schedule and zeroes the history for samples shaped `sample_shape`."""
        n = num_inference_steps
        asc = self._ascending_timesteps(n)
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)
        ac = self.alphas_cumprod()
        a_t, a_prev = self._alpha_tables(ts, n, ac, begin_index=0)
        zeros = jnp.zeros(tuple(sample_shape), jnp.float32)
        return PNDMState(
            timesteps=schedule.i32(ts),
            alpha_prod_t=a_t,
            alpha_prod_t_prev=a_prev,
            alphas_cumprod=schedule.f32(ac),
            begin_index=jnp.int32(0),
            ets=jnp.zeros((HISTORY, *sample_shape), jnp.float32),
            cur_sample=zeros,
            init_noise_sigma=schedule.f32(1.0),
        )

    def _alpha_tables(
        self, ts: np.ndarray, n: int, ac: np.ndarray, begin_index: int
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """alphas_cumprod at the timestep each step integrates from and at the one it lands on."""
        ratio = self.num_train_timesteps // n
        t_from = ts.copy()
        t_to = ts - ratio
        second = begin_index + 1
        if second < len(ts):
            # The second step run redoes the first one's interval: from t + T // n down to t.
            t_from[second], t_to[second] = min(ts[second] + ratio, len(ac) - 1), ts[second]
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        a_prev = np.where(t_to >= 0, ac[np.maximum(t_to, 0)], final)
        return schedule.f32(ac[t_from]), schedule.f32(a_prev)

    def set_begin_index(self, state: PNDMState, begin_index: int) -> PNDMState:
        """Starts the run at step `begin_index` (image-to-image), as diffusers' counter does.

        Args:
            state: from `set_timesteps`, before any step.
            begin_index: the first step index the loop runs (a Python int).

        Returns:
            The state with its alpha tables and step counter rebased on `begin_index`.
        """
        ts = np.asarray(state.timesteps).astype(np.int64)
        n = max(len(ts) - 1, 1)
        a_t, a_prev = self._alpha_tables(ts, n, np.asarray(state.alphas_cumprod), begin_index)
        return state.replace(alpha_prod_t=a_t, alpha_prod_t_prev=a_prev, begin_index=jnp.int32(begin_index))

    def add_noise_at(
        self, state: PNDMState, original_samples: jnp.ndarray, noise: jnp.ndarray, step_index: int | jnp.ndarray
    ) -> jnp.ndarray:
        """See `schedule.add_noise_at_step`."""
        return schedule.add_noise_at_step(state, original_samples, noise, step_index)

    def scale_model_input(self, state: PNDMState, sample: jnp.ndarray, step_index: jnp.ndarray) -> jnp.ndarray:
        """PNDM does not scale the model input."""
        return sample

    def step(
        self,
        state: PNDMState,
        model_output: jnp.ndarray,
        step_index: jnp.ndarray,
        sample: jnp.ndarray,
        key: jax.Array | None = None,
    ) -> tuple[jnp.ndarray, PNDMState]:
        """One PLMS step.

        Args:
            state: from `set_timesteps` or the previous step.
            model_output: `[*sample_shape]` the model's prediction at `state.timesteps[step_index]`.
            step_index: int scalar in `[0, n]` (may be traced); steps must run in order from
                `state.begin_index` (0 unless `set_begin_index` moved it).
            sample: `[*sample_shape]` the current sample.
            key: unused (PNDM is deterministic).

        Returns:
            (previous sample, updated state).
        """
        del key
        c = jnp.asarray(step_index)
        counter = c - state.begin_index  # diffusers' `counter`: steps run so far
        is_second = counter == 1
        pushed = jnp.concatenate([state.ets[1:], model_output[None].astype(state.ets.dtype)], axis=0)
        ets = jnp.where(is_second, state.ets, pushed)
        branch = jnp.where(counter == 0, 0, jnp.where(is_second, 1, jnp.minimum(counter, HISTORY)))
        e1, e2, e3, e4 = ets[-1], ets[-2], ets[-3], ets[-4]
        combined = jax.lax.switch(
            branch,
            [
                lambda: model_output,
                lambda: (model_output + e1) / 2,
                lambda: (3 * e1 - e2) / 2,
                lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
                lambda: jnp.float32(1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
            ],
        )
        x = jnp.where(is_second, state.cur_sample, sample)
        cur_sample = jnp.where(counter == 0, sample, state.cur_sample)
        prev_sample = self._prev_sample(x, state.alpha_prod_t[c], state.alpha_prod_t_prev[c], combined)
        return prev_sample, state.replace(ets=ets, cur_sample=cur_sample)

    def _prev_sample(
        self, sample: jnp.ndarray, a_t: jnp.ndarray, a_prev: jnp.ndarray, model_output: jnp.ndarray
    ) -> jnp.ndarray:
        """Formula (9) of the PNDM paper, diffusers' `_get_prev_sample`."""
        beta_prod_t = 1 - a_t
        beta_prod_t_prev = 1 - a_prev
        if self.prediction_type == "v_prediction":
            model_output = a_t**0.5 * model_output + beta_prod_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * beta_prod_t_prev**0.5 + (a_t * beta_prod_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * model_output / denom
