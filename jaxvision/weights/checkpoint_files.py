"""Finds and reads the weight files of a Hugging Face model directory into one flat state dict.

Supported, in order of preference: `model.safetensors` / `diffusion_pytorch_model.safetensors`
(and `.fp16` variants), sharded safetensors with a `*.safetensors.index.json`, HF Flax
`flax_model.msgpack` / `diffusion_flax_model.msgpack`, and — only when the caller opts in with
`allow_pickle=True`, because unpickling runs code — PyTorch `*.bin` through
`torch.load(weights_only=True)`.

The state dict always uses PyTorch's key names and layouts (`weight` as `[out, in]`, conv
`[O, I, H, W]`), so one key table per model serves every format: msgpack trees are converted
the way transformers' own Flax→PyTorch converter does it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxvision.errors import WeightLoadError
from jaxvision.weights.safetensors_io import read_safetensors

STEMS = ("model", "diffusion_pytorch_model")
FLAX_FILES = ("flax_model.msgpack", "diffusion_flax_model.msgpack")


def _variant_name(stem: str, ext: str, variant: str | None) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


def _read_sharded(index_path: Path, reader) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise WeightLoadError(f"{index_path}: not a valid shard index ({e!r}); re-download it") from None
    state: dict[str, np.ndarray] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise WeightLoadError(f"{index_path}: lists shard {shard!r}, which is missing from {index_path.parent}")
        tensors = reader(shard_path)
        for key, value in tensors.items():
            if weight_map.get(key) != shard:
                raise WeightLoadError(f"{shard_path}: holds {key!r}, which {index_path.name} does not assign to it")
            state[key] = value
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise WeightLoadError(f"{index_path}: keys listed in the index are absent from their shards: {missing[:10]}")
    return state


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    import torch  # opt-in only

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt archives
        raise WeightLoadError(f"{path}: could not read PyTorch checkpoint ({e})") from None
    out = {}
    for key, t in tensors.items():
        # numpy has no bfloat16 in torch's bridge: go through fp32 (exact for bf16 values)
        out[key] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


def flax_tree_to_torch_state(tree: dict) -> dict[str, np.ndarray]:
    """Converts an HF Flax param tree to PyTorch names and layouts.

    `kernel` becomes `weight` (2-D transposed, 4-D HWIO → OIHW), `scale` and `embedding` become
    `weight`; nesting is joined with dots ("encoder/layer/0" → "encoder.layer.0").
    """
    out: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for name, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + (name,))
                continue
            arr = np.asarray(value)
            if name == "kernel":
                name = "weight"
                arr = arr.T if arr.ndim == 2 else np.transpose(arr, (3, 2, 0, 1)) if arr.ndim == 4 else arr
            elif name in ("scale", "embedding"):
                name = "weight"
            out[".".join(prefix + (name,))] = arr

    walk(tree.get("params", tree), ())
    return out


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several types on truncated data
        raise WeightLoadError(f"{path}: corrupt or truncated Flax msgpack file ({e}); re-download it") from None
    return flax_tree_to_torch_state(tree)


def find_weight_files(directory: str | Path, *, variant: str | None = None) -> list[Path]:
    """The weight files in `directory` that `read_state_dict` would consider, best first."""
    d = Path(directory)
    variants = [variant] if variant else [None, "fp16"]
    found = []
    for v in variants:
        for stem in STEMS:
            for name in (
                _variant_name(stem, "safetensors", v),
                _variant_name(stem, "safetensors.index.json", v),
            ):
                if (d / name).exists():
                    found.append(d / name)
    found += [d / n for n in FLAX_FILES if (d / n).exists()]
    for v in variants:
        for stem in ("pytorch_model", "diffusion_pytorch_model"):
            for name in (_variant_name(stem, "bin", v), _variant_name(stem, "bin.index.json", v)):
                if (d / name).exists():
                    found.append(d / name)
    return found


def read_state_dict(
    directory: str | Path, *, allow_pickle: bool = False, variant: str | None = None
) -> tuple[dict[str, np.ndarray], Path]:
    """Reads the weights of one model directory.

    Args:
      directory: a transformers model folder or a diffusers component folder.
      allow_pickle: permit PyTorch `.bin` files (read with `torch.load(weights_only=True)`).
      variant: e.g. "fp16" to insist on `*.fp16.safetensors`; by default the plain file is
        preferred and an fp16 variant is used when it is the only one.
    Returns:
      `(state, source)`: PyTorch-named arrays (lazy where the format allows) and the file read.
    """
    d = Path(directory)
    if not d.is_dir():
        raise WeightLoadError(f"{d}: not a directory; pass a local Hugging Face model folder")
    files = find_weight_files(d, variant=variant)
    if not files:
        present = sorted(p.name for p in d.iterdir())
        raise WeightLoadError(
            f"{d}: no weight file found (looked for model.safetensors, diffusion_pytorch_model.safetensors, "
            f"their .fp16 variants, sharded *.safetensors.index.json, flax_model.msgpack"
            f"{', and *.bin' if allow_pickle else ''}); the folder holds {present}"
        )
    path = files[0]
    name = path.name
    if name.endswith(".safetensors"):
        return read_safetensors(path)[0], path
    if name.endswith(".safetensors.index.json"):
        return _read_sharded(path, lambda p: read_safetensors(p)[0]), path
    if name.endswith(".msgpack"):
        return _read_msgpack(path), path
    if not allow_pickle:
        raise WeightLoadError(
            f"{path}: PyTorch pickle checkpoints can run arbitrary code when loaded, so they are read only on "
            f"request. Pass allow_pickle=True (CLI: --allow-pickle) to read it with "
            f"torch.load(weights_only=True), or convert it once to model.safetensors."
        )
    if name.endswith(".bin.index.json"):
        return _read_sharded(path, _torch_load), path
    return _torch_load(path), path
