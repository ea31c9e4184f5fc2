"""Batched ViT inference over image files: `classify` and `embed`.

Images are decoded and preprocessed by a thread pool ahead of the device (Pillow releases the
GIL while decoding and resizing), grouped into fixed-size batches — the last one padded with
zeros — so each jitted forward compiles once. A file that cannot be decoded does not stop the
run: its error is recorded with its path and the rest of its batch is computed as usual.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxvision import quantize
from jaxvision.errors import ConfigError, ImageDecodeError
from jaxvision.image import Preprocessor, load_image
from jaxvision.pretrained import from_pretrained

log = logging.getLogger(__name__)

ModelLike = str | Path | tuple[nn.Module, dict]


@dataclasses.dataclass
class Batch:
    """One fixed-size batch from `iter_batches`.

    Attributes:
      pixels: `[batch_size, height, width, 3]` float32; rows of failed files and of padding are zeros.
      paths: the files of this batch, `len(paths) <= batch_size` (padding has no path).
      errors: per path, None or a message naming the file.
    """

    pixels: np.ndarray
    paths: list[str]
    errors: list[str | None]


def _load_one(path: str, preprocessor: Preprocessor, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    try:
        x = preprocessor(load_image(path))
    except ImageDecodeError as e:
        return None, str(e)
    except (ValueError, OSError) as e:  # Pillow fails some exotic decoded images only when resizing
        return None, f"{path}: cannot preprocess image ({type(e).__name__}: {e})"
    if x.shape[:2] != size:
        return None, f"{path}: preprocessing produced {x.shape[:2]}, expected {size}"
    return x, None


def iter_batches(
    paths: Sequence[str | Path],
    preprocessor: Preprocessor,
    batch_size: int,
    *,
    num_workers: int | None = None,
    prefetch_batches: int = 2,
    progress: bool = True,
    desc: str = "images",
) -> Iterator[Batch]:
    """Decodes and preprocesses `paths` in a thread pool, `prefetch_batches` batches ahead.

    Args:
      paths: image files, in output order.
      preprocessor: must produce a fixed `output_size` (so batches stack).
      batch_size: every batch has this leading size; the last is padded with zeros.
      num_workers: decoding threads (default: CPU count, at most 8).
      progress: show a tqdm bar on stderr, advanced as the consumer takes each batch.
    Yields:
      `Batch`es in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = preprocessor.output_size
    if size is None:
        raise ConfigError(
            "the preprocessor's output size depends on each image (shortest_edge resize without a center "
            "crop), so images cannot be batched; set size to {height, width} or enable do_center_crop"
        )
    paths = [str(p) for p in paths]
    workers = num_workers or min(8, os.cpu_count() or 1)
    window = (prefetch_batches + 1) * batch_size
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxvision-decode")
    pending: collections.deque = collections.deque()
    remaining = iter(paths)

    def fill() -> None:
        while len(pending) < window:
            path = next(remaining, None)
            if path is None:
                return
            pending.append((path, pool.submit(_load_one, path, preprocessor, size)))

    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
            fill()
            while pending:
                chunk = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                fill()  # keep the pool busy while the device works on this batch
                pixels = np.zeros((batch_size, *size, 3), np.float32)
                errors: list[str | None] = []
                for row, (_, future) in enumerate(chunk):
                    x, error = future.result()
                    if x is not None:
                        pixels[row] = x
                    errors.append(error)
                yield Batch(pixels, [p for p, _ in chunk], errors)
                bar.update(len(chunk))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def resolve_model(
    model: ModelLike, *, preprocessor: Preprocessor | None = None, allow_pickle: bool = False
) -> tuple[nn.Module, dict, Preprocessor]:
    """`(module, params, preprocessor)` from a checkpoint folder or a `(module, params)` pair.

    A folder's preprocessor comes from its `preprocessor_config.json` (`Preprocessor.from_pretrained`);
    for a `(module, params)` pair the default is ViT's processor sized to `module.config.image_size`.
    An explicit `preprocessor` wins in both cases. A folder written by `jaxvision quantize` loads as int8.
    """
    if isinstance(model, str | Path) and quantize.is_quantized_dir(model):
        int8 = quantize.load_quantized(model)
        module, params = int8.module, int8.params
        preprocessor = preprocessor or Preprocessor.from_pretrained(model)
    elif isinstance(model, str | Path):
        module, params = from_pretrained(model, allow_pickle=allow_pickle)
        preprocessor = preprocessor or Preprocessor.from_pretrained(model)
    else:
        module, params = model
        preprocessor = preprocessor or Preprocessor(size=tuple(module.config.image_size))
    expected = tuple(module.config.image_size)
    if preprocessor.output_size != expected:
        raise ConfigError(
            f"the preprocessor produces {preprocessor.output_size} images but the model expects {expected} "
            "(config.json image_size); fix size/crop_size in preprocessor_config.json"
        )
    return module, params, preprocessor


@functools.partial(jax.jit, static_argnames=("module", "top_k"))
def _classify_step(module: nn.Module, params: dict, pixels: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    logits = module.apply({"params": params}, pixels).logits
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, top_k)


@functools.partial(jax.jit, static_argnames=("module", "layer", "normalize"))
def _embed_step(module: nn.Module, params: dict, pixels: jax.Array, layer: int, normalize: bool) -> jax.Array:
    out = module.apply({"params": params}, pixels, output_hidden_states=layer != -1)
    tokens = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    cls = tokens[:, 0].astype(jnp.float32)
    if normalize:
        cls = cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)
    return cls


def classify(
    model: ModelLike,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 8,
    preprocessor: Preprocessor | None = None,
    allow_pickle: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top-k labels of each image with a `ViTForImageClassification`.

    Args:
      model: a checkpoint folder, or `(module, params)` from `jaxvision.from_pretrained`.
      images: image file paths.
      top_k: labels per image (at most the model's number of labels).
      batch_size: fixed device batch; the last batch is zero-padded so the forward compiles once.
      preprocessor: overrides the checkpoint's `preprocessor_config.json`.
      allow_pickle: let a folder with only PyTorch `.bin` weights load.
    Returns:
      One dict per image, in input order: `{"path": str, "top_k": [{"label": str, "index": int,
      "score": float}, ...], "error": None}`, scores being softmax probabilities in decreasing
      order; for a file that failed, `"top_k": []` and `"error"` names the file and the cause.
    """
    module, params, preprocessor = resolve_model(model, preprocessor=preprocessor, allow_pickle=allow_pickle)
    config = module.config
    if getattr(config, "architecture", None) != "ViTForImageClassification":
        raise ConfigError(
            f"classify needs a ViTForImageClassification checkpoint; this one is {config.architecture!r} "
            "(use embed for backbones)"
        )
    k = max(1, min(top_k, config.num_labels))
    results: list[dict[str, Any]] = []
    for batch in iter_batches(
        images, preprocessor, batch_size, num_workers=num_workers, progress=progress, desc="classify"
    ):
        scores, indices = jax.device_get(_classify_step(module, params, batch.pixels, top_k=k))
        for row, (path, error) in enumerate(zip(batch.paths, batch.errors, strict=True)):
            top = [
                {"label": config.labels[int(i)], "index": int(i), "score": float(s)}
                for s, i in zip(scores[row], indices[row], strict=True)
            ]
            results.append({"path": path, "top_k": [] if error else top, "error": error})
    return results


def embed_with_errors(
    model: ModelLike,
    images: Sequence[str | Path],
    *,
    layer: int = -1,
    normalize: bool = False,
    batch_size: int = 8,
    preprocessor: Preprocessor | None = None,
    allow_pickle: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, list[str | None]]:
    """`embed`, also returning the per-image error messages (None where the image worked)."""
    module, params, preprocessor = resolve_model(model, preprocessor=preprocessor, allow_pickle=allow_pickle)
    depth = module.config.num_hidden_layers
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(
            f"layer={layer} is out of range for a model with {depth} blocks: use -1 (final, after LayerNorm) "
            f"or an index into hidden_states, {-(depth + 1)}..{depth}"
        )
    rows: list[np.ndarray] = []
    errors: list[str | None] = []
    for batch in iter_batches(
        images, preprocessor, batch_size, num_workers=num_workers, progress=progress, desc="embed"
    ):
        out = np.asarray(_embed_step(module, params, batch.pixels, layer=layer, normalize=normalize))
        n = len(batch.paths)
        out = out[:n].copy()
        failed = [e is not None for e in batch.errors]
        out[failed] = np.nan
        rows.append(out)
        errors.extend(batch.errors)
    hidden = module.config.hidden_size
    return (np.concatenate(rows) if rows else np.zeros((0, hidden), np.float32)), errors


def embed(
    model: ModelLike,
    images: Sequence[str | Path],
    *,
    layer: int = -1,
    normalize: bool = False,
    batch_size: int = 8,
    preprocessor: Preprocessor | None = None,
    allow_pickle: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The CLS-token embedding of each image.

    Args:
      model: a checkpoint folder, or `(module, params)`; ViTModel or ViTForImageClassification.
      images: image file paths.
      layer: which representation. `-1` (default) is the CLS token of `last_hidden_state`,
        i.e. *after* the final LayerNorm. Any other value indexes `hidden_states` Python-style:
        0 is the embedding output, `i` the output of block `i`, `-2` the second-to-last entry;
        the last block's output *before* the final LayerNorm is `layer=num_hidden_layers`
        (`hidden_states[-1]`, which `-1` deliberately does not return).
      normalize: L2-normalise each row.
      batch_size, preprocessor, allow_pickle: as in `classify`.
    Returns:
      `[len(images), hidden_size]` float32. Rows of images that failed to decode are NaN; each
      failure is logged as a warning on the "jaxvision.inference" logger (use
      `embed_with_errors` to get the messages).
    """
    vectors, errors = embed_with_errors(
        model,
        images,
        layer=layer,
        normalize=normalize,
        batch_size=batch_size,
        preprocessor=preprocessor,
        allow_pickle=allow_pickle,
        num_workers=num_workers,
        progress=progress,
    )
    for error in errors:
        if error is not None:
            log.warning("embed: %s (its row is NaN)", error)
    return vectors
