"""safetensors files read lazily through `np.memmap`, and written, with every dtype incl. bf16.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
`{"dtype", "shape", "data_offsets"}`, then the raw bytes. Reading it here (rather than through
`safetensors.numpy`) gives bf16 through `ml_dtypes`, zero-copy lazy tensors for multi-GB UNets,
and errors that name the file and the tensor when a download was truncated.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxvision.errors import WeightLoadError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Opens a safetensors file as lazy, read-only arrays.

    Returns:
      `(tensors, metadata)`: name → memory-mapped array, and the header's `__metadata__`.
    Raises:
      WeightLoadError: the file is missing, truncated or not safetensors.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightLoadError(f"{path}: not a safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightLoadError(
                    f"{path}: corrupt or truncated safetensors header (header claims {n} bytes, file has "
                    f"{size}); re-download or re-export the file"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightLoadError(f"{path}: weight file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{path}: corrupt safetensors header ({e}); re-download the file") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, np.ndarray] = {}
    mm = None
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightLoadError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > size - data_start:
            raise WeightLoadError(
                f"{path}: truncated file: tensor {name!r} needs bytes {begin}..{end} of the data section but "
                f"only {size - data_start} are present; re-download or re-export the file"
            )
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise WeightLoadError(f"{path}: tensor {name!r} byte range does not match shape {shape}")
        if mm is None:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
        tensors[name] = mm[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes `tensors` (name → array) as a safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        arrays[name] = arr
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec recommends 8-byte alignment of the data section
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(arr.tobytes())
    os.replace(tmp, path)
