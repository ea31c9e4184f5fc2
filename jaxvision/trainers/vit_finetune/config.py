"""The run-config schema of `jaxvision finetune` (ViT fine-tuning): `FinetuneConfig` and its sections.

The YAML files in `configs/vit/` override these defaults (`configs/vit/base.yaml` first); every
field is documented here. The trainer is `jaxvision.trainers.vit_finetune.train`.
"""

from __future__ import annotations

import dataclasses

from jaxvision.models import vit
from jaxvision.train.config import (
    DTYPES,
    CheckpointSection,
    LogSection,
    MeshSection,
    TrainSection,
    check_attention_impl,
    load_config,
    require,
)
from jaxvision.trainers.vit_finetune import data as data_lib


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
      attention_impl: the attention kernel (`jaxvision.models.kernels`): "auto" chooses for the
        devices the step runs on; None lets JAX choose.
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
    attention_impl: str | None = "auto"

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
        check_attention_impl(self.attention_impl)

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
class FinetuneDataSection:
    """Training, eval (model selection) and test data: class folders, a TFDS dataset, or digits.

    Exactly one source: `train_dir` (+ `eval_dir`, `test_dir`), `tfds_name` (+ `train_split`,
    `eval_split`, `test_split`), or `dataset`. The eval data picks the exported checkpoint (best
    eval top-1); the test data is only scored — for the selected checkpoint — and never selects.

    Attributes:
      train_dir: folder with one subfolder per class (the sorted names become `id2label`).
      eval_dir: the same layout for evaluation (optional; its classes must be among train_dir's).
      test_dir: the same layout for the held-out test score (optional).
      tfds_name: a TFDS dataset prepared in array_record format (`tfds build NAME
        --file_format=array_record`), read with `tfds.data_source`; optional `name/config:version`.
      data_dir: the TFDS data directory (None: TFDS's default).
      train_split, eval_split, test_split: TFDS split names (slicing allowed, e.g. "train[:90%]");
        eval / test null to skip.
      image_key, label_key: the TFDS `Image` and `ClassLabel` feature names.
      tfds_download: let TFDS download and prepare a missing dataset (off: runs never fetch data).
      dataset: "digits" (scikit-learn's 8x8 digits; fixed stratified 70/10/20 train / validation /
        test split: selection on validation, the score on test).
      augment: random resized crop + horizontal flip on training images (not on digits).
      crop_min_scale: smallest area fraction of the random resized crop.
      hflip: horizontal flips (turn off for data where left/right matters).
      max_shift: random translation of training images by up to this many pixels (any source,
        digits included; 0: off).
      num_threads: grain threads that decode and augment ahead of the train step.
      prefetch: batches grain keeps ready.
    """

    train_dir: str | None = None
    eval_dir: str | None = None
    test_dir: str | None = None
    tfds_name: str | None = None
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    tfds_download: bool = False
    dataset: str | None = None
    augment: bool = True
    crop_min_scale: float = 0.35
    hflip: bool = True
    max_shift: int = 0
    num_threads: int = 2
    prefetch: int = 2

    def __post_init__(self):
        require(
            self.dataset is None or self.dataset in data_lib.DATASETS,
            "dataset",
            self.dataset,
            f"choose one of {', '.join(data_lib.DATASETS)}, or give data.train_dir or data.tfds_name",
        )
        sources = [k for k in ("train_dir", "tfds_name", "dataset") if getattr(self, k) is not None]
        require(
            len(sources) <= 1,
            sources[-1] if sources else "dataset",
            getattr(self, sources[-1]) if sources else None,
            f"give one data source, not {' and '.join('data.' + k for k in sources)}",
        )
        for name in ("eval_dir", "test_dir"):
            require(getattr(self, name) is None or self.train_dir is not None, name, getattr(self, name),
                    "needs data.train_dir")  # fmt: skip
        for name in ("eval_split", "test_split", "data_dir"):
            require(getattr(self, name) is None or self.tfds_name is not None, name, getattr(self, name),
                    "needs data.tfds_name")  # fmt: skip
        require(0.0 < self.crop_min_scale <= 1.0, "crop_min_scale", self.crop_min_scale, "must be in (0, 1]")
        require(self.max_shift >= 0, "max_shift", self.max_shift, "must be >= 0")
        require(self.num_threads >= 0, "num_threads", self.num_threads, "must be >= 0")
        require(self.prefetch >= 1, "prefetch", self.prefetch, "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """A ViT fine-tuning run (`jaxvision finetune`); see `configs/vit/`."""

    output_dir: str
    model: FinetuneModelSection
    train: FinetuneTrainSection
    data: FinetuneDataSection = dataclasses.field(default_factory=FinetuneDataSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)


def load(path: str | None, overrides: tuple[str, ...] | list[str] = ()) -> FinetuneConfig:
    """`load_config(FinetuneConfig, path, overrides)`."""
    return load_config(FinetuneConfig, path, overrides)
