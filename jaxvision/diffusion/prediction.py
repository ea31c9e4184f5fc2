"""Converting a model's output to the predicted clean sample, per `prediction_type`."""

from __future__ import annotations

import jax.numpy as jnp


def to_x0(
    prediction_type: str,
    model_output: jnp.ndarray,
    sample: jnp.ndarray,
    alpha_prod_t: jnp.ndarray,
    beta_prod_t: jnp.ndarray,
) -> jnp.ndarray:
    """The predicted x0 from an epsilon, v or sample prediction (alpha-parameterised schedulers).

    Args:
        prediction_type: "epsilon", "v_prediction" or "sample".
        model_output: `[batch, ...]` the model output.
        sample: `[batch, ...]` the current noisy sample x_t.
        alpha_prod_t: scalar alphas_cumprod at t.
        beta_prod_t: scalar `1 - alpha_prod_t`.
    """
    if prediction_type == "epsilon":
        return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")


def sigma_to_x0(
    prediction_type: str, model_output: jnp.ndarray, sample: jnp.ndarray, sigma: jnp.ndarray
) -> jnp.ndarray:
    """The predicted x0 for the sigma-parameterised (k-diffusion) schedulers Euler and LMS."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")
