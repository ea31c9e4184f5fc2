"""ViT fine-tuning's `run` and `plan` (`jaxvision finetune`), on the training core.

`run(config)` reads top to bottom in phases — mesh, data, model, step, restore, loop, export —
built on the training core (`jaxvision.train.*`) and its run scaffold (`jaxvision.train.run`). It writes the run directory of the
DESIGN "Run contract": `config.yaml`, `metrics.jsonl`, `tensorboard/`, `checkpoints/` (Orbax) and
`export/`, a transformers `ViTForImageClassification` folder (`config.json` with the data's
`id2label`, `model.safetensors`, `preprocessor_config.json`).

Data (`trainers.vit_finetune.data`): class folders, a TFDS dataset read with `tfds.data_source`, or
scikit-learn's digits, each with up to three splits. The eval split selects: the export is the
parameters of the best eval top-1 so far, ties going to the lower eval loss (rewritten whenever it
improves, so a crash never loses it); without eval data, the final parameters. The test split
only scores the selected parameters (`best.json`, and `test_*` in metrics.jsonl at the last
step); it never selects.

Rerunning the same command with a larger `train.max_steps` resumes from the latest checkpoint:
the train state, and grain's data-iterator state from the checkpoint's "data" item. Batches are a
pure function of `(train.seed, step)`, so a resumed run is bit-identical to a straight one as long
as the learning-rate schedule does not depend on `max_steps` (`constant`, `constant_with_warmup`;
`linear`/`cosine` stretch with it).

`plan(config)` builds the model through the same `build_model` and compiles the same train step
from shapes only (no weights, no data read); it returns `jaxvision plan --json`'s memory plan.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvision.errors import ConfigError
from jaxvision.image import Preprocessor
from jaxvision.models import kernels as kernels_lib
from jaxvision.models import vit
from jaxvision.models.hf_config import read_config_json
from jaxvision.pretrained import from_pretrained, save_pretrained
from jaxvision.train import sharding as sharding_lib
from jaxvision.train.freeze import merge_params
from jaxvision.train.mesh import make_mesh
from jaxvision.train.optimizers import Optimizer, OptimizerConfig, make_optimizer
from jaxvision.train.plan import describe_kernels, plan_train_step
from jaxvision.train.run import Run, log
from jaxvision.train.state import abstract_train_state
from jaxvision.train.step import TrainStep, host_metrics, make_train_step
from jaxvision.trainers.vit_finetune import data as data_lib
from jaxvision.trainers.vit_finetune.config import FinetuneConfig

EXPORT_DIRNAME = "export"
BEST_FILENAME = "best.json"
# A head for `plan` when neither the data nor the checkpoint names the classes (ImageNet-sized).
PLAN_PLACEHOLDER_LABELS = 1000

# ----------------------------------------------------------------------------- phase helpers


@dataclasses.dataclass(frozen=True)
class Model:
    """What the model phase produces.

    Attributes:
      config: the classifier's architecture, `labels` set to the data's classes.
      module: the training module (train dtype, remat, attention implementation).
      preprocessor: the input preprocessing, written to the export.
      params: starting weights (pretrained backbone + head), or None for the seeded random init.
      source: where the weights come from (recorded in checkpoints for frozen params).
      kernels: the attention / conv implementations chosen for the target platform.
    """

    config: vit.ViTConfig
    module: nn.Module
    preprocessor: Preprocessor
    params: dict | None
    source: str
    kernels: kernels_lib.Kernels


@dataclasses.dataclass(frozen=True)
class Data:
    """What the data phase produces: the class names and the splits (`eval` / `test` may be None)."""

    labels: tuple[str, ...]
    train: data_lib.Examples
    eval: data_lib.Examples | None
    test: data_lib.Examples | None


def load_data(cfg: FinetuneConfig) -> Data:
    """The data phase: the configured source's train, eval (selection) and test (score) splits."""
    d = cfg.data
    if d.dataset == "digits":
        train, evaluation, test = (data_lib.digits_split(s) for s in data_lib.DIGITS_SPLITS)
        return Data(data_lib.DIGIT_LABELS, train, evaluation, test)
    if d.tfds_name is not None:

        def split(name: str | None, key: str) -> data_lib.Examples | None:
            if name is None:
                return None
            return data_lib.tfds_split(
                d.tfds_name, name, d.data_dir, image_key=d.image_key, label_key=d.label_key,
                download=d.tfds_download, key=f"data.tfds_name / data.{key}",
            )  # fmt: skip

        train = split(d.train_split, "train_split")
        return Data(train.labels, train, split(d.eval_split, "eval_split"), split(d.test_split, "test_split"))
    if d.train_dir is None:
        raise ConfigError(
            "no training data: set data.train_dir (one subfolder per class), data.tfds_name or data.dataset=digits"
        )
    train = data_lib.image_folder(d.train_dir, key="data.train_dir")
    folder = lambda path, key: None if path is None else data_lib.image_folder(path, train.labels, key=key)
    return Data(train.labels, train, folder(d.eval_dir, "data.eval_dir"), folder(d.test_dir, "data.test_dir"))


def _plan_labels(cfg: FinetuneConfig) -> tuple[str, ...]:
    """The class names for `plan`, where the data need not exist: the data's if it can be read,
    else the checkpoint's own labels, else a 1000-class placeholder."""
    d = cfg.data
    try:
        if d.dataset is not None or d.tfds_name is not None:
            return load_data(cfg).labels
        if d.train_dir is not None and Path(d.train_dir).is_dir():
            return data_lib.class_names(d.train_dir)
    except ConfigError:
        pass
    if cfg.model.path is not None:
        labels = vit.ViTConfig.from_hf(read_config_json(cfg.model.path), cfg.model.path).labels
        if labels:
            return labels
    return tuple(f"LABEL_{i}" for i in range(PLAN_PLACEHOLDER_LABELS))


def build_model(cfg: FinetuneConfig, labels: tuple[str, ...], platform: str, *, load_weights: bool = True) -> Model:
    """The model phase, for `run` and `plan` alike: a classifier for `labels`, pretrained
    (`model.path`) or from a variant.

    Args:
      platform: the device platform the step runs on; it chooses the kernels.
      load_weights: read the checkpoint's weights; False reads `config.json` only (for `plan`).
    """
    m, t = cfg.model, cfg.train
    k = kernels_lib.resolve(platform, attention=m.attention_impl, dtype=jnp.dtype(t.dtype), training=True)
    kwargs = dict(
        dtype=jnp.dtype(t.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        remat_policy=t.remat_policy,
        attention_impl=k.attention,  # ViT has no convolutions (its patch embedding is a matmul)
    )
    if m.variant is not None:
        overrides = {n: getattr(m, n) for n in m._architecture_overrides()}
        if "patch_size" in overrides:
            overrides["patch_size"] = (overrides["patch_size"],) * 2
        size = m.image_size or 224
        config = vit.ViTConfig.from_variant(m.variant, image_size=size, labels=labels, **overrides)
        return Model(config, vit.build(config, **kwargs), Preprocessor(size=config.image_size), None, "init", k)

    source = str(Path(m.path) / "config.json")
    base = vit.ViTConfig.from_hf(read_config_json(m.path), source)
    size = (m.image_size, m.image_size) if m.image_size else base.image_size
    config = dataclasses.replace(base, labels=labels, architecture="ViTForImageClassification", image_size=size)
    preprocessor = Preprocessor.from_pretrained(m.path)
    if preprocessor.output_size != size:
        preprocessor = dataclasses.replace(
            preprocessor, size=size, shortest_edge=None, do_center_crop=False, crop_size=None
        )
    module = vit.build(config, **kwargs)
    if not load_weights:
        return Model(config, module, preprocessor, None, m.path, k)

    loaded_module, loaded = from_pretrained(m.path, param_dtype=jnp.dtype(m.param_dtype))
    # A ViTModel checkpoint is the backbone itself, with a pooler that classifiers do not have.
    backbone = {k: v for k, v in loaded.items() if k != "pooler"} if base.architecture == "ViTModel" else loaded["vit"]
    if size != base.image_size:
        emb = dict(backbone["embeddings"])
        new_grid = (size[0] // base.patch_size[0], size[1] // base.patch_size[1])
        emb["position_embeddings"] = vit.interpolate_position_embeddings(
            emb["position_embeddings"], base.grid, new_grid
        )
        backbone = {**backbone, "embeddings": emb}
    if base.architecture == "ViTForImageClassification" and base.labels == labels:
        head = loaded["classifier"]  # same classes: continue training the existing head
    else:
        dtype = jnp.dtype(m.param_dtype)
        head = {
            "kernel": jnp.zeros((config.hidden_size, len(labels)), dtype),
            "bias": jnp.zeros((len(labels),), dtype),
        }
    del loaded_module
    return Model(config, module, preprocessor, {"vit": backbone, "classifier": head}, m.path, k)


def optimizer_config(cfg: FinetuneConfig) -> OptimizerConfig:
    return OptimizerConfig.from_train_section(cfg.train)


def init_fn_for(model: Model) -> Callable[[jax.Array], Any]:
    """`init_fn(rng)` of `model`'s module (traced shape-only by the training core, for its
    parameter shapes and logical axis names; the weights themselves are loaded)."""
    example = jnp.zeros((1, *model.config.image_size, model.config.num_channels), jnp.float32)
    return lambda rng: model.module.init(rng, example)["params"]


def _loss_fn(model: Model, label_smoothing: float):
    """Cross-entropy with label smoothing; aux: the batch's top-1 accuracy."""
    num_classes = model.config.num_labels

    def loss_fn(params: dict, batch: dict[str, jax.Array], rng: jax.Array):
        del rng  # no dropout in the released ViT recipes
        logits = model.module.apply({"params": params}, batch["image"]).logits  # fp32
        targets = jax.nn.one_hot(batch["label"], num_classes)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).mean()
        return loss, {"accuracy": accuracy}

    return loss_fn


def compile_step(cfg: FinetuneConfig, model: Model, mesh: jax.sharding.Mesh) -> tuple[Optimizer, TrainStep]:
    """The step phase: the optimizer and the AOT-compiled train step (shapes only)."""
    optimizer = make_optimizer(optimizer_config(cfg))
    rng = jax.random.PRNGKey(cfg.train.seed)
    abstract_state, abstract_frozen = abstract_train_state(init_fn_for(model), optimizer, rng, mesh)
    size, (h, w) = cfg.train.batch_size, model.config.image_size
    batch_spec = {
        "image": jax.ShapeDtypeStruct((size, h, w, model.config.num_channels), jnp.float32),
        "label": jax.ShapeDtypeStruct((size,), jnp.int32),
    }
    loss_fn = _loss_fn(model, cfg.train.label_smoothing)
    step = make_train_step(loss_fn, optimizer, mesh, abstract_state, abstract_frozen, batch_spec, has_aux=True)
    return optimizer, step


def _eval_fn(model: Model, mesh: jax.sharding.Mesh):
    """Jitted `(params, batch) → (sums of top-1 hits, top-5 hits, loss, count)` over a masked batch."""
    k = min(5, model.config.num_labels)

    @jax.jit
    def sums(params: dict, batch: dict[str, jax.Array]) -> jax.Array:
        logits = model.module.apply({"params": params}, batch["image"]).logits
        label, mask = batch["label"], batch["mask"]
        top1 = (jnp.argmax(logits, -1) == label) * mask
        topk = jnp.any(jax.lax.top_k(logits, k)[1] == label[:, None], axis=-1) * mask
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label) * mask
        return jnp.stack([top1.sum(), topk.sum(), loss.sum(), mask.sum()])

    def evaluate(
        params: dict, pipeline: data_lib.Pipeline, examples: data_lib.Examples, batch_size: int, prefix: str = "eval"
    ) -> dict[str, float]:
        total = np.zeros(4)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_AXIS_RULES):
            for batch in pipeline.eval_batches(examples, batch_size):
                total += np.asarray(sums(params, sharding_lib.shard_batch(batch, mesh)))
        top1, top5, loss, count = total
        return {f"{prefix}_top1": top1 / count, f"{prefix}_top5": top5 / count, f"{prefix}_loss": loss / count}

    return evaluate


def export(run: Run, model: Model, params: dict) -> Path:
    """Writes `params` to `output_dir/export/` as a transformers ViTForImageClassification folder
    with `preprocessor_config.json`, atomically (see `Run.export_directory`).

    Every process must call it (the gather is a collective); process 0 writes.
    """
    host = sharding_lib.to_host(params)
    with run.export_directory(EXPORT_DIRNAME) as tmp:
        if tmp is not None:
            # The exported module stores fp32 weights whatever the training dtypes were.
            save_pretrained(vit.build(model.config), host, tmp)
            model.preprocessor.save(tmp)
    return run.output_dir / EXPORT_DIRNAME


def _improves(metrics: dict[str, float], best: dict[str, Any] | None) -> bool:
    """Whether eval `metrics` beat `best`: higher top-1, or equal top-1 and lower loss (small eval
    sets tie often)."""
    if best is None:
        return True
    if metrics["eval_top1"] != best["eval_top1"]:
        return metrics["eval_top1"] > best["eval_top1"]
    return metrics["eval_loss"] < best.get("eval_loss", float("inf"))


# ----------------------------------------------------------------------------- plan and run


def plan(cfg: FinetuneConfig, platform: str | None = None) -> dict[str, Any]:
    """Compiles the train step of `cfg` from shapes only and returns its memory plan.

    Reads at most the checkpoint's `config.json` and the data's class names (train_dir's folder
    names, a TFDS dataset's metadata) where they exist; never the weights or the images.

    Args:
      platform: the target platform whose kernels the step uses (default: the devices present).
    Returns:
      `{"devices": int, "per_device_bytes": {"params", "opt_state", "temp", "total"}}`; the kernels
      chosen for the platform are printed (process 0's stderr).
    """
    mesh = make_mesh(cfg.mesh)
    target = platform or kernels_lib.platform_of(mesh)
    model = build_model(cfg, _plan_labels(cfg), target, load_weights=False)
    compiled = kernels_lib.compilable_here(model.kernels, kernels_lib.platform_of(mesh))
    model = dataclasses.replace(model, module=kernels_lib.with_kernels(model.module, compiled))
    _, step = compile_step(cfg, model, mesh)
    log(describe_kernels(target, model.kernels, compiled))
    return plan_train_step(step)


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes; see the module docstring.

    Returns:
      `{"step": final step, "export_dir": str, "best": {"step", "eval_top1", "test_top1", ...} or
      None, "eval": last eval metrics or None}`; `best` is the exported step, chosen on eval
      top-1, with the test metrics of that step (the final step's when there is no eval data).
    """
    out = Path(cfg.output_dir)
    t = cfg.train
    run_dir = Run(cfg, frozen_sources={pattern: str(cfg.model.path or "init") for pattern in t.freeze})

    # --- mesh ------------------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh)

    # --- data ------------------------------------------------------------------------------
    data = load_data(cfg)
    labels = data.labels

    # --- model -----------------------------------------------------------------------------
    model = build_model(cfg, labels, kernels_lib.platform_of(mesh))
    pipeline = data_lib.Pipeline(
        model.preprocessor,
        model.config.image_size,
        augment=cfg.data.augment and cfg.data.dataset is None,
        crop_min_scale=cfg.data.crop_min_scale,
        hflip=cfg.data.hflip,
        max_shift=cfg.data.max_shift,
        num_threads=cfg.data.num_threads,
        prefetch=cfg.data.prefetch,
    )
    if data.train.images is not None:  # small in-memory datasets: preprocess once
        materialize = lambda split: None if split is None else pipeline.materialize(split)
        data = Data(labels, materialize(data.train), materialize(data.eval), materialize(data.test))
    sizes = " / ".join(
        f"{len(x) if x is not None else 0} {n}"
        for n, x in zip(("train", "eval", "test"), (data.train, data.eval, data.test), strict=True)
    )
    log(
        f"model: ViT {model.config.hidden_size}w x {model.config.num_hidden_layers}L, patch {model.config.patch_size}, "
        f"{model.config.image_size} px, {len(labels)} classes from {model.source}; {sizes} examples; "
        f"kernels: {model.kernels.describe()}"
    )

    # --- step ------------------------------------------------------------------------------
    optimizer, train_step = compile_step(cfg, model, mesh)  # AOT, before any batch is built

    # --- restore ---------------------------------------------------------------------------
    state, frozen, restored = run_dir.restore_or_create(
        train_step, init_fn_for(model), optimizer, jax.random.PRNGKey(t.seed), mesh, model.params
    )
    start = 0 if restored is None else restored.step
    best_path = out / BEST_FILENAME
    best = json.loads(best_path.read_text()) if restored is not None and best_path.exists() else None
    # The data position: grain's iterator state, saved in the checkpoint's "data" item. Every
    # process's iterator stands at the same index (its own sub-batch of each global batch).
    data_state = None
    if restored is not None:
        # Checkpoints written before the iterator state was saved: grain's MapDataset iterator
        # state is the index of the next element, here the step.
        data_state = restored.data.get("iterator", {"next_index": start})
    batches = pipeline.train_iterator(data.train, t.seed, t.batch_size, data_state)

    # --- loop ------------------------------------------------------------------------------
    evaluate = _eval_fn(model, mesh)
    export_dir = out / EXPORT_DIRNAME
    last_eval = None
    try:
        with run_dir.tracker(start) as tracker:
            step = start
            while step < t.max_steps:
                batch = next(batches)
                state, metrics = train_step(state, frozen, sharding_lib.shard_batch(batch, mesh))
                step += 1
                tracker.update_progress(step)
                if step % cfg.log.every_steps == 0 or step == t.max_steps:
                    tracker.log_scalars(step, {k: v for k, v in host_metrics(metrics).items() if k != "step"})
                due = (t.eval_every_steps and step % t.eval_every_steps == 0) or step == t.max_steps
                if data.eval is not None and due:
                    params = merge_params(state.params, frozen)
                    last_eval = evaluate(params, pipeline, data.eval, t.eval_batch_size)
                    tracker.log_scalars(step, last_eval)
                    if _improves(last_eval, best):
                        # Selected on eval only; the test score of the selected parameters is recorded, never compared.
                        best = {"step": step, "eval_top1": last_eval["eval_top1"], "eval_loss": last_eval["eval_loss"]}
                        if data.test is not None:
                            best.update(evaluate(params, pipeline, data.test, t.eval_batch_size, prefix="test"))
                        export(run_dir, model, params)
                        if jax.process_index() == 0:
                            best_path.write_text(json.dumps(best) + "\n")
                run_dir.checkpointer.save(
                    step, state, {"step": step, "iterator": batches.get_state()}, force=step == t.max_steps
                )
                if run_dir.stop_requested(step):
                    break
            if step == t.max_steps and data.test is not None:
                if data.eval is None:  # nothing to select on: the final parameters are the model
                    best = {"step": step}
                    best.update(
                        evaluate(
                            merge_params(state.params, frozen), pipeline, data.test, t.eval_batch_size, prefix="test"
                        )
                    )
                tracker.log_scalars(step, {k: v for k, v in best.items() if k.startswith("test_")})
    finally:
        batches.close()  # stops grain's reader threads
        run_dir.close()

    # --- export ----------------------------------------------------------------------------
    if data.eval is None or not export_dir.exists():
        export(run_dir, model, merge_params(state.params, frozen))
    if best is not None and "eval_top1" in best:
        test = f", test top-1 {best['test_top1']:.4f}" if "test_top1" in best else ""
        log(f"best eval top-1 {best['eval_top1']:.4f} at step {best['step']}{test}; exported to {export_dir}")
    else:
        test = f" (test top-1 {best['test_top1']:.4f})" if best is not None and "test_top1" in best else ""
        log(f"exported step {step}{test} to {export_dir}")
    return {"step": step, "export_dir": str(export_dir), "best": best, "eval": last_eval}
