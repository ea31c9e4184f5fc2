"""`StableDiffusionPipeline`: text-to-image and image-to-image with the whole denoising loop,
classifier-free guidance included, inside one `jax.jit`.

The jitted function takes every array — params, token ids, start latents, guidance scale,
scheduler state, PRNG keys, init images — as an argument, so new prompts, seeds, guidance
scales and init images reuse the compiled program; it compiles once per (batch, resolution,
steps, scheduler, CFG on/off, start step). Image-to-image (`image=`, `strength=`) encodes the
init images with the VAE, noises them to the start step (`scheduler.add_noise_at`) and runs the
same loop from that step, all in the same program, as diffusers' `StableDiffusionImg2ImgPipeline`.
Batches are sharded over all devices along a "data" mesh axis with `NamedSharding` (a batch that
does not divide over the devices is padded with copies of its last row, which are dropped from the
output); params are replicated. The attention and convolution kernels are chosen for the mesh's
device platform (`jaxvision.models.kernels.resolve`), so one pipeline object compiles the right
program for whichever mesh it is called with.
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
from jaxvision.models import kernels
from jaxvision.tokenizer import tokenize

OUTPUT_TYPES = ("pil", "np", "latent")
# Each image's seed key is split by purpose, so adding a purpose never changes the others.
# VAE_SAMPLE draws the image-to-image VAE posterior sample (diffusers' `latent_dist.sample`).
START_NOISE, STEP_NOISE, VAE_SAMPLE = 0, 1, 2
# How image-to-image init images arrive in the jitted sampler: pixels to VAE-encode, or latents.
PIXELS, LATENTS = "pixels", "latents"
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
    init_mode: str | None,
    params: dict,
    input_ids: jax.Array,
    uncond_ids: jax.Array,
    latents: jax.Array,
    guidance_scale: jax.Array,
    sched_state: Any,
    keys: jax.Array,
    init: jax.Array | None = None,
    *,
    scaling_factor: float,
    shift_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """Text encoding, (image-to-image) VAE encoding and noising, the scheduler loop from
    `start_index` and VAE decoding; traced once per static configuration.

    Args:
      init_mode: None (text-to-image), `PIXELS` or `LATENTS` (image-to-image; what `init` holds).
      input_ids / uncond_ids: `[batch, 77]` prompt and negative-prompt token ids.
      latents: `[batch, h, w, c]` start latents, already multiplied by `init_noise_sigma`; for
        image-to-image, the unscaled noise that `add_noise_at` mixes into the init latents.
      sched_state: from `set_timesteps` then `set_begin_index(start_index)`.
      keys: `[batch]` PRNG keys, one per image (VAE posterior sample, ancestral / DDPM noise).
      init: `[batch, H, W, 3]` init images in [-1, 1] (`PIXELS`) or `[batch, h, w, c]` init latents,
        already scaled by the VAE scaling factor (`LATENTS`).
    Returns:
      `(final_latents, images)`: `[batch, h, w, c]` and `[batch, H, W, 3]` in [0, 1].
    """
    if init_mode is not None:
        if init_mode == PIXELS:
            posterior = vae.apply({"params": params["vae"]}, init, method="encode")
            mean, std = posterior.mean.astype(jnp.float32), posterior.std.astype(jnp.float32)
            eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, VAE_SAMPLE), mean.shape[1:]))(keys)
            init = ((mean + std * eps) - shift_factor) * scaling_factor
        latents = scheduler.add_noise_at(sched_state, init.astype(latents.dtype), latents, start_index)

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
    """Text-to-image and image-to-image sampling for Stable Diffusion 1.x / 2.x checkpoints in
    diffusers layout.

    `StableDiffusionPipeline.from_pretrained(path)(prompt, ...)` mirrors diffusers'
    `StableDiffusionPipeline.__call__` (see DESIGN.md for the argument list); with `image=` and
    `strength=` it mirrors `StableDiffusionImg2ImgPipeline.__call__`.
    """

    def __init__(
        self,
        components: StableDiffusionComponents,
        *,
        default_scheduler: str | None = None,
        mesh: Mesh | None = None,
        attention_impl: str | None = "auto",
        conv_impl: str = "auto",
    ):
        """Args:
        components: the loaded networks, tokenizer and scheduler config.
        default_scheduler: the sampler's name when a call gives none (default: the checkpoint's).
        mesh: the default 1-axis ("data",) mesh of the calls (default: all devices).
        attention_impl, conv_impl: kernel choices; "auto" picks them for the mesh's platform.
        """
        self.components = components
        self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), ("data",))
        self.attention_impl = attention_impl
        self.conv_impl = conv_impl
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

    def _networks(self, mesh: Mesh) -> tuple[Any, Any, Any]:
        """The text encoder, UNet and VAE with the kernels chosen for `mesh`'s platform."""
        c = self.components
        platform = kernels.platform_of(mesh)
        chosen = [
            kernels.resolve(platform, attention=self.attention_impl, conv=self.conv_impl, dtype=m.dtype)
            for m in (c.text_encoder, c.unet, c.vae)
        ]
        text_encoder, unet, vae = (
            kernels.with_kernels(m, k) for m, k in zip((c.text_encoder, c.unet, c.vae), chosen, strict=True)
        )
        return text_encoder, unet, vae

    def _sampler(self, key: tuple, mesh: Mesh) -> Any:
        key = (*key, mesh)  # a program is compiled for its mesh (devices and kernels)
        if key not in self._compiled:
            scheduler, num_loop_steps, do_cfg, start_index, init_mode = key[:5]
            c = self.components
            text_encoder, unet, vae = self._networks(mesh)

            def traced(*args):
                self.trace_count += 1
                return _sample(
                    text_encoder,
                    unet,
                    vae,
                    scheduler,
                    num_loop_steps,
                    do_cfg,
                    start_index,
                    init_mode,
                    *args,
                    scaling_factor=c.vae.config.scaling_factor,
                    shift_factor=c.vae.config.shift_factor or 0.0,
                )

            batch = NamedSharding(mesh, P("data"))
            replicated = NamedSharding(mesh, P())
            in_shardings = (replicated, batch, batch, batch, replicated, replicated, batch)
            self._compiled[key] = jax.jit(
                traced,
                in_shardings=in_shardings + ((batch,) if init_mode else ()),
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
        image: Any = None,
        strength: float = 0.8,
    ) -> list | np.ndarray:
        """Generates images (from text, or from init images when `image` is given).

        Args:
          prompt: one prompt or a list (one image each, times `num_images_per_prompt`).
          negative_prompt: replaces the empty unconditional prompt of CFG.
          num_inference_steps: scheduler steps (> 0).
          guidance_scale: CFG weight; ≤ 1 disables guidance (one UNet pass per step), as diffusers.
          height, width: pixels, multiples of 8; default the UNet's `sample_size * 8` (with
            `image`: the init image's size, rounded down to a multiple of 8).
          seed: an int (image i uses seed + i) or one seed per image. Each image's seed gives its
            start noise, its step noise and (image-to-image) its VAE posterior sample.
          scheduler: a name from `SCHEDULERS`; default the checkpoint's scheduler.
          latents: optional `[batch, h, w, c]` start noise (NHWC, unscaled, as diffusers takes it).
            With `image` it is the noise mixed into the init latents at the start step, which
            diffusers' img2img draws from its generator (pass it to reproduce a run exactly).
          output_type: "pil" (list of PIL images), "np" (`[batch, H, W, 3]` floats in [0, 1]) or
            "latent" (the final latents before VAE decoding).
          mesh: a 1-axis ("data",) mesh; default the pipeline's (all devices). A batch that does
            not divide over it is padded and the padding dropped from the result.
          image: init image(s) for image-to-image: a PIL image or a list of them (converted to
            RGB and resized with Lanczos to (width, height), or to their own size rounded down
            to a multiple of 8, as diffusers' `VaeImageProcessor`), or float32 `[H, W, 3]` /
            `[n, H, W, 3]` in [0, 1] (used at their size, which must be a multiple of 8), or,
            as diffusers accepts, `[h, w, c]` / `[n, h, w, c]` arrays with the UNet's latent
            channel count, taken as init latents already scaled by the VAE scaling factor. One
            image serves every prompt; else one per prompt (each repeated
            `num_images_per_prompt` times).
          strength: in (0, 1]: how far into the noise schedule the init images are pushed; the
            last `int(num_inference_steps * strength)` steps run (diffusers' `get_timesteps`).

        Raises:
          ValueError: a bad argument (the message names it and the valid range).
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
        init_mode, init = None, None
        if image is not None:
            init_mode, init = _init_images(image, height, width, factor, c.unet.config.in_channels)
            init = _match_batch(init, len(prompts) // num_images_per_prompt, num_images_per_prompt)
            scale = factor if init_mode == LATENTS else 1
            height, width = init.shape[1] * scale, init.shape[2] * scale
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
        shape = (batch, height // factor, width // factor, c.unet.config.in_channels)
        seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape} (NHWC), got {latents.shape}")
        # Pad the batch to a multiple of the devices with copies of the last row (dropped below):
        # an image depends only on its own seed and prompt, so the real rows are unchanged.
        mesh = mesh if mesh is not None else self.mesh
        pad = -batch % mesh.size
        if pad:
            prompts, negatives, seeds = (x + x[-1:] * pad for x in (prompts, negatives, seeds))
            if latents is not None:
                latents = jnp.concatenate([latents, jnp.repeat(latents[-1:], pad, axis=0)])
            if init is not None:
                init = jnp.concatenate([init, jnp.repeat(init[-1:], pad, axis=0)])
            shape = (batch + pad, *shape[1:])
        sched = make_scheduler(name, c.scheduler_config)
        state = sched.set_timesteps(num_inference_steps, shape)
        num_loop_steps = int(state.timesteps.shape[0])
        start_index = 0
        if image is not None:
            start_index = _start_index(num_inference_steps, strength) * sched.order
            state = sched.set_begin_index(state, start_index)
        keys = jnp.stack([jax.random.key(s) for s in seeds])
        if latents is None:
            latents = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, START_NOISE), shape[1:]))(keys)
        if init_mode is None:
            latents = latents * state.init_noise_sigma  # image-to-image noise is scaled by add_noise_at

        do_cfg = guidance_scale > 1.0
        sampler = self._sampler((sched, num_loop_steps, do_cfg, start_index, init_mode, shape), mesh)
        input_ids = tokenize(c.tokenizer, prompts)
        uncond_ids = tokenize(c.tokenizer, negatives)
        args = (self.params, input_ids, uncond_ids, latents, jnp.float32(guidance_scale), state, keys)
        final, images = sampler(*args, *(() if init is None else (init,)))
        final, images = final[:batch], images[:batch]
        if output_type == "latent":
            return np.asarray(final)
        images = np.asarray(images)
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


def _start_index(num_inference_steps: int, strength: float) -> int:
    """diffusers' img2img `get_timesteps`: the first of the last `int(steps * strength)` steps."""
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep == 0:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising step "
            f"(int(steps * strength) = 0); raise strength or num_inference_steps"
        )
    return max(num_inference_steps - init_timestep, 0)


def _init_images(
    image: Any, height: int | None, width: int | None, factor: int, latent_channels: int
) -> tuple[str, jax.Array]:
    """Image-to-image inputs as diffusers' `VaeImageProcessor.preprocess` prepares them.

    Returns:
      `(PIXELS, [n, H, W, 3] in [-1, 1])` or `(LATENTS, [n, h, w, latent_channels])`, float32.
    """
    from PIL import Image

    pils = image if isinstance(image, (list, tuple)) else [image]
    if pils and all(isinstance(im, Image.Image) for im in pils):
        from jaxvision.image import to_rgb

        # diffusers sizes every image like the first one, rounded down to a multiple of the VAE
        # factor (8 for every SD checkpoint); the sampler needs multiples of 8 in any case.
        multiple = max(factor, 8)
        w, h = width or pils[0].width, height or pils[0].height
        w, h = w - w % multiple, h - h % multiple
        if w <= 0 or h <= 0:
            raise ValueError(f"image of size {pils[0].size} is smaller than {multiple} pixels; it cannot be encoded")
        resized = [to_rgb(im).resize((w, h), resample=Image.Resampling.LANCZOS) for im in pils]
        pixels = np.stack([np.asarray(im, np.float32) / 255.0 for im in resized])
        return PIXELS, jnp.asarray(pixels * 2.0 - 1.0)
    if isinstance(image, (list, tuple)):
        raise ValueError("image as a list must hold PIL images; pass arrays as one [n, H, W, 3] array")
    arr = np.asarray(image, np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (3, latent_channels):
        raise ValueError(
            f"image must be a PIL image, or an [H, W, 3] / [n, H, W, 3] array (or [h, w, {latent_channels}] "
            f"latents), got shape {arr.shape}"
        )
    if arr.shape[-1] == latent_channels:
        expected = (height or arr.shape[1] * factor, width or arr.shape[2] * factor)
        if (arr.shape[1] * factor, arr.shape[2] * factor) != expected:
            raise ValueError(f"init latents of shape {arr.shape} do not match height x width {expected}")
        return LATENTS, jnp.asarray(arr)
    if arr.shape[1] % 8 or arr.shape[2] % 8:
        raise ValueError(
            f"image arrays are used at their size, which must be a multiple of 8; got "
            f"{arr.shape[1]}x{arr.shape[2]} (resize it, or pass a PIL image)"
        )
    if (height or arr.shape[1], width or arr.shape[2]) != arr.shape[1:3]:
        raise ValueError(f"image array is {arr.shape[1]}x{arr.shape[2]} but height x width is {height}x{width}")
    if arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"image arrays must hold values in [0, 1], got [{arr.min()}, {arr.max()}]")
    return PIXELS, jnp.asarray(arr * 2.0 - 1.0)


def _match_batch(init: jax.Array, num_prompts: int, num_images_per_prompt: int) -> jax.Array:
    """One init image for all prompts, or one per prompt; each repeated per image of its prompt."""
    if init.shape[0] == 1:
        return jnp.repeat(init, num_prompts * num_images_per_prompt, axis=0)
    if init.shape[0] != num_prompts:
        raise ValueError(f"got {init.shape[0]} init images for {num_prompts} prompts; pass one, or one per prompt")
    return jnp.repeat(init, num_images_per_prompt, axis=0)


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
