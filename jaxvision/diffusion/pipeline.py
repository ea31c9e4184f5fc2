"""`StableDiffusionPipeline`: text-to-image with the whole denoising loop,
classifier-free guidance included, inside one `jax.jit`.

The jitted function takes every array — params, token ids, start latents, guidance scale,
scheduler state, PRNG keys — as an argument, so new prompts, seeds and guidance scales reuse
the compiled program; it compiles once per (batch, resolution, steps, scheduler, CFG on/off).
Batches are sharded over all devices along a "data" mesh axis with `NamedSharding`; params are
replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvision.diffusion.components import StableDiffusionComponents, load_components
from jaxvision.diffusion.ddpm import DDPMScheduler
from jaxvision.diffusion.euler import EulerAncestralDiscreteScheduler
from jaxvision.diffusion.registry import SCHEDULERS, make_scheduler
from jaxvision.tokenizer import tokenize

OUTPUT_TYPES = ("pil", "np", "latent")
# Each image's seed key is split by purpose, so adding a purpose never changes the others.
START_NOISE, STEP_NOISE = 0, 1
# Schedulers that inject fresh noise each step (they take it as an explicit `noise` argument).
STOCHASTIC = (DDPMScheduler, EulerAncestralDiscreteScheduler)


def _sample(
    text_encoder,
    unet,
    vae,
    scheduler,
    num_loop_steps: int,
    do_cfg: bool,
    start_index: int,
    params: dict,
    input_ids: jax.Array,
    uncond_ids: jax.Array,
    latents: jax.Array,
    guidance_scale: jax.Array,
    sched_state: Any,
    keys: jax.Array,
    scaling_factor: float,
    shift_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """Text encoding, the scheduler loop and VAE decoding; traced once per static configuration.

    Args:
      input_ids / uncond_ids: `[batch, 77]` prompt and negative-prompt token ids.
      latents: `[batch, h, w, c]` start latents, already multiplied by `init_noise_sigma`.
      keys: `[batch]` PRNG keys, one per image (ancestral / DDPM noise).
    Returns:
      `(final_latents, images)`: `[batch, h, w, c]` and `[batch, H, W, 3]` in [0, 1].
    """
    embeds = text_encoder.apply({"params": params["text_encoder"]}, input_ids).last_hidden_state
    if do_cfg:
        uncond = text_encoder.apply({"params": params["text_encoder"]}, uncond_ids).last_hidden_state
        embeds = jnp.concatenate([uncond, embeds])

    def body(i, carry):
        x, state = carry
        t = state.timesteps[i]
        model_in = jnp.concatenate([x, x]) if do_cfg else x
        model_in = scheduler.scale_model_input(state, model_in, i)
        out = unet.apply({"params": params["unet"]}, model_in, jnp.broadcast_to(t, (model_in.shape[0],)), embeds)
        if do_cfg:
            out_uncond, out_text = jnp.split(out, 2)
            out = out_uncond + guidance_scale * (out_text - out_uncond)
        if isinstance(scheduler, STOCHASTIC):
            # one key per image and step, so each image is reproducible from its own seed
            step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, STEP_NOISE), i))(keys)
            noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(step_keys)
            x, state = scheduler.step(state, out.astype(x.dtype), i, x, noise=noise)
        else:
            x, state = scheduler.step(state, out.astype(x.dtype), i, x)
        return x, state

    latents, _ = jax.lax.fori_loop(start_index, num_loop_steps, body, (latents, sched_state))
    z = latents / scaling_factor + shift_factor
    images = vae.apply({"params": params["vae"]}, z, method="decode")
    images = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return latents, images


class StableDiffusionPipeline:
    """Text-to-image sampling for Stable Diffusion 1.x / 2.x checkpoints in diffusers layout.

    `StableDiffusionPipeline.from_pretrained(path)(prompt, ...)` mirrors diffusers'
    `StableDiffusionPipeline.__call__` (see DESIGN.md for the argument list).
    """

    def __init__(self, components: StableDiffusionComponents, *, default_scheduler: str | None = None):
        self.components = components
        self.params = {
            "text_encoder": components.text_encoder_params,
            "unet": components.unet_params,
            "vae": components.vae_params,
        }
        self.default_scheduler = default_scheduler or _name_for_class(components.scheduler_config)
        self._compiled: dict[tuple, Any] = {}
        self.trace_count = 0  # how many times the sampler was traced (tests assert it stays put)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> StableDiffusionPipeline:
        """Loads a local diffusers directory (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
        `tokenizer/`, `scheduler/`); kwargs go to `load_components` (dtype, param_dtype, variant)."""
        return cls(load_components(path, **kwargs))

    def _sampler(self, key: tuple, mesh: Mesh) -> Any:
        if key not in self._compiled:
            scheduler, num_loop_steps, do_cfg, start_index = key[:4]
            c = self.components

            def traced(*args):
                self.trace_count += 1
                return _sample(
                    c.text_encoder,
                    c.unet,
                    c.vae,
                    scheduler,
                    num_loop_steps,
                    do_cfg,
                    start_index,
                    *args,
                    scaling_factor=c.vae.config.scaling_factor,
                    shift_factor=c.vae.config.shift_factor or 0.0,
                )

            batch = NamedSharding(mesh, P("data"))
            replicated = NamedSharding(mesh, P())
            self._compiled[key] = jax.jit(
                traced,
                in_shardings=(replicated, batch, batch, batch, replicated, replicated, batch),
                out_shardings=(batch, batch),
            )
        return self._compiled[key]

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] = 0,
        scheduler: str | None = None,
        latents: np.ndarray | jax.Array | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        mesh: Mesh | None = None,
    ) -> list | np.ndarray:
        """Generates images.

        Args:
          prompt: one prompt or a list (one image each, times `num_images_per_prompt`).
          negative_prompt: replaces the empty unconditional prompt of CFG.
          num_inference_steps: scheduler steps (> 0).
          guidance_scale: CFG weight; ≤ 1 disables guidance (one UNet pass per step), as diffusers.
          height, width: pixels, multiples of 8; default the UNet's `sample_size * 8`.
          seed: an int (image i uses seed + i) or one seed per image.
          scheduler: a name from `SCHEDULERS`; default the checkpoint's scheduler.
          latents: optional `[batch, h, w, c]` start noise (NHWC, unscaled, as diffusers takes it).
          output_type: "pil" (list of PIL images), "np" (`[batch, H, W, 3]` floats in [0, 1]) or
            "latent" (the final latents before VAE decoding).
          mesh: a 1-axis ("data",) mesh; default all devices.
        """
        c = self.components
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        factor = c.vae_scale_factor
        height = height or c.unet.config.sample_size * factor
        width = width or c.unet.config.sample_size * factor
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        name = scheduler or self.default_scheduler
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; valid names are {sorted(SCHEDULERS)}")
        sched = make_scheduler(name, c.scheduler_config)
        shape = (batch, height // factor, width // factor, c.unet.config.in_channels)
        state = sched.set_timesteps(num_inference_steps, shape)
        num_loop_steps = int(state.timesteps.shape[0])

        seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")
        keys = jnp.stack([jax.random.key(s) for s in seeds])
        start_index = 0
        if latents is None:
            latents = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, START_NOISE), shape[1:]))(keys)
            latents = latents * state.init_noise_sigma
        else:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape} (NHWC), got {latents.shape}")
            latents = latents * state.init_noise_sigma

        do_cfg = guidance_scale > 1.0
        mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
        if batch % mesh.size:
            raise ValueError(f"the batch ({batch} images) must divide evenly over the {mesh.size} devices")
        sampler = self._sampler((sched, num_loop_steps, do_cfg, start_index, shape), mesh)
        input_ids = tokenize(c.tokenizer, prompts)
        uncond_ids = tokenize(c.tokenizer, negatives)
        final, images = sampler(self.params, input_ids, uncond_ids, latents, jnp.float32(guidance_scale), state, keys)
        if output_type == "latent":
            return np.asarray(final)
        images = np.asarray(images)
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


def _name_for_class(scheduler_config: dict) -> str:
    by_class = {cls.diffusers_class: name for name, (cls, overrides) in SCHEDULERS.items() if not overrides}
    return by_class.get(scheduler_config.get("_class_name", ""), "pndm")


def image_grid(images: Sequence[Any], rows: int | None = None) -> Any:
    """Tiles equally sized PIL images into one PIL image, `rows` rows (default: near-square)."""
    from PIL import Image

    n = len(images)
    rows = rows or max(1, int(np.floor(np.sqrt(n))))
    cols = -(-n // rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def generate_to_dir(
    pipe: StableDiffusionPipeline, prompt: str, out_dir: str | Path, *, num_images: int = 4, log=print, **kwargs: Any
) -> list[Path]:
    """Samples `num_images` images of `prompt`, writes `out_dir/{i:03d}.png` and `out_dir/grid.png`.

    The first call of a configuration compiles it, so `log` says so before sampling starts and
    reports the time taken; kwargs go to the pipeline call.
    """
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"sampling {num_images} image(s) (the first run of a configuration compiles it, which takes a while) ...")
    images = pipe([prompt] * num_images, output_type="pil", **kwargs)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    paths = []
    for i, im in enumerate(images):
        paths.append(out_dir / f"{i:03d}.png")
        im.save(paths[-1])
    image_grid(images).save(out_dir / "grid.png")
    paths.append(out_dir / "grid.png")
    return paths
