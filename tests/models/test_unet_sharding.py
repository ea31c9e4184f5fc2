"""The sharding rules applied to the full SD 1.5 UNet on 8 fake CPU devices give the concrete
`PartitionSpec`s the rules table promises, and sharded initialisation places parameters so."""

import os
import subprocess
import sys

_SCRIPT = r"""
import jax
import flax
from jax.sharding import PartitionSpec as P
from jaxvision.models import unet
from jaxvision.train.mesh import MeshConfig, make_mesh
from jaxvision.train.sharding import param_shardings

assert jax.device_count() == 8
config = unet.UNet2DConditionConfig.from_variant("sd15")
module = unet.build(config)
abstract = jax.eval_shape(module.init, jax.random.key(0), *unet.example_inputs(config))["params"]
expected = {
    (2, 2, 2): {
        "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel": P("fsdp", "tensor"),
        "mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel": P("fsdp", "tensor"),
        "down_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel": P("fsdp", "tensor"),
        "down_blocks_1/attentions_0/transformer_blocks_0/ff/net_2/kernel": P("tensor", "fsdp"),
        "down_blocks_1/resnets_0/conv1/kernel": P(None, None, None, "fsdp"),
        "time_embedding/linear_1/kernel": P("fsdp", "tensor"),
        "conv_in/kernel": P(),  # 11,520 elements: below the minimum shard size, replicated
        "conv_norm_out/scale": P(),
    },
    # a size-1 "tensor" axis still appears in the spec; it splits nothing
    (1, 8, 1): {
        "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel": P("fsdp", "tensor"),
        "down_blocks_1/resnets_0/conv1/kernel": P(None, None, None, "fsdp"),
        "down_blocks_1/attentions_0/transformer_blocks_0/ff/net_2/kernel": P("tensor", "fsdp"),
    },
}
for sizes, specs in expected.items():
    mesh = make_mesh(MeshConfig(*sizes))
    shardings = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(param_shardings(abstract, mesh)).items()}
    for path, spec in specs.items():
        assert shardings[path].spec == spec, (sizes, path, shardings[path].spec, spec)
print("OK")
"""


def test_sd15_unet_partition_specs_on_eight_devices(tmp_path):
    script = tmp_path / "specs.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
