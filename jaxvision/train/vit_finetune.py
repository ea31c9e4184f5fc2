"""ViT fine-tuning (or training from scratch) for image classification: `jaxvision finetune`.

    jaxvision finetune --config configs/vit/digits.yaml
    jaxvision finetune --config configs/vit/l16_384.yaml model.path=/ckpt/vit-large-patch16-384 \\
        data.train_dir=data/train data.eval_dir=data/val output_dir=runs/l16

`run(config)` reads top to bottom in phases — mesh, data, model, shard, step, restore, loop,
export — built on the training core (`jaxvision.train.*`). It writes the run directory of the
DESIGN "Run contract": `config.yaml`, `metrics.jsonl`, `tensorboard/`, `checkpoints/` (Orbax) and
`export/`, a transformers `ViTForImageClassification` folder (`config.json` with the data's
`id2label`, `model.safetensors`, `preprocessor_config.json`). With eval data the export is the
parameters of the best eval top-1 so far (rewritten whenever it improves, so a crash never loses
it); without, the final parameters.

Rerunning the same command with a larger `train.max_steps` resumes from the latest checkpoint.
The data position is the step counter itself (see `classification_data`), so a resumed run is
bit-identical to a straight one as long as the learning-rate schedule does not depend on
`max_steps` (`constant`, `constant_with_warmup`; `linear`/`cosine` stretch with it).

`plan(config)` compiles the same train step from shapes only (no weights, no data read) and
returns `jaxvision plan --json`'s memory plan.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from jaxvision.errors import ConfigError
from jaxvision.image import Preprocessor
from jaxvision.models import vit
from jaxvision.models.hf_config import read_config_json
from jaxvision.train import classification_data as data_lib
from jaxvision.train import sharding as sharding_lib
from jaxvision.train.checkpoints import CheckpointConfig, Checkpointer
from jaxvision.train.config import (
    DTYPES,
    CheckpointSection,
    LogSection,
    MeshSection,
    TrainSection,
    format_config,
    require,
    save_resolved,
    to_yaml,
)
from jaxvision.train.freeze import merge_params
from jaxvision.train.mesh import make_mesh
from jaxvision.train.optimizers import Optimizer, OptimizerConfig, make_optimizer
from jaxvision.train.plan import plan_train_step
from jaxvision.train.state import abstract_train_state, create_train_state
from jaxvision.train.step import TrainStep, host_metrics, make_train_step
from jaxvision.train.tracking import Tracker

EXPORT_DIRNAME = "export"
BEST_FILENAME = "best.json"
# A head for `plan` when neither the data nor the checkpoint names the classes (ImageNet-sized).
PLAN_PLACEHOLDER_LABELS = 1000

# ----------------------------------------------------------------------------- config schema


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneModelSection:
    """The starting model: a pretrained Hugging Face ViT folder, or a variant trained from scratch.

    Attributes:
      path: a local transformers ViT folder (`ViTModel` or `ViTForImageClassification`); its
        classifier head is replaced by one for the data's classes (kept if the classes are equal).
      variant: a `jaxvision.models.vit.VARIANTS` name ("tiny", "Ti/16", "B/16", ...) to train from scratch.
      image_size: input side in pixels; from scratch it defaults to 224; for a pretrained model
        it defaults to the checkpoint's and a different value resizes the position embeddings.
      patch_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size:
        from-scratch overrides of the variant's values (None keeps them).
      param_dtype: storage dtype of the parameters (one of `DTYPES`).
      attention_impl: `layers.attention` implementation (None: JAX chooses; "cudnn" on GPUs).
    """

    path: str | None = None
    variant: str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    param_dtype: str = "float32"
    attention_impl: str | None = None

    def __post_init__(self):
        require(
            (self.path is None) != (self.variant is None),
            "path",
            self.path,
            "set exactly one of model.path (a local Hugging Face ViT folder) or model.variant (from scratch)",
        )
        require(
            self.variant is None or self.variant in vit.VARIANTS,
            "variant",
            self.variant,
            f"choose one of {', '.join(vit.VARIANTS)}",
        )
        if self.path is not None:
            for name in self._architecture_overrides():
                require(False, name, getattr(self, name), "only applies with model.variant (from scratch)")
        require(self.image_size is None or self.image_size >= 1, "image_size", self.image_size, "must be >= 1")
        require(self.param_dtype in DTYPES, "param_dtype", self.param_dtype, f"choose one of {', '.join(DTYPES)}")

    def _architecture_overrides(self) -> list[str]:
        names = ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        return [n for n in names if getattr(self, n) is not None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneTrainSection(TrainSection):
    """`TrainSection` plus classification settings.

    Attributes:
      label_smoothing: mass moved uniformly onto all classes in the cross-entropy targets.
      eval_every_steps: evaluate (top-1 / top-5) every this many steps; 0: only at the end.
      eval_batch_size: global eval batch size (the last batch is padded and masked).
    """

    label_smoothing: float = 0.0
    eval_every_steps: int = 0
    eval_batch_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        require(self.eval_every_steps >= 0, "eval_every_steps", self.eval_every_steps, "must be >= 0")
        require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """Training and eval data: class folders, or a bundled dataset.

    Attributes:
      train_dir: folder with one subfolder per class (the sorted names become `id2label`).
      eval_dir: the same layout for evaluation (optional; its classes must be among train_dir's).
      dataset: "digits" (scikit-learn's 8x8 digits, fixed 80/20 train/test split) instead of folders.
      augment: random resized crop + horizontal flip on training images (folders only).
      crop_min_scale: smallest area fraction of the random resized crop.
      hflip: horizontal flips (turn off for data where left/right matters).
    """

    train_dir: str | None = None
    eval_dir: str | None = None
    dataset: str | None = None
    augment: bool = True
    crop_min_scale: float = 0.35
    hflip: bool = True

    def __post_init__(self):
        require(
            self.dataset is None or self.dataset in data_lib.DATASETS,
            "dataset",
            self.dataset,
            f"choose one of {', '.join(data_lib.DATASETS)}, or give data.train_dir",
        )
        require(
            self.dataset is None or (self.train_dir is None and self.eval_dir is None),
            "dataset",
            self.dataset,
            "give either data.dataset or data.train_dir / data.eval_dir, not both",
        )
        require(self.eval_dir is None or self.train_dir is not None, "eval_dir", self.eval_dir, "needs data.train_dir")
        require(0.0 < self.crop_min_scale <= 1.0, "crop_min_scale", self.crop_min_scale, "must be in (0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A ViT fine-tuning run (`jaxvision finetune`); see `configs/vit/`."""

    output_dir: str
    model: FinetuneModelSection
    train: FinetuneTrainSection
    data: DataSection = dataclasses.field(default_factory=DataSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)


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
    """

    config: vit.ViTConfig
    module: nn.Module
    preprocessor: Preprocessor
    params: dict | None
    source: str


def _labels(cfg: FinetuneConfig, *, for_plan: bool = False) -> tuple[str, ...]:
    """The class names: digits' "0".."9", or the train_dir's class folders.

    For `plan` the data need not exist: the checkpoint's own labels, else a 1000-class placeholder.
    """
    data = cfg.data
    if data.dataset == "digits":
        return data_lib.DIGIT_LABELS
    if data.train_dir is not None and (not for_plan or Path(data.train_dir).is_dir()):
        return data_lib.class_names(data.train_dir)
    if not for_plan:
        raise ConfigError("no training data: set data.train_dir (one subfolder per class) or data.dataset=digits")
    if cfg.model.path is not None:
        labels = vit.ViTConfig.from_hf(read_config_json(cfg.model.path), cfg.model.path).labels
        if labels:
            return labels
    return tuple(f"LABEL_{i}" for i in range(PLAN_PLACEHOLDER_LABELS))


def build_model(cfg: FinetuneConfig, labels: tuple[str, ...], *, load_weights: bool = True) -> Model:
    """The model phase: a classifier for `labels`, pretrained (`model.path`) or from a variant.

    Args:
      load_weights: read the checkpoint's weights; False reads `config.json` only (for `plan`).
    """
    m, t = cfg.model, cfg.train
    kwargs = dict(
        dtype=jnp.dtype(t.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        remat_policy=t.remat_policy,
        attention_impl=m.attention_impl,
    )
    if m.variant is not None:
        overrides = {n: getattr(m, n) for n in m._architecture_overrides()}
        if "patch_size" in overrides:
            overrides["patch_size"] = (overrides["patch_size"],) * 2
        size = m.image_size or 224
        config = vit.ViTConfig.from_variant(m.variant, image_size=size, labels=labels, **overrides)
        return Model(config, vit.build(config, **kwargs), Preprocessor(size=config.image_size), None, "init")

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
        return Model(config, module, preprocessor, None, m.path)

    from jaxvision.pretrained import from_pretrained

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
    return Model(config, module, preprocessor, {"vit": backbone, "classifier": head}, m.path)


def optimizer_config(cfg: FinetuneConfig) -> OptimizerConfig:
    return OptimizerConfig.from_train_section(cfg.train)


def _init_fn(model: Model):
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
    abstract_state, abstract_frozen = abstract_train_state(_init_fn(model), optimizer, rng, mesh)
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

    def evaluate(params: dict, pipeline: data_lib.Pipeline, examples: data_lib.Examples, batch_size: int, rows: slice):
        total = np.zeros(4)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_AXIS_RULES):
            for batch in pipeline.eval_batches(examples, batch_size, rows):
                total += np.asarray(sums(params, sharding_lib.shard_batch(batch, mesh)))
        top1, top5, loss, count = total
        return {"eval_top1": top1 / count, "eval_top5": top5 / count, "eval_loss": loss / count}

    return evaluate


def _host_params(tree: dict) -> dict:
    """Host NumPy copies of (possibly sharded, multi-process) arrays; a collective on every process."""
    from jax.experimental import multihost_utils

    def one(x: jax.Array) -> np.ndarray:
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def export(model: Model, params: dict, directory: str | os.PathLike) -> Path:
    """Writes `params` as a transformers ViTForImageClassification folder + preprocessor_config.json.

    Written under a temporary name and renamed, so the previous export survives a crash. Every
    process must call it (the gather is a collective); process 0 writes.
    """
    host = _host_params(params)
    directory = Path(directory)
    if jax.process_index() != 0:
        return directory
    from jaxvision.pretrained import save_pretrained

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The exported module stores fp32 weights whatever the training dtypes were.
    save_pretrained(vit.build(model.config), host, tmp)
    model.preprocessor.save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _local_rows(batch_size: int) -> slice:
    """This process's rows of a global batch (process i holds the i-th contiguous share)."""
    n, i = jax.process_count(), jax.process_index()
    if batch_size % n:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {n} processes")
    return slice(i * batch_size // n, (i + 1) * batch_size // n)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- plan and run


def plan(cfg: FinetuneConfig) -> dict[str, Any]:
    """Compiles the train step of `cfg` from shapes only and returns its memory plan.

    Reads at most the checkpoint's `config.json` (and the train_dir's class folder names if it
    exists); never the weights or the images.

    Returns:
      `{"devices": int, "per_device_bytes": {"params", "opt_state", "temp", "total"}}`.
    """
    mesh = make_mesh(cfg.mesh)
    model = build_model(cfg, _labels(cfg, for_plan=True), load_weights=False)
    _, step = compile_step(cfg, model, mesh)
    return plan_train_step(step)


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes; see the module docstring.

    Returns:
      `{"step": final step, "export_dir": str, "best": {"step", "eval_top1"} or None,
      "eval": last eval metrics or None}`.
    """
    out = Path(cfg.output_dir)
    t = cfg.train
    _log(format_config(cfg))

    # --- mesh ------------------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh)

    # --- data ------------------------------------------------------------------------------
    labels = _labels(cfg)
    if cfg.data.dataset == "digits":
        train_data, eval_data = data_lib.digits_split("train"), data_lib.digits_split("test")
    else:
        train_data = data_lib.image_folder(cfg.data.train_dir, key="data.train_dir")
        eval_data = None
        if cfg.data.eval_dir is not None:
            eval_data = data_lib.image_folder(cfg.data.eval_dir, labels, key="data.eval_dir")

    # --- model -----------------------------------------------------------------------------
    model = build_model(cfg, labels)
    pipeline = data_lib.Pipeline(
        model.preprocessor,
        model.config.image_size,
        augment=cfg.data.augment and cfg.data.dataset is None,
        crop_min_scale=cfg.data.crop_min_scale,
        hflip=cfg.data.hflip,
    )
    if train_data.images is not None:  # small in-memory datasets: preprocess once
        train_data = pipeline.materialize(train_data)
        eval_data = pipeline.materialize(eval_data) if eval_data is not None else None
    _log(
        f"model: ViT {model.config.hidden_size}w x {model.config.num_hidden_layers}L, patch {model.config.patch_size}, "
        f"{model.config.image_size} px, {len(labels)} classes from {model.source}; "
        f"{len(train_data)} train / {len(eval_data) if eval_data else 0} eval examples"
    )

    # --- shard -----------------------------------------------------------------------------
    optimizer, train_step = compile_step(cfg, model, mesh)  # AOT, before any batch is built
    state, frozen = create_train_state(
        _init_fn(model), optimizer, jax.random.PRNGKey(t.seed), mesh, params=model.params
    )

    # --- restore ---------------------------------------------------------------------------
    save_resolved(cfg, out)
    ckpt = Checkpointer(
        out / "checkpoints",
        CheckpointConfig(cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep, cfg.checkpoint.async_save),
        run_config=yaml.safe_load(to_yaml(cfg)),
        frozen_sources={pattern: model.source for pattern in t.freeze},
    )
    restored = ckpt.restore(train_step.abstract_state)
    start = 0
    if restored is not None:
        if restored.step > t.max_steps:
            ckpt.close()
            raise ConfigError(
                f"{out / 'checkpoints'} holds step {restored.step}, beyond train.max_steps={t.max_steps}; "
                "raise train.max_steps or use a new output_dir"
            )
        state, start = restored.state, restored.step
        _log(f"resuming from step {start} ({out / 'checkpoints'})")
    best_path = out / BEST_FILENAME
    best = json.loads(best_path.read_text()) if restored is not None and best_path.exists() else None

    # --- loop ------------------------------------------------------------------------------
    evaluate = _eval_fn(model, mesh)
    rows, eval_rows = _local_rows(t.batch_size), _local_rows(t.eval_batch_size)
    export_dir = out / EXPORT_DIRNAME
    last_eval = None
    ckpt.install_sigterm_handler()
    try:
        with Tracker(out, cfg.log, config=cfg, max_steps=t.max_steps, start_step=start) as tracker:
            step = start
            while step < t.max_steps:
                batch = pipeline.train_batch(train_data, t.seed, step, t.batch_size, rows)
                state, metrics = train_step(state, frozen, sharding_lib.shard_batch(batch, mesh))
                step += 1
                tracker.update_progress(step)
                if step % cfg.log.every_steps == 0 or step == t.max_steps:
                    tracker.log_scalars(step, {k: v for k, v in host_metrics(metrics).items() if k != "step"})
                due = (t.eval_every_steps and step % t.eval_every_steps == 0) or step == t.max_steps
                if eval_data is not None and due:
                    last_eval = evaluate(merge_params(state.params, frozen), pipeline, eval_data,
                                         t.eval_batch_size, eval_rows)  # fmt: skip
                    tracker.log_scalars(step, last_eval)
                    if best is None or last_eval["eval_top1"] > best["eval_top1"]:
                        best = {"step": step, "eval_top1": last_eval["eval_top1"]}
                        export(model, merge_params(state.params, frozen), export_dir)
                        if jax.process_index() == 0:
                            best_path.write_text(json.dumps(best) + "\n")
                ckpt.save(step, state, {"step": step}, force=step == t.max_steps)
                if ckpt.should_stop:
                    _log(f"preempted: saved step {step}; rerun the same command to resume")
                    break
    finally:
        ckpt.close()

    # --- export ----------------------------------------------------------------------------
    if eval_data is None or not export_dir.exists():
        export(model, merge_params(state.params, frozen), export_dir)
    if best is not None:
        _log(f"best eval top-1 {best['eval_top1']:.4f} at step {best['step']}; exported to {export_dir}")
    else:
        _log(f"exported step {step} to {export_dir}")
    return {"step": step, "export_dir": str(export_dir), "best": best, "eval": last_eval}
