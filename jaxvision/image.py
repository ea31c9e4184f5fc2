"""Image decoding and ViT preprocessing, matching transformers' `ViTImageProcessorPil`.

`load_image` turns any file Pillow reads into an upright 8-bit RGB image; `Preprocessor`
applies a checkpoint's `preprocessor_config.json` (resize, optional center crop, rescale,
normalise) and returns `[height, width, 3]` float32 arrays (NHWC once batched) equal to the
`pixel_values` transformers computes, channel axis moved last.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxvision.errors import ConfigError, ImageDecodeError

PREPROCESSOR_FILE = "preprocessor_config.json"
# The file suffixes (lower case) an image folder is read for, by every trainer.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Pillow modes holding more than 8 bits per sample (one band each).
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_RESAMPLE_NAMES = {int(r): r.name for r in Image.Resampling}


def to_8bit(image: Image.Image) -> Image.Image:
    """Scales a 16-bit, 32-bit integer or float image to mode "L", keeping its dynamic range.

    Pillow's own `convert("L")` clips these modes at 255, which turns most 16-bit photos white.
    Here integer samples in [0, 65535] map to `round(v / 257)` (so an 8-bit image stored as 16-bit
    round-trips exactly); floats in [0, 1] map to `round(v * 255)`; anything else (negative or
    larger values) is stretched linearly from [min, max] to [0, 255].

    Args:
      image: a Pillow image in mode "I;16", "I;16B", "I;16L", "I;16N", "I" or "F".
    Returns:
      A mode "L" image of the same size.
    """
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB as a user expects.

    Transparency (an "A" band, or a palette / "L" / "RGB" image with a `transparency` entry) is
    composited onto white exactly as transformers' `image_transforms.convert_to_rgb` does;
    high-bit-depth modes are scaled to 8 bits (`to_8bit`); every other mode (L, 1, P, CMYK,
    YCbCr, LAB, HSV, ...) goes through Pillow's `convert("RGB")`.
    """
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = to_8bit(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        # Same steps as transformers' convert_to_rgb, so the composited pixels match bit for bit.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decodes an image file into an upright RGB image.

    The EXIF orientation tag is applied (`ImageOps.exif_transpose`), then the mode is converted
    with `to_rgb`. The whole file is decoded here, so a truncated file fails now rather than later.

    Args:
      path: any format Pillow reads.
    Returns:
      A mode "RGB" image `[height, width]` as displayed by an EXIF-aware viewer.
    Raises:
      ImageDecodeError: the file is missing, is not an image, or is truncated/corrupt.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
        return to_rgb(image)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(
            f"{path}: cannot decode image ({type(e).__name__}: {e}); check that the file is a complete image "
            "(truncated downloads fail here) or remove it from the inputs"
        ) from e


# preprocessor_config.json keys that do not change the pixels jaxvision produces: bookkeeping,
# output layout/format switches of transformers (jaxvision always returns NHWC float32), and RGB
# conversion (jaxvision always converts; transformers' switch only matters for non-RGB inputs).
_INERT_KEYS = frozenset(
    {
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
        "_processor_class",
        "do_convert_rgb",
        "data_format",
        "input_data_format",
        "return_tensors",
        "device",
        "disable_grouping",
        "pad_size",
    }
)
_KNOWN_KEYS = frozenset(
    {
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_pad",
        "default_to_square",
    }
)


def _hw(value: Any, key: str, source: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return (int(value["height"]), int(value["width"]))
    raise ConfigError(f"{source}: {key}={value!r} must be an int or {{'height': H, 'width': W}}")


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """ViT image preprocessing as configured by a checkpoint's `preprocessor_config.json`.

    Defaults are transformers' `ViTImageProcessorPil` class defaults (bilinear resize to 224x224,
    rescale by 1/255, normalise with mean = std = 0.5).

    Attributes:
      size: `(height, width)` to resize to, or None when `shortest_edge` is used.
      shortest_edge: resize so the shorter side has this length, keeping the aspect ratio.
      crop_size: `(height, width)` of the center crop applied when `do_center_crop`.
      resample: a `PIL.Image.Resampling` value (2 = bilinear, 3 = bicubic).
    """

    do_resize: bool = True
    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    resample: int = int(Image.Resampling.BILINEAR)
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.do_resize and (self.size is None) == (self.shortest_edge is None):
            raise ConfigError("Preprocessor needs exactly one of size=(height, width) or shortest_edge when resizing")
        if self.do_center_crop and self.crop_size is None:
            raise ConfigError("Preprocessor: do_center_crop needs crop_size=(height, width)")
        if self.resample not in _RESAMPLE_NAMES:
            raise ConfigError(f"Preprocessor: resample={self.resample!r} is not a PIL resampling filter (0-5)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError(
                f"Preprocessor: image_mean={self.image_mean} and image_std={self.image_std} need 3 values each"
            )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """`(height, width)` of every output, or None when it depends on the input's aspect ratio."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.size is not None:
            return self.size
        return None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = PREPROCESSOR_FILE) -> Preprocessor:
        """From a `preprocessor_config.json` dict; keys that would change the pixels but are not
        implemented (e.g. `do_pad: true`, unknown keys) raise `ConfigError`."""
        unknown = sorted(k for k in cfg if k not in _KNOWN_KEYS and k not in _INERT_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown preprocessor key(s) {unknown}; jaxvision implements ViT preprocessing "
                f"({', '.join(sorted(_KNOWN_KEYS))}). Remove them if they are inert."
            )
        if cfg.get("do_pad"):
            raise ConfigError(f"{source}: do_pad=true is not supported for ViT preprocessing; set it to false")
        fields: dict[str, Any] = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if cfg.get(key) is not None:
                fields[key] = bool(cfg[key])
        if cfg.get("resample") is not None:
            fields["resample"] = int(cfg["resample"])
        if cfg.get("rescale_factor") is not None:
            fields["rescale_factor"] = float(cfg["rescale_factor"])
        for key in ("image_mean", "image_std"):
            value = cfg.get(key)
            if value is not None:
                fields[key] = tuple(float(v) for v in value) if isinstance(value, list | tuple) else (float(value),) * 3
        size = cfg.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:
            if set(size) != {"shortest_edge"}:
                raise ConfigError(f"{source}: size={size} is not supported; use shortest_edge alone or height/width")
            fields.update(size=None, shortest_edge=int(size["shortest_edge"]))
        elif isinstance(size, int) and cfg.get("default_to_square") is False:
            fields.update(size=None, shortest_edge=size)
        elif size is not None:
            fields["size"] = _hw(size, "size", source)
        if cfg.get("crop_size") is not None:
            fields["crop_size"] = _hw(cfg["crop_size"], "crop_size", source)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Preprocessor:
        """Reads `directory/preprocessor_config.json`.

        When the file is absent, falls back to `ViTImageProcessor`'s defaults sized to the model:
        `size = config.json`'s `image_size` (224 when that is absent too), bilinear, rescale by
        1/255, mean = std = 0.5 — what transformers' ViT checkpoints use.
        """
        directory = Path(directory)
        path = directory / PREPROCESSOR_FILE
        if path.exists():
            try:
                cfg = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{path}: not valid JSON ({e}); restore it or delete it to use the defaults"
                ) from None
            return cls.from_dict(cfg, str(path))
        config_path = directory / "config.json"
        image_size: Any = 224
        if config_path.exists():
            image_size = json.loads(config_path.read_text()).get("image_size", 224)
        if isinstance(image_size, list | tuple):
            return cls(size=(int(image_size[0]), int(image_size[1])))
        return cls(size=(int(image_size), int(image_size)))

    def to_json(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict transformers' `ViTImageProcessorPil` /
        `AutoImageProcessor` reads back to the same preprocessing."""
        out: dict[str, Any] = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": self.do_resize,
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        if self.shortest_edge is not None:
            out["size"] = {"shortest_edge": self.shortest_edge}
        elif self.size is not None:
            out["size"] = {"height": self.size[0], "width": self.size[1]}
        if self.do_center_crop:
            out["do_center_crop"] = True
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return out

    def save(self, directory: str | Path) -> Path:
        """Writes `directory/preprocessor_config.json`; returns its path."""
        path = Path(directory) / PREPROCESSOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    def _resize_target(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        # transformers' get_resize_output_image_size(default_to_square=False): truncating int().
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Preprocesses one image.

        Args:
          image: a Pillow image of any mode (converted with `to_rgb`).
        Returns:
          `[height, width, 3]` float32, equal to transformers' `pixel_values[0]` moved to
          channels-last.
        """
        image = to_rgb(image)
        if self.do_resize:
            height, width = self._resize_target(image.height, image.width)
            image = image.resize((width, height), resample=self.resample, reducing_gap=None)
        x = np.asarray(image)
        if self.do_center_crop:
            x = _center_crop(x, self.crop_size)
        # The dtype path follows transformers exactly: rescale in float64 then cast to float32;
        # normalise in float32 with float32 mean/std.
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            x = (x - np.asarray(self.image_mean, x.dtype)) / np.asarray(self.image_std, x.dtype)
        return np.ascontiguousarray(x, dtype=np.float32)


def _center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' `center_crop` on `[H, W, C]`: crops, zero-padding first where the image is smaller."""
    crop_h, crop_w = size
    h, w = x.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return x[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w, x.shape[2]), x.dtype)
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
