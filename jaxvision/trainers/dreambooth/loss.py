"""The DreamBooth objective (Ruiz et al., 2022), as diffusers' `train_dreambooth.py` computes it.

For a batch of instance rows (and as many class rows with prior preservation): VAE-encode, sample
the posterior, scale by `scaling_factor`; draw noise and uniform training timesteps; noise the
latents with the base model's DDPM schedule; predict with the UNet conditioned on the prompt's
CLIP embedding; regress onto the noise (epsilon) or the velocity (v-prediction), as the base
model's scheduler config says. The loss is the instance MSE plus `train.prior_loss_weight` times
the class MSE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.diffusion.schedule import add_noise, get_velocity
from jaxvision.errors import ConfigError
from jaxvision.models.vae import DiagonalGaussian
from jaxvision.trainers.dreambooth.config import DreamBoothTrainSection

PREDICTION_TYPES = ("epsilon", "v_prediction")


def dreambooth_loss(
    params: dict,
    latents: jax.Array,
    input_ids: jax.Array | None,
    noise: jax.Array,
    timesteps: jax.Array,
    prior_mask: jax.Array,
    *,
    unet: Any,
    text_encoder: Any,
    alphas_cumprod: jax.Array,
    prediction_type: str,
    prior_loss_weight: float,
    snr_gamma: float | None = None,
    context: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DreamBooth loss for given latents, noise and timesteps (the pure, testable core).

    Args:
      params: `{"unet": ..., "text_encoder": ...}` (extra entries are ignored).
      latents: `[batch, h, w, c]` VAE latents, already multiplied by `scaling_factor`.
      input_ids: `[batch, tokens]` prompt token ids.
      noise: `[batch, h, w, c]` the noise to add.
      timesteps: `[batch]` int training timesteps.
      prior_mask: `[batch]` 1.0 for class (prior-preservation) rows, 0.0 for instance rows.
      unet, text_encoder: the Flax modules.
      alphas_cumprod: `[num_train_timesteps]` of the base model's training schedule.
      prediction_type: "epsilon" or "v_prediction".
      prior_loss_weight: weight of the class rows' MSE.
      snr_gamma: min-SNR-γ weighting of the instance rows' MSE, or None.
      context: `[batch, tokens, hidden]` pre-computed text-encoder states of a frozen text encoder
        (`data.cache_text_embeddings`); `input_ids` is then unused.
    Returns:
      `(loss, {"instance_loss", "prior_loss"})`, fp32 scalars: loss = mean MSE of the instance
      rows + `prior_loss_weight` × mean MSE of the class rows (each 0 when it has no rows).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type={prediction_type!r}: DreamBooth trains {', '.join(PREDICTION_TYPES)}")
    latents = latents.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    if context is None:
        context = text_encoder.apply({"params": params["text_encoder"]}, input_ids).last_hidden_state
    noisy = add_noise(alphas_cumprod, latents, noise, timesteps)
    pred = unet.apply({"params": params["unet"]}, noisy, timesteps, context).astype(jnp.float32)
    target = noise if prediction_type == "epsilon" else get_velocity(alphas_cumprod, latents, noise, timesteps)
    per_sample = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
    prior_mask = prior_mask.astype(jnp.float32)
    instance_mask = 1.0 - prior_mask
    instance_per_sample = per_sample
    if snr_gamma is not None:
        # As diffusers' train_dreambooth.py: min(SNR, γ) / SNR on the instance rows only, floored
        # at an SNR weight of one (+1) for v-prediction; the prior loss stays unweighted.
        a = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
        snr = a / (1.0 - a)
        weight = jnp.minimum(snr, snr_gamma) / snr
        instance_per_sample = per_sample * (weight + 1.0 if prediction_type == "v_prediction" else weight)
    instance_loss = jnp.sum(instance_mask * instance_per_sample) / jnp.maximum(jnp.sum(instance_mask), 1.0)
    prior_loss = jnp.sum(prior_mask * per_sample) / jnp.maximum(jnp.sum(prior_mask), 1.0)
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, {"instance_loss": instance_loss, "prior_loss": prior_loss}


def make_loss_fn(
    unet: Any,
    text_encoder: Any,
    vae: Any,
    alphas_cumprod: np.ndarray,
    prediction_type: str,
    train: DreamBoothTrainSection,
) -> Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]:
    """`loss_fn(params, batch, rng)` for `make_train_step`: VAE-encodes `batch["pixel_values"]`,
    draws the posterior sample, noise (plus offset noise) and timesteps from `rng`, then
    `dreambooth_loss`. `params` is `{"unet", "text_encoder", "vae"}`; batch rows are
    `pixel_values` `[B, H, W, 3]` in [-1, 1], `input_ids` `[B, tokens]`, `prior_mask` `[B]`; with the
    caches of `trainers.dreambooth.cache`, `latent_moments` `[B, h, w, 2c]` replaces `pixel_values` and
    `context` `[B, tokens, hidden]` replaces `input_ids`."""
    # The schedule is a 1000-float hyperparameter of the model, baked in like a constant.
    alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
    num_train_timesteps = alphas_cumprod.shape[0]
    scaling_factor = vae.config.scaling_factor

    def loss_fn(params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        vae_key, noise_key, t_key, offset_key = jax.random.split(rng, 4)
        if "latent_moments" in batch:  # encoded once before training (data.cache_latents)
            posterior = DiagonalGaussian.from_moments(batch["latent_moments"])
        else:
            posterior = vae.apply({"params": params["vae"]}, batch["pixel_values"], method="encode")
        latents = jax.lax.stop_gradient(posterior.sample(vae_key).astype(jnp.float32) * scaling_factor)
        noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
        if train.offset_noise:
            b, c = latents.shape[0], latents.shape[-1]
            noise = noise + train.offset_noise * jax.random.normal(offset_key, (b, 1, 1, c), jnp.float32)
        timesteps = jax.random.randint(t_key, (latents.shape[0],), 0, num_train_timesteps)
        return dreambooth_loss(
            params,
            latents,
            batch.get("input_ids"),  # None with cached prompt states (then `context` is given)
            noise,
            timesteps,
            batch["prior_mask"],
            unet=unet,
            text_encoder=text_encoder,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            prior_loss_weight=train.prior_loss_weight,
            snr_gamma=train.snr_gamma,
            context=batch.get("context"),
        )

    return loss_fn
