"""int8 post-training quantization (PTQ) through qwix: weight-only and dynamic-range, per channel.

What is quantized: every `nn.Dense` of the model (a module whose `kernel` is 2-D) — for ViT the
attention projections `query`/`key`/`value`/`output`, the MLP `intermediate`/`output`, the pooler
and the classifier head. Each kernel `[in, out]` becomes int8 values with one fp32 scale per output
channel (`absmax / 127`, symmetric); biases are added after the rescale and stay fp32.

What stays fp32, and why:

- the attention products q·kᵀ and softmax·v: both operands are activations (nothing to shrink),
  and the softmax probabilities are long-tailed, which per-token int8 represents badly;
- LayerNorm/GroupNorm, biases, position and CLS embeddings: not matmuls (qwix quantizes ops, not
  tensors), a few percent of the parameters at most;
- ViT's patch embedding: it runs as a reshaped matmul (`PatchProjection`), which qwix's PTQ cannot
  take a quantized weight through; it is 0.3 % of ViT-L/16's parameters and the layer that sees
  raw pixels.
- convolutions (UNet, VAE): qwix's PTQ convolution needs the activations quantized too, so a
  weight-only mode cannot include them; only the UNet's Dense layers are quantized.

Modes:

- `weight-only`: int8 weights, dequantized into the fp32 matmul (smaller model, same compute).
- `dynamic`: int8 weights and int8 activations whose per-token scales are computed at run time
  (dynamic range, no calibration data), so the projections run int8 x int8 → int32.

A quantized model is saved as a directory: the original `config.json` (and
`preprocessor_config.json`), `model.int8.safetensors` with one tensor per fp32 parameter under its
Flax path (`vit/layer_0/attention/query/bias`) and two per quantized kernel (`.../kernel/qvalue`
int8, `.../kernel/scale` fp32 `[1, out]`), and `quantization.json` saying how it was made.
`load_quantized` reads it back strictly: every tensor the quantized model needs, with its shape and
dtype, and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.errors import ConfigError, WeightLoadError

MODES = ("weight-only", "dynamic")
QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "model.int8.safetensors"
FORMAT = "jaxvision-qwix-int8"
FORMAT_VERSION = 1
# Files of the source folder that describe the model rather than hold weights; copied as they are.
_COPIED_FILES = ("config.json", "preprocessor_config.json")
_SEP = "/"


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
    """An int8 model: run it with `module.apply({"params": params}, ...)` like the fp32 one.

    Attributes:
      module: the qwix-intercepted Linen module (same class, config and call signature as the
        fp32 module it was made from).
      params: the param tree; each quantized kernel is a qwix `WithAux(QArray(qvalue int8
        [in, out], scale fp32 [1, out]))`, every other leaf the fp32 array.
      mode: "weight-only" or "dynamic".
      quantized_modules: the `/`-joined paths of the quantized Dense modules.
    """

    module: nn.Module
    params: dict
    mode: str
    quantized_modules: tuple[str, ...]


def is_quantized_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `save_quantized` (it holds `quantization.json`)."""
    return (Path(path) / QUANTIZATION_FILE).is_file()


def dense_module_paths(params: dict) -> tuple[str, ...]:
    """The paths (`vit/layer_0/attention/query`) of every module with a 2-D `kernel`: the Dense layers."""
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
    return tuple(
        _SEP.join(path[:-1]) for path, leaf in sorted(flat.items()) if path[-1] == "kernel" and np.ndim(leaf) == 2
    )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")


def _rules(mode: str, module_paths: tuple[str, ...]) -> list:
    import qwix

    # One rule matching exactly the Dense modules: attention modules (which hold no kernel of their own)
    # and everything else run unquantized even in dynamic mode.
    pattern = "|".join(re.escape(p) for p in module_paths)
    return [
        qwix.QuantizationRule(
            module_path=pattern,
            weight_qtype=jnp.int8,
            act_qtype=jnp.int8 if mode == "dynamic" else None,
            weight_calibration_method="absmax",
        )
    ]


def quantized_module(module: nn.Module, mode: str, module_paths: tuple[str, ...]) -> nn.Module:
    """`module` with qwix's PTQ interception of the Dense layers at `module_paths`."""
    import qwix

    _check_mode(mode)
    if not module_paths:
        raise ConfigError(f"{type(module).__name__} has no Dense layer to quantize")
    return qwix.quantize_model(module, qwix.PtqProvider(_rules(mode, module_paths)))


def _abstract_params(qmodule: nn.Module, spec: Any) -> dict:
    """The quantized model's param tree as shapes only, with qwix's `how to quantize` in each kernel."""
    inputs = spec.example_inputs(qmodule.config)
    abstract = jax.eval_shape(qmodule.init, jax.random.key(0), *inputs)["params"]
    return flax.core.meta.unbox(abstract)


def _is_quantized_leaf(x: Any) -> bool:
    import qwix

    return isinstance(getattr(x, "array", None), qwix.QArray)


def quantize(module: nn.Module, params: dict, mode: str = "weight-only") -> QuantizedModel:
    """Quantizes the Dense kernels of a jaxvision model to int8, per output channel.

    Args:
      module: a model from `jaxvision.from_pretrained` (ViT, CLIP text, UNet, ...).
      params: its fp32 params.
      mode: "weight-only" (int8 weights) or "dynamic" (int8 weights and per-token int8 activations).
    Returns:
      The `QuantizedModel`.
    """
    import qwix

    from jaxvision.pretrained import spec_for_module

    _check_mode(mode)
    params = flax.core.meta.unbox(params)
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    if dtypes != {np.dtype(np.float32)}:
        raise ConfigError(
            f"quantize needs fp32 params (load with the default param_dtype); got {sorted(map(str, dtypes))}"
        )
    paths = dense_module_paths(params)
    qmodule = quantized_module(module, mode, paths)
    abstract = _abstract_params(qmodule, spec_for_module(module))
    qparams = qwix.quantize_params(jax.tree.map(jnp.asarray, params), abstract)
    return QuantizedModel(qmodule, qparams, mode, paths)


def param_bytes(params: Any) -> int:
    """Bytes the arrays of a param tree hold in memory (int8 values, scales and fp32 leaves alike)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def _flatten(params: dict) -> dict[str, Any]:
    """Flax path → array; a quantized kernel becomes `<path>/qvalue` and `<path>/scale`."""
    out: dict[str, Any] = {}
    leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized_leaf)
    for key_path, leaf in leaves:
        name = _SEP.join(str(getattr(k, "key", k)) for k in key_path)
        if _is_quantized_leaf(leaf):
            q = leaf.array
            if q.zero_point is not None:
                raise ValueError(f"{name}: asymmetric quantization (zero point) is not supported")
            out[f"{name}{_SEP}qvalue"], out[f"{name}{_SEP}scale"] = q.qvalue, q.scale
        else:
            out[name] = leaf
    return out


def save_quantized(model: QuantizedModel, path: str | Path, *, source: str | Path | None = None) -> Path:
    """Writes `model` as a quantized directory (see the module docstring); `load_quantized` reads it.

    Args:
      model: from `quantize`.
      path: the folder to write.
      source: the fp32 folder it came from; its `preprocessor_config.json` is copied along.
    Returns:
      The folder written.
    """
    import qwix

    from jaxvision.pretrained import spec_for_module
    from jaxvision.weights.safetensors_io import write_safetensors

    spec_for_module(model.module)  # a clear error for a module that cannot be saved, before writing anything
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.asarray(v) for k, v in _flatten(model.params).items()}
    write_safetensors(path / WEIGHTS_FILE, tensors, metadata={"format": FORMAT, "mode": model.mode})
    (path / "config.json").write_text(json.dumps(model.module.config.to_hf(), indent=2, sort_keys=True) + "\n")
    if source is not None and (Path(source) / "preprocessor_config.json").is_file():
        shutil.copyfile(Path(source) / "preprocessor_config.json", path / "preprocessor_config.json")
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "mode": model.mode,
        "weight_qtype": "int8",
        "act_qtype": "int8" if model.mode == "dynamic" else None,
        "granularity": "per-output-channel",
        "calibration": "absmax",
        "quantized_modules": list(model.quantized_modules),
        "qwix_version": qwix.__version__,
        "source": str(source) if source is not None else None,
    }
    (path / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path


def _read_info(path: Path) -> dict[str, Any]:
    info_file = path / QUANTIZATION_FILE
    if not path.is_dir():
        raise WeightLoadError(f"{path}: not a directory; pass a folder written by `jaxvision quantize`")
    if not info_file.is_file():
        raise WeightLoadError(
            f"{path}: not a quantized model folder (no {QUANTIZATION_FILE}); make one with "
            f"`jaxvision quantize --model {path} --out <folder>`"
        )
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{info_file}: not valid JSON ({e}); re-run `jaxvision quantize`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise WeightLoadError(f"{info_file}: format is {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("version") != FORMAT_VERSION:
        raise WeightLoadError(
            f"{info_file}: version {info.get('version')!r} is not supported (this jaxvision reads version "
            f"{FORMAT_VERSION}); re-run `jaxvision quantize`"
        )
    if info.get("mode") not in MODES:
        raise WeightLoadError(f"{info_file}: mode {info.get('mode')!r} is not one of {', '.join(MODES)}")
    modules = info.get("quantized_modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise WeightLoadError(f"{info_file}: quantized_modules must be a non-empty list of module paths")
    return info


def _take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype: Any, source: Path) -> jax.Array:
    if name not in tensors:
        raise WeightLoadError(
            f"{source}: tensor {name!r} is missing; the file is incomplete, re-run `jaxvision quantize`"
        )
    value = tensors.pop(name)
    if value.dtype != np.dtype(dtype) or tuple(value.shape) != tuple(shape):
        raise WeightLoadError(
            f"{source}: tensor {name!r} is {value.dtype}{list(value.shape)}, the model needs "
            f"{np.dtype(dtype)}{list(shape)}; re-run `jaxvision quantize`"
        )
    return jnp.asarray(value)


def load_quantized(path: str | Path, **module_kwargs: Any) -> QuantizedModel:
    """Reads a folder written by `save_quantized`, strictly.

    Every tensor of the quantized model must be present with its shape and dtype (int8 values,
    fp32 scales and fp32 parameters), and the file may hold nothing else.

    Args:
      path: the folder.
      module_kwargs: module attributes, as for `from_pretrained` (`dtype`, `attention_impl`, ...);
        kernels left "auto" are resolved for the default devices.

    Raises:
      WeightLoadError: not a quantized folder, or a tensor missing, extra, or of the wrong dtype/shape.
    """
    from jaxvision.models.hf_config import read_config_json
    from jaxvision.pretrained import build_module, spec_for_config
    from jaxvision.weights.safetensors_io import read_safetensors

    path = Path(path)
    info = _read_info(path)
    cfg = read_config_json(path)
    spec = spec_for_config(cfg, str(path / "config.json"))
    module = build_module(spec, spec.config_from_hf(cfg, str(path / "config.json")), **module_kwargs)
    paths = tuple(info["quantized_modules"])
    qmodule = quantized_module(module, info["mode"], paths)
    abstract = _abstract_params(qmodule, spec)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise WeightLoadError(f"{path}: {WEIGHTS_FILE} is missing; re-run `jaxvision quantize`")
    tensors, _ = read_safetensors(weights_file)
    tensors = dict(tensors)

    def fill(key_path: tuple, leaf: Any) -> Any:
        name = _SEP.join(str(getattr(k, "key", k)) for k in key_path)
        if _is_quantized_leaf(leaf):
            q = leaf.array
            qvalue = _take(tensors, f"{name}{_SEP}qvalue", q.qvalue.shape, np.int8, weights_file)
            scale = _take(tensors, f"{name}{_SEP}scale", q.scale.shape, np.float32, weights_file)
            return leaf.replace(array=q.replace(qvalue=qvalue, scale=scale))
        if f"{name}{_SEP}qvalue" in tensors:
            raise WeightLoadError(
                f"{weights_file}: {name!r} is stored quantized but {QUANTIZATION_FILE} does not list its module"
            )
        return _take(tensors, name, leaf.shape, leaf.dtype, weights_file)

    params = jax.tree_util.tree_map_with_path(fill, abstract, is_leaf=_is_quantized_leaf)
    if tensors:
        raise WeightLoadError(
            f"{weights_file}: {len(tensors)} tensor(s) the model does not have: {sorted(tensors)[:10]}; "
            "the folder does not match its config.json"
        )
    return QuantizedModel(qmodule, params, info["mode"], paths)


def weight_files_bytes(path: str | Path) -> int:
    """Bytes on disk of a folder's weight files (`*.safetensors`, `*.bin`, `*.msgpack`)."""
    suffixes = (".safetensors", ".bin", ".msgpack")
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.name.endswith(suffixes))


def quantize_dir(model_dir: str | Path, out_dir: str | Path, mode: str = "weight-only") -> dict[str, Any]:
    """`jaxvision quantize`: loads an fp32 Hugging Face folder, quantizes it, writes `out_dir`.

    Returns:
      A report: `mode`, `quantized_modules` (count), `int8_fraction` (share of the parameters stored
      as int8), `fp32_disk_bytes` / `int8_disk_bytes` (weight files), `fp32_memory_bytes` /
      `int8_memory_bytes` (param trees), and the two ratios.
    """
    from jaxvision.pretrained import from_pretrained

    _check_mode(mode)
    module, params = from_pretrained(model_dir)
    model = quantize(module, params, mode)
    save_quantized(model, out_dir, source=model_dir)
    fp32_memory, int8_memory = param_bytes(params), param_bytes(model.params)
    fp32_disk, int8_disk = weight_files_bytes(model_dir), weight_files_bytes(out_dir)
    flat = flax.traverse_util.flatten_dict(params)
    int8_count = sum(flat[(*m.split(_SEP), "kernel")].size for m in model.quantized_modules)
    return {
        "mode": mode,
        "out": str(out_dir),
        "quantized_modules": len(model.quantized_modules),
        "int8_fraction": int8_count / sum(x.size for x in flat.values()),
        "fp32_disk_bytes": fp32_disk,
        "int8_disk_bytes": int8_disk,
        "disk_ratio": fp32_disk / int8_disk,
        "fp32_memory_bytes": fp32_memory,
        "int8_memory_bytes": int8_memory,
        "memory_ratio": fp32_memory / int8_memory,
    }
