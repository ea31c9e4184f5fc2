"""Image-classification data for ViT fine-tuning: sources (class folders, scikit-learn's digits,
TFDS datasets) fed through grain.

Three sources, each an `Examples`: a random-access sequence of `(PIL image, class index)` records.

- image folders (`data.train_dir`, `data.eval_dir`, `data.test_dir`): one subfolder per class, the
  sorted subfolder names are the labels (`id2label`); files are decoded on access with
  `jaxvision.image.load_image`.
- `dataset: digits`: scikit-learn's bundled 8x8 digits (1797 images, no download), split once,
  stratified, into train / validation / test, each image as 8-bit grayscale nearest-upscaled to the
  model's input size (exactly what a PNG of it fed to `jaxvision classify` gives).
- TFDS (`data.tfds_name`): a prepared TFDS dataset in array_record format, read record by record
  with `tfds.data_source` (random access, no TensorFlow); labels from its `ClassLabel` feature.

`Pipeline` turns them into batches with grain: the train stream is
`MapDataset.source(examples).seed(seed).shuffle().repeat().random_map(augment).batch(...)` (a fresh
global permutation per epoch; augmentation — random resized crop + flip, and/or a random shift —
drawn from a generator grain seeds with the element's position in the run), and this process's
share is every `process_count`-th sub-batch; eval images are resized (+ center-cropped) as the
model's preprocessor says, in example order, the last batch padded and masked. Its
iterator's `get_state()` is saved in the Orbax checkpoint's "data" item and `set_state()` resumes it;
since every element is a pure function of `(seed, position)`, a resumed run sees bit-identical
batches whatever the number of processes or reader threads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxvision.errors import ConfigError
from jaxvision.image import IMAGE_SUFFIXES, Preprocessor, load_image

DATASETS = ("digits",)
DIGIT_LABELS = tuple(str(d) for d in range(10))
# The digits split is fixed (not tied to train.seed) so "the test split" means one thing everywhere.
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "validation", "test")
DIGITS_VALIDATION_FRACTION = 0.1
DIGITS_TEST_FRACTION = 0.2
# grain's shuffle and random_map take seeds in [0, 2**32).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Examples:
    """A labelled split: a random-access sequence of `(image, class index)` records.

    Exactly one of `images`, `paths`, `records` holds the data (`pixels` may be added by
    `Pipeline.materialize`).

    Attributes:
      labels: class names, index i → name (the model's `id2label`).
      targets: `[n]` int32 class index of each example; None for TFDS (read with each record).
      images: `[n, height, width]` uint8 grayscale images (digits), or None.
      paths: `n` image files (class folders), or None.
      records: a TFDS data source (`tfds.data_source`), or None.
      image_key, label_key: the TFDS feature names of the image and the label.
      pixels: `[n, H, W, 3]` float32 preprocessed images (`Pipeline.materialize`), or None.
    """

    labels: tuple[str, ...]
    targets: np.ndarray | None = None
    images: np.ndarray | None = None
    paths: tuple[Path, ...] | None = None
    records: Sequence[dict[str, Any]] | None = None
    image_key: str = "image"
    label_key: str = "label"
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image | np.ndarray, int]:
        """Record `index`: the decoded image (or its `pixels` once materialized) and its class index."""
        if self.records is not None:
            record = self.records[index]
            return _array_to_image(record[self.image_key]), int(record[self.label_key])
        target = int(self.targets[index])
        if self.pixels is not None:
            return self.pixels[index], target
        if self.images is not None:
            return Image.fromarray(self.images[index], mode="L"), target
        return load_image(self.paths[index]), target


def _array_to_image(array: np.ndarray) -> Image.Image:
    """A TFDS `Image` feature value (`[H, W, C]` uint8, C in 1/3/4) as a PIL image."""
    array = np.asarray(array)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


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
    """One split of scikit-learn's digits, 8x8 uint8: "train" (70 %), "validation" (10 %) or "test" (20 %).

    Stratified and fixed (`DIGITS_SPLIT_SEED`, not `train.seed`): each class is permuted once and cut
    into test / validation / train shares, so every split holds each digit in the dataset's
    proportion (1259 / 179 / 359 images). Training selects its best checkpoint on "validation";
    "test" is only ever scored, never selected on. Examples keep the dataset's order within a split.
    """
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"digits split {split!r} does not exist; choose one of {', '.join(DIGITS_SPLITS)}")
    images, targets = _digits_raw()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in DIGITS_SPLITS}
    for digit in range(len(DIGIT_LABELS)):
        members = rng.permutation(np.flatnonzero(targets == digit))
        num_test = int(round(len(members) * DIGITS_TEST_FRACTION))
        num_val = int(round(len(members) * DIGITS_VALIDATION_FRACTION))
        parts["test"].append(members[:num_test])
        parts["validation"].append(members[num_test : num_test + num_val])
        parts["train"].append(members[num_test + num_val :])
    index = np.sort(np.concatenate(parts[split]))
    return Examples(labels=DIGIT_LABELS, targets=targets[index], images=images[index])


def tfds_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
    download: bool = False,
    key: str = "data.tfds_name",
) -> Examples:
    """One split of a TFDS dataset in array_record format, read with `tfds.data_source`.

    Records are read and decoded one at a time on access (random access, as grain's sampler
    needs; no TensorFlow). The dataset must already be prepared in `data_dir` with
    `file_format="array_record"` (e.g. `tfds build NAME --file_format=array_record`), unless
    `download` is set.

    Args:
      name: the TFDS name, optionally with config and version (`"mnist"`, `"my_ds/cfg:1.0.0"`).
      split: a TFDS split, slicing allowed (`"train"`, `"train[:90%]"`).
      data_dir: the TFDS data directory (None: TFDS's default, `~/tensorflow_datasets`).
      image_key: the `tfds.features.Image` feature to read.
      label_key: the `tfds.features.ClassLabel` feature; its names become `id2label`.
      download: let TFDS download and prepare the dataset if it is missing.
      key: the config key, named in error messages.
    Returns:
      `Examples` with `records`.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError(
            f"{key}={name!r} needs tensorflow-datasets, array_record and grain: "
            '`pip install -c constraints.txt -e ".[data]"`'
        ) from None
    where = f"in data.data_dir={str(data_dir)!r}" if data_dir is not None else "in TFDS's default data_dir"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except Exception as err:  # TFDS raises ValueError, AssertionError, FileNotFoundError, ...
        raise ConfigError(
            f"{key}={name!r} (split {split!r}) could not be read {where}: {str(err).splitlines()[0]}. "
            "Prepare it as array_record first (`tfds build NAME --file_format=array_record --data_dir DIR`)"
        ) from err
    features = source.dataset_info.features
    for feature_key, config_key, kind in ((image_key, "image_key", "Image"), (label_key, "label_key", "ClassLabel")):
        if feature_key not in features:
            raise ConfigError(
                f"{key}={name!r} has no feature data.{config_key}={feature_key!r}; "
                f"its features are {sorted(features.keys())}: set data.{config_key} to its {kind} feature"
            )
    names = getattr(features[label_key], "names", None)
    if not names:
        raise ConfigError(f"{key}={name!r}: feature {label_key!r} is not a ClassLabel with names (data.label_key)")
    if len(source) == 0:
        raise ConfigError(f"{key}={name!r} split {split!r} is empty")
    return Examples(labels=tuple(names), records=source, image_key=image_key, label_key=label_key)


def upscale_digit(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An 8x8 uint8 digit as the grayscale PIL image, nearest-upscaled to `size` `(height, width)`."""
    return Image.fromarray(image, mode="L").resize((size[1], size[0]), resample=Image.Resampling.NEAREST)


def shift_pixels(pixels: np.ndarray, dy: int, dx: int, fill: np.ndarray) -> np.ndarray:
    """`[H, W, C]` `pixels` moved down `dy` and right `dx` pixels (negative: up / left), `fill` where uncovered."""
    height, width = pixels.shape[:2]
    out = np.empty_like(pixels)
    out[...] = fill
    src_y, dst_y = slice(max(0, -dy), min(height, height - dy)), slice(max(0, dy), min(height, height + dy))
    src_x, dst_x = slice(max(0, -dx), min(width, width - dx)), slice(max(0, dx), min(width, width + dx))
    out[dst_y, dst_x] = pixels[src_y, src_x]
    return out


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
    """Turns `Examples` into model-ready batches through grain.

    Attributes:
      preprocessor: the model's preprocessing (what the exported `preprocessor_config.json` says):
        resize (+ center crop) for eval images, rescale / normalise for all.
      image_size: the model's `(height, width)`.
      augment: random resized crop + flip on training images (never on digits, whose strokes sit
        at fixed positions of an 8x8 grid).
      crop_min_scale: smallest crop area fraction of the random resized crop.
      hflip: flip training images horizontally with probability 1/2.
      max_shift: translate training images by up to this many pixels in each direction (after any
        crop), filling with black; the augmentation digits use (0: off).
      num_threads: grain reader threads decoding and augmenting batches ahead of the step.
      prefetch: batches grain keeps ready.
    """

    preprocessor: Preprocessor
    image_size: tuple[int, int]
    augment: bool = True
    crop_min_scale: float = 0.35
    hflip: bool = True
    max_shift: int = 0
    num_threads: int = 2
    prefetch: int = 2

    def example(self, data: Examples, index: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """One preprocessed example `[height, width, 3]` float32; `rng` turns augmentation on."""
        image, _ = data[index]
        return self._transform(data, image, rng)

    def _transform(self, data: Examples, image: Image.Image | np.ndarray, rng: np.random.Generator | None):
        if isinstance(image, np.ndarray):  # materialized
            pixels = image
        elif data.images is not None:
            pixels = self.preprocessor(upscale_digit(np.asarray(image), self.image_size))
        elif rng is None or not self.augment:
            pixels = self.preprocessor(image)
        else:
            image = random_resized_crop(image, self.image_size, rng, self.crop_min_scale, self.preprocessor.resample)
            if self.hflip and rng.uniform() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # The crop is already at the model size: only rescale / normalise remain.
            pixels = dataclasses.replace(self.preprocessor, do_resize=False, do_center_crop=False)(image)
        if rng is not None and self.max_shift:
            dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=2)
            pixels = shift_pixels(pixels, int(dy), int(dx), self._black)
        return pixels

    @functools.cached_property
    def _black(self) -> np.ndarray:
        """`[3]` float32: a black pixel after preprocessing (what a shift uncovers)."""
        return self.preprocessor(Image.new("RGB", self.image_size[::-1]))[0, 0]

    def materialize(self, data: Examples) -> Examples:
        """`data` with every example preprocessed once (for small, unaugmented in-memory datasets)."""
        pixels = np.stack([self.example(data, i) for i in range(len(data))])
        return dataclasses.replace(data, pixels=pixels)

    def _read_options(self):
        import grain

        return grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)

    def train_dataset(self, data: Examples, seed: int, batch_size: int) -> Any:
        """The endless training stream of this process's batches, as a `grain.MapDataset`.

        Element `step` is this process's rows of global batch `step`: global batch `step` holds
        the run's examples `step * batch_size ... (step + 1) * batch_size - 1`, where run example
        `i` is position `i % n` of epoch `i // n`'s permutation (batches run across epoch
        boundaries without dropping examples), and process `p` of `P` holds its `p`-th contiguous
        `batch_size / P` rows. Augmentation draws depend on the run position only, so a row's
        crop does not depend on how many processes share the batch.

        Returns:
          A `grain.MapDataset` of `{"image": [rows, H, W, 3] float32, "label": [rows] int32}`.
        """
        import grain

        rows = _local_rows(batch_size)

        def transform(record: tuple[Any, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
            image, label = record
            return {"image": self._transform(data, image, rng), "label": np.int32(label)}

        examples = grain.MapDataset.source(data).seed(seed % (MAX_SEED + 1)).shuffle().repeat().random_map(transform)
        count, index = jax_process_count_index()
        return examples.batch(rows.stop - rows.start, drop_remainder=True)[index::count]

    def train_iterator(self, data: Examples, seed: int, batch_size: int, state: dict[str, Any] | None = None):
        """A checkpointable iterator over `train_dataset` (reader threads + prefetch).

        Args:
          state: an earlier iterator's `get_state()` to continue from (None: from step 0).
        Returns:
          A `grain.DatasetIterator`; `get_state()` / `set_state()` are JSON-able dicts.
        """
        iterator = iter(self.train_dataset(data, seed, batch_size).to_iter_dataset(self._read_options()))
        if state is not None:
            iterator.set_state(state)
        return iterator

    def eval_batches(self, data: Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-size eval batches in example order (this process's rows); the last one is padded.

        Yields:
          `{"image": [rows, H, W, 3], "label": [rows] int32, "mask": [rows] float32}`, `mask` 0
          on padding.
        """
        import grain

        n = len(data)
        rows = _local_rows(batch_size)

        def transform(position: int) -> dict[str, np.ndarray]:
            image, label = data[int(position) if position < n else 0]
            return {
                "image": self._transform(data, image, None),
                "label": np.int32(label),
                "mask": np.float32(position < n),
            }

        padded = grain.MapDataset.range(-(-n // batch_size) * batch_size).map(transform)
        count, index = jax_process_count_index()
        yield from padded.batch(rows.stop - rows.start)[index::count].to_iter_dataset(self._read_options())


def jax_process_count_index() -> tuple[int, int]:
    """`(jax.process_count(), jax.process_index())`: how many processes share each batch, and which one this is."""
    import jax

    return jax.process_count(), jax.process_index()


def _local_rows(batch_size: int) -> slice:
    """This process's rows of a global batch (process i holds the i-th contiguous share)."""
    count, index = jax_process_count_index()
    if batch_size % count:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {count} processes")
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


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
