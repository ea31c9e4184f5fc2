"""DreamBooth fine-tuning of Stable Diffusion (Ruiz et al., 2022), as diffusers' `train_dreambooth.py`.

`run(config)` reads top to bottom in phases — mesh, model, data (class images generated first when
prior preservation needs them), shard, step, restore, loop, export — on the training core of
`jaxvision.train`. The UNet is trained; the text encoder too when `train.train_text_encoder` is
set; the VAE never. Frozen networks leave the train state (`train.freeze` regexes `^vae/`,
`^text_encoder/`), so they get no gradients, no optimizer state and are never checkpointed.

One step, for a batch of `train.batch_size` instance images (and as many class images with
prior preservation): VAE-encode, sample the posterior, scale by `scaling_factor`; draw noise and
uniform training timesteps; noise the latents with the base model's DDPM schedule; predict with
the UNet conditioned on the prompt's CLIP embedding; regress onto the noise (epsilon) or the
velocity (v-prediction), as the base model's scheduler config says. The loss is the instance MSE
plus `train.prior_loss_weight` times the class MSE (`dreambooth_loss`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxvision.diffusion.ddpm import DDPMScheduler
from jaxvision.diffusion.schedule import add_noise, get_velocity
from jaxvision.errors import ConfigError
from jaxvision.models.vae import DiagonalGaussian
from jaxvision.trainers.dreambooth import outputs
from jaxvision.train import lora as lora_lib
from jaxvision.train.config import format_config, save_resolved, to_yaml
from jaxvision.trainers.dreambooth.config import (  # noqa: F401 (re-exported: the trainer's schema and loader)
    PLAN_VARIANTS,
    DataSection,
    DreamBoothConfig,
    DreamBoothModelSection,
    DreamBoothTrainSection,
    ValidationSection,
    load,
)

PREDICTION_TYPES = ("epsilon", "v_prediction")
# The SD 1.x / 2.x training schedule, used by `plan` when no scheduler config is on disk.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ----------------------------------------------------------------------------- loss


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
    caches of `dreambooth_cache`, `latent_moments` `[B, h, w, 2c]` replaces `pixel_values` and
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


# ----------------------------------------------------------------------------- shared pieces


def optimizer_config(cfg: DreamBoothConfig) -> Any:
    """The Optax chain's config: the train section, plus the frozen VAE (and text encoder, and with
    LoRA every base weight: only the adapters train)."""
    from jaxvision.train.optimizers import OptimizerConfig

    t = cfg.train
    freeze = (*t.freeze, r"^vae/") + (() if t.train_text_encoder else (r"^text_encoder/",))
    freeze += (lora_lib.FREEZE_BASE,) if t.lora.enabled else ()
    config = OptimizerConfig.from_train_section(t, freeze)
    if t.train_text_encoder and t.text_encoder_learning_rate is not None:
        config = dataclasses.replace(config, lr_groups=((r"(^|/)text_encoder/", t.text_encoder_learning_rate),))
    return config


def add_adapters(cfg: DreamBoothConfig, params: dict, rng: jax.Array) -> dict:
    """`params` plus fresh LoRA adapters (none when `train.lora.rank` is 0) for the trained networks."""
    if not cfg.train.lora.enabled:
        return params
    from jaxvision.train.freeze import merge_params

    networks = ("unet", "text_encoder") if cfg.train.train_text_encoder else ("unet",)
    return merge_params(params, lora_lib.init_lora(params, cfg.train.lora, networks, jax.random.fold_in(rng, 1)))


def rows_per_step(cfg: DreamBoothConfig) -> int:
    """Rows of one global batch: the instance images, and as many class images with prior preservation."""
    return cfg.train.batch_size * (2 if cfg.prior_preservation else 1)


def _batch_spec(cfg: DreamBoothConfig, text_config: Any, vae_config: Any) -> dict[str, jax.ShapeDtypeStruct]:
    n, r, tokens = rows_per_step(cfg), cfg.data.resolution, text_config.max_position_embeddings
    spec = {"prior_mask": jax.ShapeDtypeStruct((n,), jnp.float32)}
    if cfg.data.cache_latents:
        h = r // 2 ** (len(vae_config.block_out_channels) - 1)
        spec["latent_moments"] = jax.ShapeDtypeStruct((n, h, h, 2 * vae_config.latent_channels), jnp.float32)
    else:
        spec["pixel_values"] = jax.ShapeDtypeStruct((n, r, r, 3), jnp.float32)
    if cfg.data.cache_text_embeddings:
        spec["context"] = jax.ShapeDtypeStruct((n, tokens, text_config.hidden_size), jnp.float32)
    else:
        spec["input_ids"] = jax.ShapeDtypeStruct((n, tokens), jnp.int32)
    return spec


def compile_step(cfg: DreamBoothConfig, mesh: Any, unet: Any, text_encoder: Any, vae: Any, scheduler_config: dict):
    """The AOT-compiled DreamBooth train step, shared by `run`, `plan` and the benchmarks.

    Returns:
      `(init_fn, optimizer, rng, step)`: the shape-only init of `{"unet", "text_encoder", "vae"}`
      (plus adapters with LoRA), the Optax chain, the state's PRNG key, and the compiled step
      (`step.abstract_state` / `step.abstract_frozen` carry the shardings).
    """
    from jaxvision.models import clip_text as clip_lib
    from jaxvision.models import unet as unet_lib
    from jaxvision.models import vae as vae_lib
    from jaxvision.train.optimizers import make_optimizer
    from jaxvision.train.state import abstract_train_state
    from jaxvision.train.step import make_train_step

    ddpm = DDPMScheduler.from_config(scheduler_config)
    if ddpm.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"scheduler config prediction_type={ddpm.prediction_type!r}: DreamBooth trains "
            f"{', '.join(PREDICTION_TYPES)} models"
        )

    def zeros(specs: tuple[jax.ShapeDtypeStruct, ...]) -> list[jax.Array]:
        return [jnp.zeros(s.shape, s.dtype) for s in specs]

    def init_fn(rng: jax.Array) -> dict:
        # Only ever traced shape-only (for logical axis names and shapes); the weights are loaded.
        k1, k2, k3 = jax.random.split(rng, 3)
        params = {
            "unet": unet.init(k1, *zeros(unet_lib.example_inputs(unet.config)))["params"],
            "text_encoder": text_encoder.init(k2, *zeros(clip_lib.example_inputs(text_encoder.config)))["params"],
            "vae": vae.init(k3, *zeros(vae_lib.example_inputs(vae.config)))["params"],
        }
        return add_adapters(cfg, params, rng)

    optimizer = make_optimizer(optimizer_config(cfg))
    rng = jax.random.PRNGKey(cfg.train.seed)
    abstract_state, abstract_frozen = abstract_train_state(init_fn, optimizer, rng, mesh)
    loss_fn = make_loss_fn(unet, text_encoder, vae, ddpm.train_state(), ddpm.prediction_type, cfg.train)
    # With LoRA the adapted kernels are merged inside the step (a no-op without adapters).
    loss_fn = lora_lib.lora_loss(loss_fn, cfg.train.lora.scale)
    spec = _batch_spec(cfg, text_encoder.config, vae.config)
    step = make_train_step(loss_fn, optimizer, mesh, abstract_state, abstract_frozen, spec, has_aux=True)
    return init_fn, optimizer, rng, step


def modules_kwargs(cfg: DreamBoothConfig) -> dict[str, Any]:
    """`dtype` / `param_dtype` for the modules, from `train.dtype` and `model.param_dtype`."""
    return dict(dtype=jnp.dtype(cfg.train.dtype), param_dtype=jnp.dtype(cfg.model.param_dtype))


# ----------------------------------------------------------------------------- plan


def plan(cfg: DreamBoothConfig) -> dict[str, Any]:
    """The per-device memory plan of the compiled DreamBooth step, without weights or data.

    Model configs come from `model.path`'s `unet/`, `text_encoder/`, `vae/` and `scheduler/`
    config files when present, else from `model.variant` ("sd15", "sd21").

    Returns:
      `plan_train_step`'s dict: `{"devices", "per_device_bytes": {"params", "opt_state", "temp", "total"}}`.
    """
    from jaxvision.models import clip_text as clip_lib
    from jaxvision.models import unet as unet_lib
    from jaxvision.models import vae as vae_lib
    from jaxvision.train.mesh import make_mesh
    from jaxvision.train.plan import plan_train_step

    root = Path(cfg.model.path)
    kw = dict(remat_policy=cfg.train.remat_policy, attention_impl=cfg.model.attention_impl, **modules_kwargs(cfg))
    if (root / "unet" / "config.json").is_file():

        def read(name: str) -> dict:
            file = root / name
            try:
                return json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{file}: cannot read ({e})") from None

        unet_cfg = unet_lib.UNet2DConditionConfig.from_hf(read("unet/config.json"))
        text_cfg = clip_lib.CLIPTextConfig.from_hf(read("text_encoder/config.json"))
        vae_cfg = vae_lib.AutoencoderKLConfig.from_hf(read("vae/config.json"))
        scheduler_config = read("scheduler/scheduler_config.json")
    elif cfg.model.variant is not None:
        u, t, v, prediction_type = PLAN_VARIANTS[cfg.model.variant]
        unet_cfg = unet_lib.UNet2DConditionConfig.from_variant(u)
        text_cfg = clip_lib.CLIPTextConfig.from_variant(t)
        vae_cfg = vae_lib.AutoencoderKLConfig.from_variant(v)
        scheduler_config = {**SD_SCHEDULER, "prediction_type": prediction_type}
    else:
        raise ConfigError(
            f"model.path={cfg.model.path!r} has no unet/config.json; set model.variant "
            f"({', '.join(PLAN_VARIANTS)}) to plan from the architecture alone"
        )
    unet = unet_lib.build(unet_cfg, **kw)
    text_encoder = clip_lib.build(text_cfg, **kw)
    # The frozen VAE only encodes, with the default attention (cuDNN's needs fp16/bf16 inputs and
    # the VAE keeps its attention in fp32).
    vae = vae_lib.build(vae_cfg, **{**kw, "remat_policy": "none", "attention_impl": None})
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg, mesh)
    _, _, _, step = compile_step(cfg, mesh, unet, text_encoder, vae, scheduler_config)
    return plan_train_step(step)


def check_batch_divides(cfg: DreamBoothConfig, mesh: jax.sharding.Mesh) -> None:
    """Raises ConfigError unless each step's rows split evenly over the data-parallel ways
    (mesh `data` × `fsdp`) and the gradient-accumulation micro-batches."""
    from jaxvision.train import sharding as sharding_lib

    ways = math.prod(mesh.shape[a] for a in sharding_lib.batch_sharding(mesh).spec[0])
    if rows_per_step(cfg) % (ways * cfg.train.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} gives {rows_per_step(cfg)} rows per step, not divisible "
            f"by the data-parallel ways ({ways}: mesh data x fsdp) times train.grad_accum_steps "
            f"({cfg.train.grad_accum_steps}); use a train.batch_size that makes it divide"
        )


# ----------------------------------------------------------------------------- run


def run(cfg: DreamBoothConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains, validates, checkpoints and exports one DreamBooth run into `cfg.output_dir`.

    Rerunning with the same `output_dir` resumes from the latest checkpoint (bit-identically:
    the data of step s depends only on `(train.seed, s)` and the noise on the checkpointed RNG).

    Returns:
      A summary: `output_dir`, `export`, `samples`, `checkpoints`, `tensorboard`, `steps`
      (the final step), `final_loss` (None if no step ran), `class_images_generated`.
    """
    from jaxvision.diffusion.components import load_components
    from jaxvision.diffusion.pipeline import StableDiffusionPipeline
    from jaxvision.tokenizer import tokenize
    from jaxvision.trainers.dreambooth import cache as cache_lib
    from jaxvision.trainers.dreambooth import data as data_lib
    from jaxvision.train import sharding as sharding_lib
    from jaxvision.train.checkpoints import CheckpointConfig, Checkpointer
    from jaxvision.train.freeze import merge_params, partition_params
    from jaxvision.train.mesh import make_mesh
    from jaxvision.train.state import create_train_state
    from jaxvision.train.step import host_metrics
    from jaxvision.train.tracking import TENSORBOARD_DIRNAME, Tracker

    out = Path(cfg.output_dir)
    log(format_config(cfg))

    # ---- mesh -----------------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg, mesh)

    # ---- model ----------------------------------------------------------------------------
    comps = load_components(cfg.model.path, **modules_kwargs(cfg))
    module_kw = dict(remat_policy=cfg.train.remat_policy, attention_impl=cfg.model.attention_impl)
    unet = comps.unet.clone(**module_kw)
    text_encoder = comps.text_encoder.clone(**module_kw)
    vae = comps.vae  # frozen, encode only: default attention (see `plan`)
    factor = comps.vae_scale_factor
    if cfg.data.resolution % factor:
        raise ConfigError(f"data.resolution={cfg.data.resolution}: must be a multiple of the VAE's factor {factor}")
    pipe = StableDiffusionPipeline(comps)  # samples class and validation images (jitted, sharded)

    # ---- data (class images are generated here, before any training memory is allocated) ----
    d = cfg.data
    instance_images, _ = data_lib.load_folder(d.instance_dir, d.resolution, min_images=d.min_instance_images, log=log)
    instance_set = data_lib.ImageSet(
        instance_images, d.resolution, random_crop=not d.center_crop, random_flip=d.random_flip
    )
    generated: list[Path] = []
    class_set = None
    if cfg.prior_preservation:
        generated = data_lib.ensure_class_images(
            pipe,
            d.class_dir,
            prompt=d.class_prompt,
            num_images=d.num_class_images,
            seed=d.class_seed,
            model=str(cfg.model.path),
            scheduler=d.class_scheduler,
            num_inference_steps=d.class_inference_steps,
            guidance_scale=d.class_guidance_scale,
            resolution=d.resolution,
            batch_size=d.class_batch_size,
            devices=len(jax.devices()),
            log=log,
        )
        class_images, _ = data_lib.load_folder(d.class_dir, d.resolution, what="class", log=log)
        class_set = data_lib.ImageSet(
            class_images, d.resolution, random_crop=not d.center_crop, random_flip=d.random_flip
        )
    log(f"instance images: {len(instance_set)} from {d.instance_dir}; prompt {d.instance_prompt!r}")
    b = cfg.train.batch_size
    ids = tokenize(comps.tokenizer, [d.instance_prompt] + ([d.class_prompt] if cfg.prior_preservation else []))
    # Rows: b instance rows (stream 0), then b class rows (stream 1); prompts repeat per row.
    sources: list[Any] = [instance_set] + ([class_set] if class_set is not None else [])
    static = {"prior_mask": np.repeat(np.arange(len(ids), dtype=np.float32), b)}
    if d.cache_text_embeddings:
        static["context"] = np.repeat(cache_lib.text_embeddings(text_encoder, comps.text_encoder_params, ids), b, 0)
    else:
        static["input_ids"] = np.repeat(ids, b, axis=0)
    image_key = "pixel_values"
    if d.cache_latents:
        encode = cache_lib.vae_moments_fn(vae, comps.vae_params)
        sources = [cache_lib.LatentCache(images, encode, d.class_batch_size) for images in sources]
        image_key = "latent_moments"
        log(f"cached VAE latents: {sum(c.nbytes for c in sources) / 1e6:.1f} MB")

    def global_batch(step: int) -> dict[str, np.ndarray]:
        rows = [source.batch(cfg.train.seed, step, b, stream=i) for i, source in enumerate(sources)]
        return {image_key: np.concatenate(rows), **static}

    def local_batch(step: int) -> dict[str, np.ndarray]:
        rows = rows_per_step(cfg) // jax.process_count()
        start = jax.process_index() * rows
        return {k: v[start : start + rows] for k, v in global_batch(step).items()}

    # ---- shard + step ---------------------------------------------------------------------
    log("compiling the train step ...")
    t0 = time.perf_counter()
    init_fn, optimizer, rng, step_fn = compile_step(cfg, mesh, unet, text_encoder, vae, comps.scheduler_config)
    log(f"compiled in {time.perf_counter() - t0:.1f} s")
    base = {"unet": comps.unet_params, "text_encoder": comps.text_encoder_params, "vae": comps.vae_params}
    base = add_adapters(cfg, base, rng)

    # ---- restore --------------------------------------------------------------------------
    ckpt = Checkpointer(
        out / "checkpoints",
        CheckpointConfig(cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save),
        run_config=yaml.safe_load(to_yaml(cfg)),
        frozen_sources={
            name: str(Path(cfg.model.path) / name)
            for name in ("vae", "text_encoder") + (("unet",) if cfg.train.lora.enabled else ())
        },
    )
    restored = ckpt.restore(step_fn.abstract_state)
    if restored is None:
        state, frozen = create_train_state(init_fn, optimizer, rng, mesh, params=base)
        start = 0
    else:
        state = restored.state
        frozen_host = partition_params(base, optimizer.config.freeze)[1]
        frozen = jax.device_put(frozen_host, sharding_lib.shardings_of(step_fn.abstract_frozen))
        start = restored.step
        log(f"resumed from {out / 'checkpoints'} at step {start}")
    del base
    save_resolved(cfg, out)

    # ---- loop -----------------------------------------------------------------------------
    samples = out / "samples"
    devices = len(jax.devices())

    def validate(step: int, tracker: Tracker) -> None:
        if not cfg.validation.prompts:
            return
        p = lora_lib.merge_lora(merge_params(state.params, frozen), cfg.train.lora.scale)
        pipe.params = jax.device_put(
            {"unet": p["unet"], "text_encoder": p["text_encoder"], "vae": p["vae"]}, sharding_lib.replicated(pipe_mesh)
        )
        image, grid = outputs.sample_grid(pipe, cfg, devices)
        if jax.process_index() == 0:
            samples.mkdir(parents=True, exist_ok=True)
            image.save(samples / f"step_{step:06d}.png")
        tracker.log_images(step, {"validation": grid})
        log(f"step {step}: validation grid {samples / f'step_{step:06d}.png'}")

    from jax.sharding import Mesh

    pipe_mesh = Mesh(np.array(jax.devices()), ("data",))
    last_loss = None
    ckpt.install_sigterm_handler()
    with Tracker(out, cfg.log, config=cfg, max_steps=cfg.train.max_steps, start_step=start) as tracker:
        for s in range(start, cfg.train.max_steps):
            batch = sharding_lib.shard_batch(local_batch(s), mesh)
            state, metrics = step_fn(state, frozen, batch)
            done = s + 1
            tracker.update_progress(done)
            if done % cfg.log.every_steps == 0 or done == cfg.train.max_steps:
                values = host_metrics(metrics)
                values.pop("step")
                last_loss = values["loss"]
                tracker.log_scalars(done, values)
            ckpt.save(done, state, {"step": done}, force=done == cfg.train.max_steps)
            if done % cfg.validation.every_steps == 0 or done == cfg.train.max_steps:
                validate(done, tracker)
            if ckpt.should_stop:
                log(f"stopping at step {done} (SIGTERM); rerun the same command to resume")
                break
        tracker.flush()
    ckpt.close()
    final_step = int(state.step)

    # ---- export ---------------------------------------------------------------------------
    lora = cfg.train.lora
    export = out / "export" if not lora.enabled or lora.export_merged else None
    lora_file = None
    if lora.enabled:
        adapters = sharding_lib.to_host(state.params)  # the trainable params are the adapters
        lora_file = out / lora_lib.LORA_WEIGHTS_NAME
        if jax.process_index() == 0:
            lora_lib.save_lora_weights(
                adapters, lora, unet_config=unet.config, text_encoder_config=text_encoder.config, directory=out
            )
    if export is not None:
        trained = sharding_lib.to_host(lora_lib.merge_lora(merge_params(state.params, frozen), lora.scale))
        if jax.process_index() == 0:
            outputs.export_model(cfg, comps, trained, export)
    summary = {
        "output_dir": str(out),
        "export": None if export is None else str(export),
        "lora_weights": None if lora_file is None else str(lora_file),
        "samples": str(samples),
        "checkpoints": str(out / "checkpoints"),
        "tensorboard": str(out / TENSORBOARD_DIRNAME),
        "steps": final_step,
        "final_loss": last_loss,
        "class_images_generated": len(generated),
    }
    exported = f"  LoRA weights              {lora_file}\n" if lora_file is not None else ""
    exported += f"  exported diffusers model  {export}\n" if export is not None else ""
    log(
        "DreamBooth run finished:\n"
        f"{exported}"
        f"  validation samples        {samples}\n"
        f"  TensorBoard logs          {out / TENSORBOARD_DIRNAME}   (tensorboard --logdir {out / TENSORBOARD_DIRNAME})\n"
        f"  checkpoints               {out / 'checkpoints'}\n"
        f"  metrics                   {out / 'metrics.jsonl'}"
    )
    return summary
