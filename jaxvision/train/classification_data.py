"""Image-classification data for ViT fine-tuning: class-folder datasets and scikit-learn's digits.

A plain NumPy pipeline (grain is not a dependency; TFDS is out of scope). Every batch is a pure
function of `(seed, step)`: the example order is a fresh seeded permutation per epoch, and the
augmentation draws (random resized crop, horizontal flip) come from a generator seeded with
`[seed, step, stream]`. The iterator's whole checkpointable position is therefore the step
counter, and a resumed run sees bit-identical batches.

Two sources:

- image folders (`data.train_dir`, `data.eval_dir`): one subfolder per class, the sorted
  subfolder names are the labels (`id2label`). Files are decoded on the fly with
  `jaxvision.image.load_image` and preprocessed by the model's `Preprocessor`; training images get
  a light random resized crop + horizontal flip first.
- `dataset: digits`: scikit-learn's bundled 8x8 digits (1797 images, no download), split once into
  train/test by a fixed permutation, each image scaled to 8-bit grayscale, upscaled (nearest) to
  the model's input size, then preprocessed exactly as a PNG of it would be by `jaxvision classify`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from jaxvision.errors import ConfigError
from jaxvision.image import Preprocessor, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATASETS = ("digits",)
DIGIT_LABELS = tuple(str(d) for d in range(10))
# The digits split is fixed (not tied to train.seed) so "the test split" means one thing everywhere.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
# Seeds of the per-step augmentation generator are `[seed, step, _AUGMENT_STREAM]`, and of the
# per-epoch order `[seed, epoch, _ORDER_STREAM]`, so the two never share a stream.
_AUGMENT_STREAM = 0xA06
_ORDER_STREAM = 0x0D3


@dataclasses.dataclass(frozen=True)
class Examples:
    """A labelled split: either decoded arrays (`images`) or files read on demand (`paths`).

    Attributes:
      labels: class names, index i → name (the model's `id2label`).
      targets: `[n]` int32 class index of each example.
      images: `[n, height, width]` uint8 grayscale images (digits), or None.
      paths: `n` image files (class folders), or None.
      pixels: `[n, H, W, 3]` float32 preprocessed images (`Pipeline.materialize`), or None.
    """

    labels: tuple[str, ...]
    targets: np.ndarray
    images: np.ndarray | None = None
    paths: tuple[Path, ...] | None = None
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)


def class_names(directory: str | os.PathLike, key: str = "data.train_dir") -> tuple[str, ...]:
    """The sorted names of the class subfolders of `directory`."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{key}={str(directory)!r} is not a directory; give a folder with one subfolder per class")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise ConfigError(
            f"{key}={str(directory)!r} has no class subfolders; put each class's images in its own folder"
        )
    return names


def image_folder(directory: str | os.PathLike, labels: tuple[str, ...] | None = None, key: str = "data.train_dir"):
    """The examples of a class-folder dataset, files sorted per class.

    Args:
      directory: the root folder; `directory/<class name>/*.png` etc.
      labels: the class names to use (the training set's, for an eval folder); None reads them
        from `directory`.
      key: the config key, named in error messages.
    Returns:
      `Examples` with `paths`.
    """
    found = class_names(directory, key)
    labels = found if labels is None else labels
    extra = sorted(set(found) - set(labels))
    if extra:
        raise ConfigError(
            f"{key}={str(directory)!r} has class folders {extra} that data.train_dir does not have; "
            f"the classes are {list(labels)}"
        )
    paths, targets = [], []
    for index, name in enumerate(labels):
        folder = Path(directory) / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(files)
        targets.extend([index] * len(files))
    if not paths:
        raise ConfigError(
            f"{key}={str(directory)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders"
        )
    return Examples(labels=labels, targets=np.asarray(targets, np.int32), paths=tuple(paths))


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data.dataset=digits needs scikit-learn: `pip install scikit-learn`") from None
    digits = load_digits()
    # 0..16 intensities → 8-bit, the form a PNG of the digit holds.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int32)


def digits_split(split: str) -> Examples:
    """The fixed "train" (80 %) or "test" (20 %, 359 images) split of scikit-learn's digits, 8x8 uint8."""
    images, targets = _digits_raw()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(targets))
    num_test = int(round(len(targets) * DIGITS_TEST_FRACTION))
    index = {"test": order[:num_test], "train": order[num_test:]}[split]
    return Examples(labels=DIGIT_LABELS, targets=targets[index], images=images[index])


def upscale_digit(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An 8x8 uint8 digit as the grayscale PIL image, nearest-upscaled to `size` `(height, width)`."""
    return Image.fromarray(image, mode="L").resize((size[1], size[0]), resample=Image.Resampling.NEAREST)


def random_resized_crop(
    image: Image.Image, size: tuple[int, int], rng: np.random.Generator, min_scale: float, resample: int
) -> Image.Image:
    """torchvision's `RandomResizedCrop` (area in [min_scale, 1], aspect in [3/4, 4/3]) with PIL resizing.

    Returns:
      The crop resized to `size` `(height, width)`; after 10 failed draws, the whole image.
    """
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return image.resize((size[1], size[0]), resample=resample, box=(left, top, left + w, top + h))
    return image.resize((size[1], size[0]), resample=resample)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Turns `Examples` into model-ready batches.

    Attributes:
      preprocessor: the model's preprocessing (what the exported `preprocessor_config.json` says).
      image_size: the model's `(height, width)`.
      augment: random resized crop + flip on training batches of image folders (never on digits).
      crop_min_scale: smallest crop area fraction of the random resized crop.
      hflip: flip training images horizontally with probability 1/2.
    """

    preprocessor: Preprocessor
    image_size: tuple[int, int]
    augment: bool = True
    crop_min_scale: float = 0.35
    hflip: bool = True

    def example(self, data: Examples, index: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """One preprocessed example `[height, width, 3]` float32; `rng` turns augmentation on."""
        if data.pixels is not None:
            return data.pixels[index]
        if data.images is not None:
            return self.preprocessor(upscale_digit(data.images[index], self.image_size))
        image = load_image(data.paths[index])
        if rng is None or not self.augment:
            return self.preprocessor(image)
        image = random_resized_crop(image, self.image_size, rng, self.crop_min_scale, self.preprocessor.resample)
        if self.hflip and rng.uniform() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # The crop is already at the model size: only rescale / normalise remain.
        return dataclasses.replace(self.preprocessor, do_resize=False, do_center_crop=False)(image)

    def materialize(self, data: Examples) -> Examples:
        """`data` with every example preprocessed once (for small, unaugmented in-memory datasets)."""
        pixels = np.stack([self.example(data, i) for i in range(len(data))])
        return dataclasses.replace(data, pixels=pixels)

    def train_batch(self, data: Examples, seed: int, step: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]:
        """The training batch of `step` (0-based), only its `rows` (this process's share).

        Example `i` of the whole run (`i = step * batch_size + row`) is position `i % n` of epoch
        `i // n`'s permutation, so batches run across epoch boundaries without dropping examples.

        Returns:
          `{"image": [rows, H, W, 3] float32, "label": [rows] int32}`.
        """
        n = len(data)
        run_index = step * batch_size + np.arange(batch_size)[rows]
        order = {e: _epoch_order(n, seed, int(e)) for e in np.unique(run_index // n)}
        index = np.asarray([order[i // n][i % n] for i in run_index])
        rng = np.random.default_rng([seed, step, _AUGMENT_STREAM])
        # Every process draws the whole batch's augmentation streams, so a row's crop does not depend
        # on how many processes share the batch.
        row_rngs = rng.spawn(batch_size)[rows]
        images = np.stack([self.example(data, int(i), r) for i, r in zip(index, row_rngs, strict=True)])
        return {"image": images, "label": data.targets[index]}

    def eval_batches(self, data: Examples, batch_size: int, rows: slice) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-size eval batches in example order; the last one is padded (`mask` 0 on padding).

        Yields:
          `{"image": [rows, H, W, 3], "label": [rows] int32, "mask": [rows] float32}`.
        """
        for start in range(0, len(data), batch_size):
            index = np.arange(start, start + batch_size)[rows]
            valid = index < len(data)
            safe = np.where(valid, index, 0)
            images = np.stack([self.example(data, int(i)) for i in safe])
            yield {"image": images, "label": data.targets[safe], "mask": valid.astype(np.float32)}


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(n)


def write_digit_pngs(directory: str | os.PathLike, size: tuple[int, int], per_class: int = 1) -> list[Path]:
    """Writes the first `per_class` test-split digits of each class as `<label>_<k>.png` at `size`.

    The PNGs hold exactly the pixels the eval pipeline feeds the model (nearest-upscaled 8-bit
    grayscale), so `jaxvision classify` on them reproduces the eval predictions.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    test = digits_split("test")
    written = []
    for digit in range(len(DIGIT_LABELS)):
        for k, index in enumerate(np.flatnonzero(test.targets == digit)[:per_class]):
            path = directory / f"{DIGIT_LABELS[digit]}_{k}.png"
            upscale_digit(test.images[index], size).save(path)
            written.append(path)
    return written
