"""DreamBooth's `run` and `plan`: one read from top to bottom, on the training core.

`run(config)` goes in phases: mesh, model, data (class images generated first when prior
preservation needs them), step, restore, loop, export. The UNet is trained; the text encoder too
when `train.train_text_encoder` is set; the VAE never. Frozen networks leave the train state
(`train.freeze` regexes `^vae/`, `^text_encoder/`), so they get no gradients, no optimizer state
and are never checkpointed. `plan(config)` builds the same networks through the same function
(`build_networks`) from their configs alone and compiles the same step.
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
from jax.sharding import Mesh

from jaxvision.diffusion.components import StableDiffusionComponents, load_components
from jaxvision.diffusion.ddpm import DDPMScheduler
from jaxvision.diffusion.pipeline import StableDiffusionPipeline
from jaxvision.diffusion.schedule import SD_SCHEDULER_CONFIG
from jaxvision.errors import ConfigError
from jaxvision.models import clip_text as clip_lib
from jaxvision.models import kernels as kernels_lib
from jaxvision.models import unet as unet_lib
from jaxvision.models import vae as vae_lib
from jaxvision.tokenizer import tokenize
from jaxvision.train import lora as lora_lib
from jaxvision.train import sharding as sharding_lib
from jaxvision.train.freeze import merge_params
from jaxvision.train.mesh import make_mesh
from jaxvision.train.optimizers import OptimizerConfig, make_optimizer
from jaxvision.train.plan import describe_kernels, plan_train_step
from jaxvision.train.run import CHECKPOINTS_DIRNAME, Run, log
from jaxvision.train.state import abstract_train_state
from jaxvision.train.step import TrainStep, host_metrics, make_train_step
from jaxvision.train.tracking import TENSORBOARD_DIRNAME, Tracker
from jaxvision.trainers.dreambooth import cache as cache_lib
from jaxvision.trainers.dreambooth import data as data_lib
from jaxvision.trainers.dreambooth import outputs
from jaxvision.trainers.dreambooth.config import PLAN_VARIANTS, DreamBoothConfig
from jaxvision.trainers.dreambooth.loss import PREDICTION_TYPES, make_loss_fn
from jaxvision.weights.lora_files import LORA_WEIGHTS_NAME, save_lora_weights

# ----------------------------------------------------------------------------- shared pieces


def optimizer_config(cfg: DreamBoothConfig) -> OptimizerConfig:
    """The Optax chain's config: the train section, plus the frozen VAE (and text encoder, and with
    LoRA every base weight: only the adapters train)."""
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


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Networks:
    """The networks as the train step runs them (training dtypes, remat and kernels).

    Attributes:
      unet, text_encoder, vae: the Flax modules.
      scheduler_config: the base model's `scheduler_config.json` (its training schedule).
      kernels: the attention / conv implementations chosen for the target platform.
      components: the loaded checkpoint (weights, tokenizer), or None when built from configs only.
    """

    unet: Any
    text_encoder: Any
    vae: Any
    scheduler_config: dict
    kernels: kernels_lib.Kernels
    components: StableDiffusionComponents | None


def modules_kwargs(cfg: DreamBoothConfig) -> dict[str, Any]:
    """`dtype` / `param_dtype` for the modules, from `train.dtype` and `model.param_dtype`."""
    return dict(dtype=jnp.dtype(cfg.train.dtype), param_dtype=jnp.dtype(cfg.model.param_dtype))


def _architecture(cfg: DreamBoothConfig) -> tuple[Any, Any, Any, dict]:
    """The three networks' configs and the scheduler config, read from `model.path`'s config files
    when present, else from `model.variant` ("sd15", "sd21")."""
    root = Path(cfg.model.path)
    if (root / "unet" / "config.json").is_file():

        def read(name: str) -> dict:
            file = root / name
            try:
                return json.loads(file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{file}: cannot read ({e})") from None

        return (
            unet_lib.UNet2DConditionConfig.from_hf(read("unet/config.json")),
            clip_lib.CLIPTextConfig.from_hf(read("text_encoder/config.json")),
            vae_lib.AutoencoderKLConfig.from_hf(read("vae/config.json")),
            read("scheduler/scheduler_config.json"),
        )
    if cfg.model.variant is not None:
        u, t, v, prediction_type = PLAN_VARIANTS[cfg.model.variant]
        return (
            unet_lib.UNet2DConditionConfig.from_variant(u),
            clip_lib.CLIPTextConfig.from_variant(t),
            vae_lib.AutoencoderKLConfig.from_variant(v),
            {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type},
        )
    raise ConfigError(
        f"model.path={cfg.model.path!r} has no unet/config.json; set model.variant "
        f"({', '.join(PLAN_VARIANTS)}) to plan from the architecture alone"
    )


def build_networks(cfg: DreamBoothConfig, platform: str, *, load_weights: bool = True) -> Networks:
    """The one construction path of the trained networks, for `run` (with weights) and `plan`.

    Args:
      platform: the device platform the step will run on ("cpu", "gpu", "tpu"); it chooses the
        kernels (`jaxvision.models.kernels.resolve`, training rules).
      load_weights: load `model.path` (weights, tokenizer); False reads config files only.
    """
    kw = modules_kwargs(cfg)
    comps = load_components(cfg.model.path, **kw) if load_weights else None
    if comps is not None:
        configs = (comps.unet.config, comps.text_encoder.config, comps.vae.config, comps.scheduler_config)
    else:
        configs = _architecture(cfg)
    unet_cfg, text_cfg, vae_cfg, scheduler_config = configs
    k = kernels_lib.resolve(platform, attention=cfg.model.attention_impl, dtype=kw["dtype"], training=True)
    # The frozen VAE only encodes, its attention upcast to fp32, with the platform's default kernels.
    vae_k = kernels_lib.resolve(platform, dtype=jnp.float32, training=True)
    remat = cfg.train.remat_policy
    return Networks(
        unet=unet_lib.build(unet_cfg, remat_policy=remat, attention_impl=k.attention, conv_impl=k.conv, **kw),
        text_encoder=clip_lib.build(text_cfg, remat_policy=remat, attention_impl=k.attention, **kw),
        vae=vae_lib.build(vae_cfg, attention_impl=vae_k.attention, conv_impl=vae_k.conv, **kw),
        scheduler_config=scheduler_config,
        kernels=k,
        components=comps,
    )


# ----------------------------------------------------------------------------- step


def compile_step(
    cfg: DreamBoothConfig, mesh: Mesh, nets: Networks
) -> tuple[Callable[[jax.Array], dict], Any, jax.Array, TrainStep]:
    """The AOT-compiled DreamBooth train step, shared by `run`, `plan` and the benchmarks.

    Returns:
      `(init_fn, optimizer, rng, step)`: the shape-only init of `{"unet", "text_encoder", "vae"}`
      (plus adapters with LoRA), the Optax chain, the state's PRNG key, and the compiled step
      (`step.abstract_state` / `step.abstract_frozen` carry the shardings).
    """
    unet, text_encoder, vae = nets.unet, nets.text_encoder, nets.vae
    ddpm = DDPMScheduler.from_config(nets.scheduler_config)
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


def check_batch_divides(cfg: DreamBoothConfig, mesh: Mesh) -> None:
    """Raises ConfigError unless each step's rows split evenly over the data-parallel ways
    (mesh `data` × `fsdp`) and the gradient-accumulation micro-batches."""
    ways = math.prod(mesh.shape[a] for a in sharding_lib.batch_sharding(mesh).spec[0])
    if rows_per_step(cfg) % (ways * cfg.train.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} gives {rows_per_step(cfg)} rows per step, not divisible "
            f"by the data-parallel ways ({ways}: mesh data x fsdp) times train.grad_accum_steps "
            f"({cfg.train.grad_accum_steps}); use a train.batch_size that makes it divide"
        )


# ----------------------------------------------------------------------------- plan


def plan(cfg: DreamBoothConfig, platform: str | None = None) -> dict[str, Any]:
    """The per-device memory plan of the compiled DreamBooth step, without weights or data.

    Model configs come from `model.path`'s `unet/`, `text_encoder/`, `vae/` and `scheduler/`
    config files when present, else from `model.variant` ("sd15", "sd21").

    Args:
      platform: the target platform whose kernels the step uses (default: the devices present).
    Returns:
      `plan_train_step`'s dict: `{"devices", "per_device_bytes": {...}}`; the kernels chosen for
      the platform are printed (process 0's stderr).
    """
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg, mesh)
    target = platform or kernels_lib.platform_of(mesh)
    nets = build_networks(cfg, target, load_weights=False)
    compiled = kernels_lib.compilable_here(nets.kernels, kernels_lib.platform_of(mesh))
    nets = dataclasses.replace(
        nets,
        unet=kernels_lib.with_kernels(nets.unet, compiled),
        text_encoder=kernels_lib.with_kernels(nets.text_encoder, compiled),
    )
    _, _, _, step = compile_step(cfg, mesh, nets)
    log(describe_kernels(target, nets.kernels, compiled))
    return plan_train_step(step)


# ----------------------------------------------------------------------------- run


def run(cfg: DreamBoothConfig, *, log: Callable[[str], None] = log) -> dict[str, Any]:
    """Trains, validates, checkpoints and exports one DreamBooth run into `cfg.output_dir`.

    Rerunning with the same `output_dir` resumes from the latest checkpoint (bit-identically:
    the data of step s depends only on `(train.seed, s)` and the noise on the checkpointed RNG).

    Args:
      log: where progress messages go (default: process 0's stderr).
    Returns:
      A summary: `output_dir`, `export`, `lora_weights`, `samples`, `checkpoints`, `tensorboard`,
      `steps` (the final step), `final_loss` (None if no step was logged), `class_images_generated`.
    """
    out = Path(cfg.output_dir)
    lora = cfg.train.lora
    run_dir = Run(
        cfg,
        frozen_sources={
            name: str(Path(cfg.model.path) / name)
            for name in ("vae", "text_encoder") + (("unet",) if lora.enabled else ())
        },
        log=log,
    )

    # ---- mesh -----------------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh)
    check_batch_divides(cfg, mesh)

    # ---- model ----------------------------------------------------------------------------
    nets = build_networks(cfg, kernels_lib.platform_of(mesh))
    comps = nets.components
    log(f"kernels: {nets.kernels.describe()} ({kernels_lib.platform_of(mesh)})")
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
        embeddings = cache_lib.text_embeddings(nets.text_encoder, comps.text_encoder_params, ids)
        static["context"] = np.repeat(embeddings, b, 0)
    else:
        static["input_ids"] = np.repeat(ids, b, axis=0)
    image_key = "pixel_values"
    if d.cache_latents:
        encode = cache_lib.vae_moments_fn(nets.vae, comps.vae_params)
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

    # ---- step -----------------------------------------------------------------------------
    log("compiling the train step ...")
    t0 = time.perf_counter()
    init_fn, optimizer, rng, step_fn = compile_step(cfg, mesh, nets)
    log(f"compiled in {time.perf_counter() - t0:.1f} s")

    # ---- restore --------------------------------------------------------------------------
    base = {"unet": comps.unet_params, "text_encoder": comps.text_encoder_params, "vae": comps.vae_params}
    state, frozen, restored = run_dir.restore_or_create(
        step_fn, init_fn, optimizer, rng, mesh, add_adapters(cfg, base, rng)
    )
    start = 0 if restored is None else restored.step
    del base

    # ---- loop -----------------------------------------------------------------------------
    samples = out / "samples"

    def validate(step: int, tracker: Tracker) -> None:
        if not cfg.validation.prompts:
            return
        p = lora_lib.merge_lora(merge_params(state.params, frozen), lora.scale)
        pipe.params = jax.device_put(
            {"unet": p["unet"], "text_encoder": p["text_encoder"], "vae": p["vae"]},
            sharding_lib.replicated(pipe.mesh),
        )
        image, grid = outputs.sample_grid(pipe, cfg)
        if jax.process_index() == 0:
            samples.mkdir(parents=True, exist_ok=True)
            image.save(samples / f"step_{step:06d}.png")
        tracker.log_images(step, {"validation": grid})
        log(f"step {step}: validation grid {samples / f'step_{step:06d}.png'}")

    last_loss = None
    with run_dir.tracker(start) as tracker:
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
            run_dir.checkpointer.save(done, state, {"step": done}, force=done == cfg.train.max_steps)
            if done % cfg.validation.every_steps == 0 or done == cfg.train.max_steps:
                validate(done, tracker)
            if run_dir.stop_requested(done):
                break
        tracker.flush()
    run_dir.close()
    final_step = int(state.step)

    # ---- export ---------------------------------------------------------------------------
    export = out / "export" if not lora.enabled or lora.export_merged else None
    lora_file = None
    if lora.enabled:
        adapters = sharding_lib.to_host(state.params)  # the trainable params are the adapters
        lora_file = out / LORA_WEIGHTS_NAME
        if jax.process_index() == 0:  # one file, written atomically (temp file + rename)
            save_lora_weights(
                adapters,
                lora,
                unet_config=nets.unet.config,
                text_encoder_config=nets.text_encoder.config,
                directory=out,
            )
    if export is not None:
        trained = sharding_lib.to_host(lora_lib.merge_lora(merge_params(state.params, frozen), lora.scale))
        with run_dir.export_directory("export") as tmp:
            if tmp is not None:
                outputs.export_model(cfg, comps, trained, tmp)
    summary = {
        "output_dir": str(out),
        "export": None if export is None else str(export),
        "lora_weights": None if lora_file is None else str(lora_file),
        "samples": str(samples),
        "checkpoints": str(out / CHECKPOINTS_DIRNAME),
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
        f"  checkpoints               {out / CHECKPOINTS_DIRNAME}\n"
        f"  metrics                   {out / 'metrics.jsonl'}"
    )
    return summary
