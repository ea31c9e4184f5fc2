"""ONNX export of ViT models through jax2onnx, checked against onnxruntime.

The exported graph is what an ONNX user of a Hugging Face ViT expects (the layout of optimum's
exports): one input `pixel_values` `[batch_size, channels, height, width]` (NCHW, normalised as
the checkpoint's `preprocessor_config.json` says), with a symbolic `batch_size`, and outputs
named as the transformers model's: `logits` for `ViTForImageClassification`,
`last_hidden_state` (+ `pooler_output`) for `ViTModel`. The weights become ONNX initializers;
labels, image size, layout and the preprocessor settings go into the model's metadata.

jax2onnx, onnx and onnxruntime are an optional extra (`pip install "jaxvision[onnx]"`, then
`pip install --no-deps jax2onnx==0.17.1`: jax2onnx pins an older orbax-checkpoint than the
core install uses, and needs none of it to convert). They are imported only when exporting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np

from jaxvision.errors import ConfigError
from jaxvision.models import kernels
from jaxvision.models.vit import ViTConfig

Layout = Literal["NCHW", "NHWC"]
ModelLike = str | Path | tuple[nn.Module, dict]

# 17 is read by every maintained runtime (onnxruntime, TensorRT, OpenVINO); pass a higher opset
# to get fused Gelu (20+) and newer operators.
DEFAULT_OPSET = 17
BATCH_DIM = "batch_size"  # optimum's name for the dynamic batch axis
# A protobuf message cannot exceed 2 GiB; past this size the weights go to a `<file>.data` sidecar.
SINGLE_FILE_LIMIT = 1_800_000_000
# onnxruntime vs JAX, max |difference| / max(1, max |JAX output|): what `jaxvision export-onnx` accepts.
CHECK_TOLERANCE = 1e-4
INSTALL_HINT = 'pip install "jaxvision[onnx]" && pip install --no-deps jax2onnx==0.17.1'


def require_onnx_extra() -> None:
    """Raises a `ConfigError` saying how to install the extra when jax2onnx, onnx or onnxruntime is missing."""
    for name in ("onnx", "onnxruntime", "onnx_ir", "jax2onnx"):
        try:
            __import__(name)
        except ImportError as e:
            raise ConfigError(
                f"ONNX export needs the optional 'onnx' extra, but importing {name!r} failed ({e}). "
                f"Install it with: {INSTALL_HINT}"
            ) from None


def output_names(config: ViTConfig, add_pooling_layer: bool) -> tuple[str, ...]:
    """The ONNX output names of a ViT: those of the transformers model's outputs."""
    if config.architecture == "ViTForImageClassification":
        return ("logits",)
    return ("last_hidden_state", "pooler_output") if add_pooling_layer else ("last_hidden_state",)


def _has_pooler(module: nn.Module) -> bool:
    return bool(getattr(module, "add_pooling_layer", False))


def _forward(
    module: nn.Module, params: dict, layout: Layout
) -> tuple[Callable[[jax.Array], tuple[jax.Array, ...]], tuple[str, ...]]:
    """`pixel_values → outputs` of the module, the function jax2onnx traces."""
    names = output_names(module.config, _has_pooler(module))

    # The params are closed over on purpose: jax2onnx turns the constants of the traced function
    # into ONNX initializers, which is where an exported model's weights belong.
    def forward(pixel_values: jax.Array) -> tuple[jax.Array, ...]:
        if layout == "NCHW":
            pixel_values = pixel_values.transpose(0, 2, 3, 1)
        out = module.apply({"params": params}, pixel_values)
        return tuple(getattr(out, n) for n in names)

    return forward, names


def _input_shape(config: ViTConfig, layout: Layout) -> tuple[str | int, ...]:
    h, w = config.image_size
    c = config.num_channels
    return (BATCH_DIM, c, h, w) if layout == "NCHW" else (BATCH_DIM, h, w, c)


@contextlib.contextmanager
def _quiet_converter_logs() -> Iterator[None]:
    # jax2onnx logs a warning with a traceback for each plugin of a library that is not installed
    # (equinox, dm-pix: not needed for Flax models), and onnx_ir one per untyped shape constant.
    loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _metadata(module: nn.Module, layout: Layout, preprocessor: dict[str, Any]) -> dict[str, str]:
    import jaxvision

    config: ViTConfig = module.config
    return {
        "model_type": "vit",
        "architecture": config.architecture,
        "id2label": json.dumps({str(i): name for i, name in enumerate(config.labels)}),
        "image_size": json.dumps(list(config.image_size)),
        "num_channels": str(config.num_channels),
        "input_layout": layout,
        "preprocessor_config": json.dumps(preprocessor, sort_keys=True),
        "exported_by": f"jaxvision {jaxvision.__version__}",
    }


def _resolve(model: ModelLike) -> tuple[nn.Module, dict, dict[str, Any]]:
    """`(module, params, preprocessor_config)`; the preprocessor is checked against the image size."""
    from jaxvision.image import Preprocessor
    from jaxvision.inference import resolve_model
    from jaxvision.pretrained import from_pretrained

    preprocessor = None
    if isinstance(model, str | Path):
        preprocessor = Preprocessor.from_pretrained(model)
        model = from_pretrained(model)
    if not isinstance(getattr(model[0], "config", None), ViTConfig):
        raise ConfigError(
            f"ONNX export supports ViT checkpoints (ViTModel, ViTForImageClassification); got {type(model[0]).__name__}"
        )
    module, params, preprocessor = resolve_model(model, preprocessor=preprocessor)
    return module, params, preprocessor.to_json()


def export_onnx(
    model: ModelLike,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    layout: Layout = "NCHW",
) -> Path:
    """Writes a ViT as an ONNX model with a dynamic batch dimension.

    Args:
      model: a checkpoint folder (config.json + weights, optionally preprocessor_config.json), or
        `(module, params)` from `jaxvision.from_pretrained`. The graph computes in the module's
        `dtype` (load with the default float32 for a model that matches the checkpoint's outputs).
      out: the `.onnx` file to write; its folder is created. A model over ~1.8 GB keeps its
        weights in `<out>.data` beside it (ONNX external data; keep the two files together).
      opset: ONNX opset of the default domain.
      layout: "NCHW" (default; the Hugging Face / optimum convention) or "NHWC" for `pixel_values`.
    Returns:
      The path written. Input: `pixel_values` float32 `[batch_size, C, H, W]` (or
      `[batch_size, H, W, C]`). Outputs: `logits` `[batch_size, num_labels]`, or
      `last_hidden_state` `[batch_size, 1 + patches, hidden]` (+ `pooler_output`).
    """
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"layout={layout!r} is not supported; use 'NCHW' or 'NHWC'")
    require_onnx_extra()
    import onnx
    from jax2onnx import to_onnx

    module, params, preprocessor = _resolve(model)
    # Portable kernels: XLA's attention and convolutions lower to plain ONNX ops; the CPU forms
    # (`layers.head_loop_attention`, a loop over (batch, head) pairs; im2col matmuls) would not.
    module = kernels.with_kernels(module, kernels.Kernels(attention="xla", conv="xla"))
    forward, names = _forward(module, params, layout)
    with _quiet_converter_logs():
        proto = to_onnx(
            forward,
            inputs=[_input_shape(module.config, layout)],
            model_name=type(module).__name__,
            opset=opset,
            input_names=["pixel_values"],
            output_names=list(names),
        )
    onnx.helper.set_model_props(proto, _metadata(module, layout, preprocessor))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = out.with_name(out.name + ".data")
    sidecar.unlink(missing_ok=True)  # a previous, larger export's weights must not linger
    weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    large = weight_bytes > SINGLE_FILE_LIMIT
    onnx.save_model(proto, out, save_as_external_data=large, all_tensors_to_one_file=True, location=sidecar.name)
    return out


@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime against JAX on one batch.

    Attributes:
      batch_size: rows in the batch.
      output: the output name compared.
      max_abs_error: max |onnxruntime - JAX|.
      scale: max(1, max |JAX output|).
    """

    batch_size: int
    output: str
    max_abs_error: float
    scale: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.scale


def onnx_session(path: str | Path):
    """An onnxruntime CPU `InferenceSession` over an exported file."""
    require_onnx_extra()
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_onnx(
    path: str | Path,
    model: ModelLike,
    *,
    batch_sizes: Sequence[int] = (1, 5),
    pixel_values: np.ndarray | None = None,
    seed: int = 0,
) -> list[OnnxCheck]:
    """Runs an exported file in onnxruntime and the model in JAX on the same batches.

    Args:
      path: the `.onnx` file `export_onnx` wrote.
      model: the model it was exported from (folder or `(module, params)`).
      batch_sizes: one batch of each size, all through the same ONNX session (so a fixed batch
        dimension fails); ignored when `pixel_values` is given.
      pixel_values: NHWC float32 `[batch, H, W, C]` inputs to use instead of random ones.
      seed: for the random (standard normal) inputs.
    Returns:
      One `OnnxCheck` per batch and output.
    """
    module, params, _ = _resolve(model)
    session = onnx_session(path)
    layout = session.get_modelmeta().custom_metadata_map.get("input_layout", "NCHW")
    names = [o.name for o in session.get_outputs()]
    config: ViTConfig = module.config
    (onnx_input,) = session.get_inputs()
    model_input, model_outputs = list(_input_shape(config, layout)), list(output_names(config, _has_pooler(module)))
    if onnx_input.shape[1:] != model_input[1:] or names != model_outputs:
        raise ConfigError(
            f"{path}: takes {onnx_input.name} {onnx_input.shape} and gives {names}, but the model takes "
            f"{model_input} ({layout}) and gives {model_outputs}; was the file exported from this model?"
        )
    if pixel_values is not None:
        batches = [np.asarray(pixel_values, np.float32)]
    else:
        rng = np.random.default_rng(seed)
        shape = (*config.image_size, config.num_channels)
        batches = [rng.standard_normal((b, *shape)).astype(np.float32) for b in batch_sizes]

    @jax.jit
    def reference(p: dict, x: jax.Array) -> dict[str, jax.Array]:
        out = module.apply({"params": p}, x)
        return {n: getattr(out, n) for n in names}

    checks = []
    for x in batches:
        feed = x.transpose(0, 3, 1, 2) if layout == "NCHW" else x
        got = dict(zip(names, session.run(names, {"pixel_values": feed}), strict=True))
        with jax.default_matmul_precision("highest"):
            want = jax.device_get(reference(params, x))
        for n in names:
            expected = np.asarray(want[n], np.float64)
            if got[n].shape != expected.shape:
                raise ConfigError(
                    f"{path}: output {n!r} has shape {got[n].shape} but the model gives {expected.shape}; "
                    "was the file exported from this model?"
                )
            checks.append(
                OnnxCheck(
                    batch_size=len(x),
                    output=n,
                    max_abs_error=float(np.abs(got[n] - expected).max()),
                    scale=max(1.0, float(np.abs(expected).max())),
                )
            )
    return checks
