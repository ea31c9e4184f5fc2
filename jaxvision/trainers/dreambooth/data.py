"""DreamBooth data: the instance photos, the class (prior-preservation) images and their on-disk cache.

Images are decoded once (`jaxvision.image.load_image`: EXIF orientation, RGB), resized so the
shorter side equals the resolution (bilinear with antialiasing, as torchvision's `Resize` in
diffusers' `train_dreambooth.py`), and kept in memory. Each step's batch is a pure function of
`(seed, step)`: the image order (a fresh permutation per epoch), the crop offsets and the flips all
come from a NumPy generator seeded with both, so a resumed run sees exactly the batches a straight
run would have seen, and no iterator state beyond the step needs checkpointing.

Class images are generated with the base model through `StableDiffusionPipeline` (the jitted
sampler, its batch sharded over every device) when `class_dir` holds fewer than
`num_class_images`. Each file is written as soon as its batch is done, and `manifest.json` records
the prompt, the seed of every file, the model, the scheduler and the step count, so an interrupted
generation resumes where it stopped and existing images are never regenerated.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from jaxvision.errors import ConfigError, ImageDecodeError
from jaxvision.image import IMAGE_SUFFIXES, load_image

MANIFEST = "manifest.json"
# Seeds of the per-step generator are `[seed, step, STREAM]`, so data randomness never collides
# with the model's own PRNG stream (which lives in the train state).
_DATA_STREAM = 0x5EED


def list_images(directory: str | os.PathLike) -> list[Path]:
    """The image files directly inside `directory`, sorted by name (hidden files skipped)."""
    directory = Path(directory)
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def resize_shorter_side(image: Image.Image, size: int) -> np.ndarray:
    """Resizes so the shorter side is `size` (aspect kept), returns `[H, W, 3]` uint8."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(image.resize(new, Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)


def load_folder(
    directory: str | os.PathLike, size: int, *, min_images: int = 1, what: str = "instance", log: Callable = print
) -> tuple[list[np.ndarray], list[Path]]:
    """Decodes every image of a folder and resizes it (shorter side = `size`).

    Unreadable files are reported by name and skipped, as long as at least `min_images` remain.

    Args:
      directory: the folder (its direct children only).
      size: the training resolution.
      min_images: fewest usable images accepted.
      what: "instance" or "class", for messages.
      log: where skip notices go.
    Returns:
      `(images, paths)`: `[H_i, W_i, 3]` uint8 arrays with min(H_i, W_i) = size, and their files.
    Raises:
      ConfigError: the folder is missing, or fewer than `min_images` images could be read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"data.{what}_dir={str(directory)!r}: no such folder; put the {what} photos there")
    images, paths, bad = [], [], []
    for path in list_images(directory):
        try:
            images.append(resize_shorter_side(load_image(path), size))
            paths.append(path)
        except ImageDecodeError as e:
            bad.append(path)
            log(f"skipping unreadable {what} image {path}: {e}")
    if len(images) < min_images:
        found = f"{len(images)} readable image(s)" + (
            f" ({len(bad)} unreadable: {', '.join(map(str, bad))})" if bad else ""
        )
        raise ConfigError(
            f"data.{what}_dir={str(directory)!r}: {found}, but at least {min_images} are needed; "
            f"add {what} photos ({', '.join(IMAGE_SUFFIXES)})"
            + (" or lower data.min_instance_images" if what == "instance" else "")
        )
    return images, paths


def crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A `size`×`size` crop, centered or (with `rng`) at a random offset."""
    h, w = image.shape[:2]
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return image[top : top + size, left : left + size]


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., 3]` → float32 in [-1, 1] (what the VAE encoder expects)."""
    return images.astype(np.float32) / 127.5 - 1.0


class ImageSet:
    """Pre-resized images and the per-step sampling of a `[n, size, size, 3]` batch of them.

    Args:
      images: from `load_folder`.
      size: the training resolution.
      random_crop: random instead of centered crops.
      random_flip: flip each drawn image horizontally with probability 1/2.
    """

    def __init__(
        self, images: Sequence[np.ndarray], size: int, *, random_crop: bool = False, random_flip: bool = False
    ):
        if not images:
            raise ValueError("ImageSet needs at least one image")
        self.images = list(images)
        self.size = size
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, seed: int, step: int, count: int) -> np.ndarray:
        """The image indices of step `step`: rows `step*count ...` of an endless sequence of epochs,
        each a permutation seeded by `(seed, epoch)`; independent of how the run was split."""
        n = len(self.images)
        positions = np.arange(step * count, (step + 1) * count)
        out = np.empty(count, np.int64)
        for epoch in np.unique(positions // n):
            perm = np.random.default_rng([seed, int(epoch), _DATA_STREAM]).permutation(n)
            mask = positions // n == epoch
            out[mask] = perm[positions[mask] % n]
        return out

    def draws(self, seed: int, step: int, count: int, stream: int = 0) -> list[tuple[int, np.ndarray, bool]]:
        """Step `step`'s rows as `(image index, cropped uint8 image, flipped?)`, before flipping."""
        rng = np.random.default_rng([seed, step, _DATA_STREAM, stream + 1])
        rows = []
        for index in self.indices(seed + stream, step, count):
            image = crop(self.images[index], self.size, rng if self.random_crop else None)
            rows.append((int(index), image, bool(self.random_flip and rng.random() < 0.5)))
        return rows

    def batch(self, seed: int, step: int, count: int, stream: int = 0) -> np.ndarray:
        """`[count, size, size, 3]` float32 in [-1, 1] for step `step` (0-based)."""
        rows = [image[:, ::-1] if flip else image for _, image, flip in self.draws(seed, step, count, stream)]
        return to_model_range(np.stack(rows))


# ----------------------------------------------------------------------------- class images


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); delete it to rebuild the manifest") from None
    return manifest if isinstance(manifest, dict) else {}


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def ensure_class_images(
    pipe: Any,
    class_dir: str | os.PathLike,
    *,
    prompt: str,
    num_images: int,
    seed: int,
    model: str,
    scheduler: str | None,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
    log: Callable = print,
) -> list[Path]:
    """Generates the missing class images so `class_dir` holds at least `num_images`.

    File `class_{i:05d}.png` is sampled with seed `seed + i`; existing images (generated or put
    there by the user) are counted and never regenerated. Returns the paths written (empty
    when nothing was missing). Writes happen on process 0 only; every process runs the sampler
    (its batch is sharded over all devices).

    Args:
      pipe: a `jaxvision.StableDiffusionPipeline` of the base model.
      class_dir: the cache folder (created if missing).
      prompt: the class prompt.
      num_images: target count.
      seed: base seed.
      model, scheduler, num_inference_steps, guidance_scale: the sampling settings (recorded).
      resolution: image height and width in pixels.
      batch_size: images per sampler call; the last call is padded to it, so the sampler
        compiles once.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = list_images(class_dir)
    missing = num_images - len(existing)
    if missing <= 0:
        log(f"class images: {len(existing)} in {class_dir} (>= {num_images}), none generated")
        return []
    taken = {p.name for p in existing}
    todo: list[tuple[int, Path]] = []
    i = 0
    while len(todo) < missing:
        path = class_dir / f"class_{i:05d}.png"
        if path.name not in taken:
            todo.append((i, path))
        i += 1
    manifest_path = class_dir / MANIFEST
    manifest = _read_manifest(manifest_path)
    settings = dict(
        prompt=prompt,
        model=model,
        scheduler=scheduler or pipe.default_scheduler,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
    )
    manifest.update(settings)
    manifest.setdefault("images", {})
    writer = jax.process_index() == 0
    batch_size = max(batch_size, 1)
    log(
        f"class images: {len(existing)} in {class_dir}, generating {missing} with the base model "
        f"({settings['scheduler']}, {num_inference_steps} steps; the first batch compiles the sampler) ..."
    )
    t0 = time.perf_counter()
    written: list[Path] = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        # Every call has the same batch (the last one padded with its last seed): one compile.
        seeds = [seed + i for i, _ in chunk] + [seed + chunk[-1][0]] * (batch_size - len(chunk))
        images = pipe(
            [prompt] * len(seeds),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            seed=seeds,
            scheduler=scheduler,
            output_type="pil",
        )
        if writer:
            for (index, path), image in zip(chunk, images, strict=False):
                image.save(path)
                manifest["images"][path.name] = {"seed": seed + index}
                written.append(path)
            _write_manifest(manifest_path, manifest)
        done = start + len(chunk)
        rate = done / max(time.perf_counter() - t0, 1e-9)
        if writer:
            print(f"\rclass images {done}/{missing} ({rate:.2f} img/s)", end="", file=sys.stderr, flush=True)
    if writer:
        print(file=sys.stderr)
    if jax.process_count() > 1:
        # Other processes read the folder next: wait until process 0 has written every file.
        multihost_utils.sync_global_devices("jaxvision_dreambooth_class_images")
    log(f"class images: wrote {len(written)} to {class_dir} (manifest {manifest_path})")
    return written
