"""`jaxvision plan --config FILE [key=value ...] --json` and the ViT run configs in configs/vit/.

What these prove: plan compiles the fine-tuning train step from shapes only — for a `model.path`
folder holding nothing but `config.json` (no weights) and a `data.train_dir` that does not exist —
and prints exactly the documented keys; on 8 fake CPU devices, FSDP over all 8 cuts the per-device
params and optimizer-state bytes to ~1/8 of the data-parallel plan's. The YAML files load (variants
override the base), and config errors exit non-zero naming the key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers

from jaxvision import cli
from jaxvision.train.config import load_config
from jaxvision.trainers.vit_finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "vit"


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory):
    """A ViT-L/16-384-shaped `config.json` (1 layer) with no weights file next to it."""
    path = tmp_path_factory.mktemp("vit-l") / "model"
    path.mkdir()
    cfg = {
        "model_type": "vit",
        "architectures": ["ViTModel"],
        "hidden_size": 1024,
        "num_hidden_layers": 1,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": 384,
        "patch_size": 16,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def run_plan(*args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {train_helpers.FAST_COMPILE_FLAGS}",
    }
    cmd = [sys.executable, "-m", "jaxvision", "plan", "--config", str(CONFIGS / "base.yaml"), *args, "--json"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def plans(config_only_model):
    common = (f"model.path={config_only_model}", "data.train_dir=/nonexistent/train", "train.batch_size=8")
    procs = {
        "data8": run_plan(*common, "mesh.data=-1", "mesh.fsdp=1"),
        "fsdp8": run_plan(*common, "mesh.data=1", "mesh.fsdp=-1"),
        "gpu_data8": run_plan(*common, "mesh.data=-1", "mesh.fsdp=1", "--platform", "gpu"),
    }
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = json.loads(stdout)  # stdout is exactly one JSON object
        out[f"{name}_log"] = stderr
    return out


def test_plan_json_has_exactly_the_documented_keys(plans):
    for plan in (v for k, v in plans.items() if not k.endswith("_log")):
        assert set(plan) == {"devices", "per_device_bytes"} and plan["devices"] == 8
        assert set(plan["per_device_bytes"]) == {"params", "opt_state", "temp", "total"}
        assert all(isinstance(v, int) and v > 0 for v in plan["per_device_bytes"].values())


def test_fsdp_cuts_params_and_optimizer_state_per_device(plans):
    # 15.0 M fp32 params (1000-class placeholder head: the data folder does not exist); all but
    # ~20 k in matrices that FSDP shards 8 ways.
    full, sharded = plans["data8"]["per_device_bytes"], plans["fsdp8"]["per_device_bytes"]
    assert 14.9e6 * 4 < full["params"] < 15.1e6 * 4
    for key in ("params", "opt_state"):
        ratio = sharded[key] / full[key]
        assert 0.12 < ratio < 0.13, (key, ratio)
    assert sharded["total"] < full["total"]


def test_plan_for_another_platform_uses_that_platforms_kernels(plans):
    """`--platform gpu` on this CPU host plans the program a GPU would run: the kernels are chosen
    for the GPU (fp32 attention: JAX's `dot_product_attention`, which materialises the 577 x 577
    logits) and printed, where the CPU plan runs its head-by-head attention; the weights and
    optimizer state are the same, the temporaries are not."""
    assert "plan for cpu: attention=cpu conv=xla" in plans["data8_log"]
    assert "plan for gpu: attention=None conv=xla" in plans["gpu_data8_log"]
    cpu, gpu = plans["data8"]["per_device_bytes"], plans["gpu_data8"]["per_device_bytes"]
    assert (cpu["params"], cpu["opt_state"]) == (gpu["params"], gpu["opt_state"])
    assert cpu["temp"] != gpu["temp"]


def test_a_kernel_the_host_cannot_compile_is_planned_with_a_stand_in():
    """cuDNN's attention (a GPU plan in bf16) cannot compile on a CPU: the plan compiles the chunked
    attention in its place, and says so."""
    from jaxvision.models import kernels
    from jaxvision.train.plan import describe_kernels

    chosen = kernels.resolve("gpu", dtype="bfloat16", training=True)
    compiled = kernels.compilable_here(chosen, "cpu")
    assert (chosen.attention, compiled.attention) == ("cudnn", "chunked")
    assert describe_kernels("gpu", chosen, compiled) == (
        "plan for gpu: attention=cudnn conv=xla (planned with attention=chunked: cuDNN cannot compile here)"
    )
    assert kernels.compilable_here(chosen, "gpu") == chosen


def test_config_files_load_and_variants_override_the_base():
    digits = load_config(FinetuneConfig, CONFIGS / "digits.yaml")
    assert digits.data.dataset == "digits" and digits.model.variant is not None
    assert digits.train.clip_norm == 1.0  # inherited from base.yaml
    l16 = load_config(FinetuneConfig, CONFIGS / "l16_384.yaml", ["model.path=/ckpt/vit-l"])
    assert l16.train.dtype == "bfloat16" and l16.mesh.fsdp == -1 and l16.train.label_smoothing == 0.1
    for path in CONFIGS.glob("*.yaml"):
        assert path.read_text().startswith("# jaxvision finetune --config configs/vit/"), path


def test_config_errors_exit_nonzero_naming_the_key(capsys):
    assert cli.main(["plan", "--config", str(CONFIGS / "l16_384.yaml"), "--json"]) != 0
    assert "model.path" in capsys.readouterr().err
    assert cli.main(["plan", "--config", str(CONFIGS / "digits.yaml"), "mesh.fsdpp=2", "--json"]) != 0
    assert "mesh.fsdpp" in capsys.readouterr().err
    assert cli.main(["plan", "--config", str(CONFIGS / "digits.yaml"), "train.batch_size=big"]) != 0
    assert "train.batch_size" in capsys.readouterr().err


def test_plan_picks_the_trainer_whose_schema_the_config_fits(capsys):
    """Without --trainer, a DreamBooth config is planned as DreamBooth (the finetune schema rejects
    its keys), and a config that fits no trainer says why for each one."""
    dreambooth = str(CONFIGS.parent / "dreambooth" / "sd15.yaml")
    assert cli.main(["plan", "--config", dreambooth, "train.bogus=1", "--json"]) != 0
    err = capsys.readouterr().err
    assert "as a dreambooth config" in err and "train.bogus" in err
    assert "as a finetune config" in err and "data.instance_prompt" in err
    assert cli.main(["plan", "--trainer", "finetune", "--config", dreambooth, "--json"]) != 0
    assert "as a dreambooth config" not in capsys.readouterr().err


def test_dreambooth_plan_rejects_a_batch_the_mesh_cannot_split():
    """A DreamBooth step whose rows (batch + prior) do not split over the data-parallel ways is a
    config error naming train.batch_size and the ways, before anything compiles (it used to be
    JAX's IndivisibleError from deep inside the step's lowering)."""
    proc = run_plan(
        "--trainer",
        "dreambooth",
        "--config",
        str(CONFIGS.parent / "dreambooth" / "sd15.yaml"),
        "model.path=/nonexistent",
        "mesh.data=1",
        "mesh.fsdp=8",
        "train.batch_size=1",
    )
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "train.batch_size=1 gives 2 rows per step, not divisible by the data-parallel ways (8" in stderr
