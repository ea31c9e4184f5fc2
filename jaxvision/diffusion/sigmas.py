"""The sigma parameterisation shared by Euler, Euler-ancestral and LMS (k-diffusion's samplers).

These schedulers keep `x_t = x_0 + sigma_t * noise` rather than the alphas-cumprod mix of
DDPM / DDIM / PNDM (`schedule.add_noise_at_step`): the start noise is scaled by
`init_noise_sigma`, the model input by `1 / sqrt(sigma^2 + 1)`, and image-to-image adds
`sigma * noise` at the begin index. `SigmaScheduler` holds that part once; each scheduler adds
its own `set_timesteps` and `step`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

# A scheduler state with a `sigmas` array, `[n + 1]` float32 (SigmaState, LMSState).
StateT = TypeVar("StateT")


def init_noise_sigma(sigmas: np.ndarray, timestep_spacing: str) -> np.float32:
    """diffusers' `init_noise_sigma`: max sigma, or sqrt(max^2 + 1) for "leading" spacing."""
    max_sigma = np.float32(sigmas.max())
    if timestep_spacing in ("linspace", "trailing"):
        return max_sigma
    return np.float32((max_sigma * max_sigma + np.float32(1)) ** np.float32(0.5))


class SigmaScheduler:
    """Mixin: `set_begin_index`, `add_noise_at` and `scale_model_input` of the sigma schedulers.

    The state only needs `sigmas`, `[n + 1]` float32 noise levels indexed by step.
    """

    def set_begin_index(self, state: StateT, begin_index: int) -> StateT:
        """Starting mid-schedule (image-to-image) changes nothing: each step reads sigma at its index.

        For LMS too: like diffusers, step `i` uses the order-min(i + 1, 4) coefficients, and the
        history slots not yet filled hold zeros, which drop the terms diffusers' shorter derivative
        list leaves out.
        """
        del begin_index
        return state

    def add_noise_at(
        self, state: Any, original_samples: jnp.ndarray, noise: jnp.ndarray, step_index: int | jnp.ndarray
    ) -> jnp.ndarray:
        """`original_samples + sigmas[step_index] * noise`: `add_noise` at the begin index (image-to-image).

        diffusers' Euler / Euler-ancestral / LMS `add_noise` take sigma at `begin_index` once a pipeline
        has called `set_begin_index`, whatever timestep value it is handed.

        Args:
            state: from `set_timesteps`.
            original_samples: `[batch, ...]` clean samples.
            noise: standard-normal noise shaped like `original_samples`.
            step_index: int scalar (may be traced).

        Returns:
            The noisy samples, shaped like `original_samples`.
        """
        return original_samples + noise * state.sigmas[step_index]

    def scale_model_input(self, state: Any, sample: jnp.ndarray, step_index: jnp.ndarray) -> jnp.ndarray:
        """`sample / sqrt(sigma^2 + 1)`: the model input at this step, shaped like `sample`."""
        sigma = state.sigmas[step_index]
        return sample / (sigma**2 + 1) ** 0.5
