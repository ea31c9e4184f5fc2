"""Pre-computed VAE latents and text embeddings for DreamBooth (`data.cache_latents`,
`data.cache_text_embeddings`).

The VAE is frozen, and with centered crops an image's encoder output never changes, so encoding
each training image once before the loop saves the encoder's forward pass on every step (about a
third of the step's FLOPs at 512 px with a frozen text encoder). What is cached is the posterior's
moments, not a latent sample: the step still draws `mean + std * N(0, 1)` with its own PRNG key,
so a cached run follows the same random stream as an uncached one. Random flips stay available:
both orientations of every image are encoded (the latent of a flipped image is not the flipped
latent). Random crops cannot be cached and are rejected by the config.

With a frozen text encoder the two prompts' `last_hidden_state` are likewise computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.trainers.dreambooth.data import ImageSet, crop, to_model_range


class LatentCache:
    """The VAE posterior moments of every image (and its mirror image) of an `ImageSet`.

    Args:
      images: a set with centered crops (`random_crop=False`).
      encode: `[n, size, size, 3]` in [-1, 1] → `[n, size/f, size/f, 2 * latent_channels]` moments
        (mean, then log-variance, as `DiagonalGaussian.from_moments` reads them).
      batch_size: images per `encode` call (the last chunk is padded, so one shape compiles).
    """

    def __init__(self, images: ImageSet, encode: Callable[[np.ndarray], Any], batch_size: int = 8):
        if images.random_crop:
            raise ValueError("latents can only be cached for centered crops")
        self.images = images
        crops = np.stack([crop(image, images.size, None) for image in images.images])
        flips = (False, True) if images.random_flip else (False,)
        self.moments = {flip: _encode_all(crops[:, :, ::-1] if flip else crops, encode, batch_size) for flip in flips}

    def batch(self, seed: int, step: int, count: int, stream: int = 0) -> np.ndarray:
        """`[count, size/f, size/f, 2 * latent_channels]` for the rows `ImageSet.batch` would draw."""
        return np.stack([self.moments[flip][index] for index, _, flip in self.images.draws(seed, step, count, stream)])

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.moments.values())


def _encode_all(crops: np.ndarray, encode: Callable[[np.ndarray], Any], batch_size: int) -> np.ndarray:
    """Moments of every uint8 crop `[n, size, size, 3]`, encoded `batch_size` at a time."""
    out = []
    for start in range(0, len(crops), batch_size):
        chunk = to_model_range(crops[start : start + batch_size])
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(encode(chunk))[: batch_size - pad])
    return np.concatenate(out)


def vae_moments_fn(vae: Any, params: Any) -> Callable[[np.ndarray], jax.Array]:
    """A jitted `images → moments` for `LatentCache` (the VAE's `encode`, mean ++ log-variance)."""

    @jax.jit
    def encode(images: jax.Array) -> jax.Array:
        posterior = vae.apply({"params": params}, images, method="encode")
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1).astype(jnp.float32)

    return encode


def text_embeddings(text_encoder: Any, params: Any, input_ids: np.ndarray) -> np.ndarray:
    """`[prompts, tokens, hidden]` float32: the frozen text encoder's `last_hidden_state`."""
    out = jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids).last_hidden_state)(params, input_ids)
    return np.asarray(out, np.float32)
