"""The device mesh: three named axes `("data", "fsdp", "tensor")` over every device of every process.

`data` replicates the model and splits the batch; `fsdp` splits the batch too and shards weights
(gathered just before use, ZeRO-3 style); `tensor` splits matmul widths (heads, MLP) inside a layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxvision.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1, meaning "all remaining devices".

    Attributes:
      data: pure data-parallel replicas.
      fsdp: data-parallel ways that also shard parameters and optimizer state.
      tensor: tensor-parallel ways (attention heads, MLP hidden width).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {self.as_dict()}")
        for name, size in zip(MESH_AXES, sizes, strict=True):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}={size}: use a positive size or -1 (the remaining devices)")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def as_dict(self) -> dict[str, int]:
        return dict(zip(MESH_AXES, self.sizes, strict=True))

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete `(data, fsdp, tensor)` sizes for `num_devices` devices."""
        known = math.prod(s for s in self.sizes if s != -1)
        if -1 in self.sizes:
            if num_devices % known:
                raise ConfigError(
                    f"mesh {self.as_dict()}: the fixed axes ({known} devices) do not divide the {num_devices} devices"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in self.sizes)
        else:
            sizes = self.sizes
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"mesh {self.as_dict()} needs {math.prod(sizes)} devices but {num_devices} are available; "
                "set one axis to -1 to take the rest"
            )
        return sizes  # type: ignore[return-value]


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh over `devices` (default: `jax.devices()`, all processes).

    The axes are `AxisType.Auto` (GSPMD propagation): parameters and batches carry explicit
    `NamedSharding`s and XLA inserts the collectives, which is what the logical-axis rules and
    `nn.with_logical_constraint` expect.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))
    if len(devices) == len(jax.devices()):
        # mesh_utils orders devices so that inner axes (tensor, fsdp) sit on the fastest links.
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
