"""The DreamBooth run config: a typed schema (the source of truth for every key) and its loader.

`load(path, overrides)` is `jaxvision.train.config.load_config(DreamBoothConfig, ...)`: YAML files
in `configs/dreambooth/` extend `base.yaml`, dotted `key=value` overrides come last, and unknown
keys or values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses

from jaxvision.errors import ConfigError
from jaxvision.train.config import (
    CheckpointSection,
    LogSection,
    MeshSection,
    ModelSection,
    TrainSection,
    load_config,
    require,
)
from jaxvision.train.lora import LoraConfig

# Shape-only model variants for `plan` when model.path holds no config files:
# name → (UNet variant, CLIP text variant, VAE variant, prediction_type).
PLAN_VARIANTS = {"sd15": ("sd15", "sd1", "sd", "epsilon"), "sd21": ("sd21", "sd2", "sd", "v_prediction")}


# ----------------------------------------------------------------------------- config schema


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamBoothModelSection(ModelSection):
    """The base model: a local diffusers Stable Diffusion directory.

    Attributes:
      variant: "sd15" or "sd21"; only `plan` reads it, when `path` holds no config files (a
        shape-only plan needs no weights on disk).
    """

    variant: str | None = None

    def __post_init__(self):
        super().__post_init__()
        ok = self.variant is None or self.variant in PLAN_VARIANTS
        require(ok, "variant", self.variant, f"choose one of {', '.join(PLAN_VARIANTS)}, or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamBoothDataSection:
    """Instance photos, prompts and the class-image cache.

    Attributes:
      instance_dir: folder of 3-20 photos of the subject.
      instance_prompt: prompt with a rare identifier token, e.g. "a photo of sks dog".
      class_dir: class-image cache folder (required with prior preservation).
      class_prompt: prompt of the class, e.g. "a photo of a dog".
      num_class_images: class images wanted; missing ones are generated with the base model.
      resolution: training height and width in pixels (a multiple of the VAE's factor).
      center_crop: centered crops (false: random crops).
      random_flip: horizontal flips with probability 1/2.
      min_instance_images: fewest readable instance photos accepted.
      class_seed: file `class_{i:05d}.png` is generated with seed `class_seed + i`.
      class_scheduler: sampler for class images (null: the checkpoint's).
      class_inference_steps, class_guidance_scale, class_batch_size: class-image sampling.
      cache_latents: VAE-encode every image (both orientations with `random_flip`) once before
        training instead of every step; needs `center_crop` (see `trainers.dreambooth.cache`).
      cache_text_embeddings: run the frozen text encoder once on the two prompts; needs
        `train.train_text_encoder=false`.
    """

    instance_dir: str
    instance_prompt: str
    class_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    min_instance_images: int = 1
    class_seed: int = 0
    class_scheduler: str | None = None
    class_inference_steps: int = 50
    class_guidance_scale: float = 7.5
    class_batch_size: int = 4
    cache_latents: bool = False
    cache_text_embeddings: bool = False

    def __post_init__(self):
        require(bool(self.instance_dir), "instance_dir", self.instance_dir, "give the folder of instance photos")
        require(bool(self.instance_prompt), "instance_prompt", self.instance_prompt, "give the instance prompt")
        require(self.num_class_images >= 1, "num_class_images", self.num_class_images, "must be >= 1")
        require(self.resolution >= 8 and self.resolution % 8 == 0, "resolution", self.resolution, "a multiple of 8")
        require(self.min_instance_images >= 1, "min_instance_images", self.min_instance_images, "must be >= 1")
        require(self.class_inference_steps >= 1, "class_inference_steps", self.class_inference_steps, "must be >= 1")
        require(self.class_batch_size >= 1, "class_batch_size", self.class_batch_size, "must be >= 1")
        ok = self.center_crop or not self.cache_latents
        require(ok, "cache_latents", self.cache_latents, "random crops change every step: set center_crop=true")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamBoothTrainSection(TrainSection):
    """The shared optimization settings plus DreamBooth's own.

    Attributes:
      prior_loss_weight: weight of the class-image MSE; 0 turns prior preservation off.
      train_text_encoder: train the CLIP text encoder too (else it is frozen).
      text_encoder_learning_rate: the text encoder's peak learning rate (null: `learning_rate`);
        it follows the same schedule shape.
      export_trained_only: export only the trained networks (`unet/`, plus `text_encoder/` when
        trained) instead of the whole pipeline (see `outputs.export_model`).
      offset_noise: add `offset_noise * N(0, 1)` per sample and channel to the noise (0: off).
      snr_gamma: min-SNR-γ weighting of the instance loss (Hang et al., 2023); null: off.
      lora: low-rank adapters instead of full fine-tuning (`lora.rank` > 0; see `jaxvision.train.lora`).
    """

    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None
    export_trained_only: bool = False
    offset_noise: float = 0.0
    snr_gamma: float | None = None
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def __post_init__(self):
        super().__post_init__()
        require(self.prior_loss_weight >= 0, "prior_loss_weight", self.prior_loss_weight, "must be >= 0")
        te_lr = self.text_encoder_learning_rate
        require(te_lr is None or te_lr >= 0, "text_encoder_learning_rate", te_lr, "must be >= 0, or null")
        require(self.offset_noise >= 0, "offset_noise", self.offset_noise, "must be >= 0")
        require(self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma", self.snr_gamma, "must be > 0, or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValidationSection:
    """Validation samples: every prompt, `num_images_per_prompt` fixed seeds, every `every_steps`.

    An empty `prompts` list turns validation off. Grids go to `output_dir/samples/` and TensorBoard.
    """

    prompts: tuple[str, ...] = ()
    every_steps: int = 100
    num_images_per_prompt: int = 2
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str | None = None
    seed: int = 0

    def __post_init__(self):
        require(self.every_steps >= 1, "every_steps", self.every_steps, "must be >= 1")
        require(self.num_images_per_prompt >= 1, "num_images_per_prompt", self.num_images_per_prompt, "must be >= 1")
        require(self.num_inference_steps >= 1, "num_inference_steps", self.num_inference_steps, "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DreamBoothConfig:
    """A DreamBooth run (`jaxvision dreambooth --config FILE`); see DESIGN.md's run contract."""

    output_dir: str
    model: DreamBoothModelSection
    data: DreamBoothDataSection
    train: DreamBoothTrainSection
    validation: ValidationSection = dataclasses.field(default_factory=ValidationSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    def __post_init__(self):
        if self.train.prior_loss_weight > 0:
            for key in ("class_dir", "class_prompt"):
                if not getattr(self.data, key):
                    raise ConfigError(
                        f"data.{key} is required with prior preservation (train.prior_loss_weight="
                        f"{self.train.prior_loss_weight}); set it, or set train.prior_loss_weight=0"
                    )

        if self.data.cache_text_embeddings and self.train.train_text_encoder:
            raise ConfigError(
                "data.cache_text_embeddings=true needs a frozen text encoder, but train.train_text_encoder=true; "
                "set one of them to false"
            )

    @property
    def prior_preservation(self) -> bool:
        return self.train.prior_loss_weight > 0


def load(path: str | None, overrides: tuple[str, ...] | list[str] = ()) -> DreamBoothConfig:
    """`load_config(DreamBoothConfig, path, overrides)`."""
    return load_config(DreamBoothConfig, path, overrides)
