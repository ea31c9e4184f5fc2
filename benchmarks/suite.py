"""What each mode of the suite measures: one `Case` per fresh benchmark process.

Three modes (settings differ; the workloads and the code that times them do not):

- `full` (CPU): the issue's workloads at their real sizes where a CPU can run them — ViT-L/16-384
  batch 1 and 8 in fp32 and bf16, a fine-tuning step (batch 4); the SD 1.5 UNet CFG step at 64×64
  and 32×32 latents; VAE decode to 512 px. Two documented reductions for CPU: 50-step sampling at
  **256 px** (not 512), the DreamBooth step at **256 px**; the sharded step is the DreamBooth step at
  128 px on 8 fake CPU devices (fsdp 8, batch 4 + 4 prior rows; 8 fake devices share the host memory).
- `quick` (a few minutes on 2 cores): full-size ViT-L/16-384 inference at batch 1 (fp32); the
  ViT-L fine-tuning step at 224 px batch 1; every SD workload on the test suite's *tiny* SD model
  (its times exercise the harness, not SD performance).
- `gpu`: the full-size suite in bf16 with `attention_impl="cudnn"`: ViT-L batch 1 and 8, a
  batch-16 fine-tuning step, the UNet at 64×64 and 32×32, VAE decode at 512 px, 50-step sampling at
  512 px, the DreamBooth step at 512 px; the sharded step on 8 fake CPU devices (tiny SD, to check
  the sharded program, not a GPU number). MFU is against the card's measured bf16 matmul rate.
  The cases run most-informative first (`GPU_ORDER`), so a run cut short by `--budget-s` on a
  borrowed machine still has the headline rows.
- `gpu-rehearsal` (`--gpu --rehearse`): the GPU suite's cases, order and bf16 settings at the quick
  sizes on this CPU (XLA attention in place of cuDNN; torch on the CPU), to find a broken case
  before a GPU is borrowed. Its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks import dreambooth, kernels, matmul, sampling, unet, vae, vit

CPU_ENV = {"JAX_PLATFORMS": "cpu"}
FAKE_8 = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "CUDA_VISIBLE_DEVICES": ""}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark process.

    Attributes:
      workload, setting, impl: the row it produces (used for its failure row too).
      target: `module:function` run by `benchmarks.worker`.
      settings: the function's settings dict (the checkpoint path is added by the orchestrator).
      checkpoint: the `benchmarks.checkpoints` name it loads, or None.
      model: what the weights are ("ViT-L/16-384", "SD 1.5", "tiny SD").
      python: "main" (this venv) or "peer" (`build/flax-peers-venv`).
      env: extra environment variables (fake devices, platform).
      timeout_s: the process is killed after this long (its row says so).
    """

    workload: str
    setting: str
    impl: str
    target: str
    settings: dict[str, Any]
    checkpoint: str | None = None
    model: str = ""
    python: str = "main"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout_s: int = 1800


def _three(workload, setting, jax_t, torch_t, peer_t, s, **kw) -> list[Case]:
    """jaxvision, torch and (where given) the Flax peer on the same settings."""
    cases = [Case(workload, setting, "jaxvision", jax_t, s, **kw), Case(workload, setting, "torch", torch_t, s, **kw)]
    if peer_t:
        cases.append(Case(workload, setting, "flax-peer", peer_t, s, python="peer", **kw))
    return cases


# The GPU suite's run order: the headline comparisons first, the kernels that explain them last.
GPU_ORDER = (
    matmul.WORKLOAD,
    vit.INFERENCE,
    unet.WORKLOAD,
    kernels.ATTENTION,
    vae.WORKLOAD,
    dreambooth.WORKLOAD,
    sampling.WORKLOAD,
    vit.FINETUNE,
    kernels.CONV,
    kernels.ATTENTION + "_einsum",
    dreambooth.SHARDED,
)


def _settings(mode: str) -> dict[str, Any]:
    gpu = mode == "gpu"
    if mode == "gpu-rehearsal":
        return {
            **_settings("quick"),
            "timing": dict(warmup=1, iters=2, gpu=False, attention_impl="xla"),
            "dtypes": ("bfloat16",),
        }
    if mode == "quick":
        return dict(
            timing=dict(warmup=1, iters=2, gpu=False),
            dtypes=("float32",),
            matmul_n=2048,
            vit_batches=(1,),
            finetune=dict(batch=1, image_size=224),
            sd="tiny-sd",
            sd_model="tiny SD (test size)",
            unet_latents=(8,),
            vae_latent=8,
            sampling=dict(resolution=64, steps=10, batch=1),
            dreambooth=dict(resolution=64, batch=1),
            sharded=dict(sd="tiny-sd", resolution=32, batch=4),
        )
    if gpu:
        return dict(
            timing=dict(warmup=2, iters=5, gpu=True, attention_impl="cudnn"),
            dtypes=("bfloat16",),
            matmul_n=8192,
            vit_batches=(1, 8),
            finetune=dict(batch=16, image_size=384),
            sd="sd15",
            sd_model="SD 1.5",
            unet_latents=(64, 32),
            vae_latent=64,
            sampling=dict(resolution=512, steps=50, batch=1),
            dreambooth=dict(resolution=512, batch=1),
            sharded=dict(sd="tiny-sd", resolution=32, batch=4),
        )
    return dict(
        timing=dict(warmup=1, iters=3, gpu=False),
        dtypes=("float32", "bfloat16"),
        matmul_n=4096,
        vit_batches=(1, 8),
        finetune=dict(batch=4, image_size=384),
        sd="sd15",
        sd_model="SD 1.5",
        unet_latents=(64, 32),
        vae_latent=64,
        sampling=dict(resolution=256, steps=50, batch=1),
        dreambooth=dict(resolution=256, batch=1),
        sharded=dict(sd="sd15", resolution=128, batch=4),
    )


def plan(mode: str) -> list[Case]:
    """Every process of `mode` ("full", "quick", "gpu", "gpu-rehearsal"), in run order."""
    s = _settings(mode)
    t = s["timing"]
    gpu_order = mode.startswith("gpu")
    gpu = mode == "gpu"
    env = {} if gpu else CPU_ENV
    dtype = s["dtypes"][-1] if gpu_order else "float32"
    cases: list[Case] = []

    mm_dtype = "bfloat16" if gpu_order else "float32"
    mm = {**t, "n": s["matmul_n"], "dtype": mm_dtype}
    mm_setting = matmul.setting(mm)
    cases += _three(
        matmul.WORKLOAD, mm_setting, "benchmarks.matmul:matmul_jax", "benchmarks.matmul:matmul_torch", None, mm, env=env
    )
    cases.append(
        Case(
            matmul.WORKLOAD,
            mm_setting,
            "flax-peer",
            "benchmarks.matmul:matmul_jax",
            {**mm, "impl": "flax-peer"},
            python="peer",
            env=env,
        )
    )

    for d in s["dtypes"]:
        for b in s["vit_batches"]:
            p = {**t, "batch": b, "dtype": d}
            cases += _three(
                vit.INFERENCE,
                vit._setting(p),
                "benchmarks.vit:inference_jax",
                "benchmarks.vit:inference_torch",
                "benchmarks.flax_peers.models:vit_inference",
                p,
                checkpoint="vit-l16-384",
                model="ViT-L/16-384",
                env=env,
            )
    p = {**t, **s["finetune"], "dtype": dtype}
    cases += _three(
        vit.FINETUNE,
        vit._setting(p),
        "benchmarks.vit:finetune_jax",
        "benchmarks.vit:finetune_torch",
        None,
        p,
        checkpoint="vit-l16-384",
        model="ViT-L/16-384",
        env=env,
    )

    sd = dict(checkpoint=s["sd"], model=s["sd_model"], env=env)
    for side in s["unet_latents"]:
        p = {**t, "latent": side, "batch": 1, "dtype": dtype}
        p["setting"] = unet.setting(p)
        cases += _three(
            unet.WORKLOAD,
            p["setting"],
            "benchmarks.unet:cfg_step_jax",
            "benchmarks.unet:cfg_step_torch",
            "benchmarks.flax_peers.models:unet_cfg_step",
            p,
            **sd,
        )
    # The UNet's hot kernels alone, at SD 1.5's 64×64 size in every mode (cheap, and they say where
    # a UNet step's time goes): attention through the seam, plain einsum attention, a 3×3 conv.
    p = {**t, "dtype": dtype}
    cases += _three(
        kernels.ATTENTION,
        kernels.attention_setting(p),
        "benchmarks.kernels:attention_jax",
        "benchmarks.kernels:attention_torch",
        None,
        p,
        model="SD 1.5 shapes",
        env=env,
    )
    for impl, python in (("jaxvision", "main"), ("flax-peer", "peer")):
        cases.append(
            Case(
                kernels.ATTENTION + "_einsum",
                kernels.attention_setting(p),
                impl,
                "benchmarks.kernels:attention_jax",
                {**p, "variant": "einsum", "impl": impl},
                model="SD 1.5 shapes",
                python=python,
                env=env,
            )
        )
    cases += _three(
        kernels.CONV,
        kernels.conv_setting(p),
        "benchmarks.kernels:conv_jax",
        "benchmarks.kernels:conv_torch",
        None,
        p,
        model="SD 1.5 shapes",
        env=env,
    )
    cases.append(
        Case(
            kernels.CONV,
            kernels.conv_setting(p),
            "flax-peer",
            "benchmarks.kernels:conv_jax",
            {**p, "impl": "flax-peer"},
            model="SD 1.5 shapes",
            python="peer",
            env=env,
        )
    )
    p = {**t, "latent": s["vae_latent"], "batch": 1, "dtype": dtype}
    cases += _three(
        vae.WORKLOAD, vae.setting(p), "benchmarks.vae:decode_jax", "benchmarks.vae:decode_torch", None, p, **sd
    )
    # 50-step sampling: one warm-up (the jaxvision one compiles) and a single timed run on a CPU.
    p = {**t, **s["sampling"], "dtype": dtype, **({} if gpu or mode == "quick" else {"iters": 1})}
    cases += _three(
        sampling.WORKLOAD,
        sampling._setting(p),
        "benchmarks.sampling:sampling_jax",
        "benchmarks.sampling:sampling_torch",
        None,
        p,
        **sd,
    )
    p = {**t, **s["dreambooth"], "dtype": dtype, "fsdp": 1, "devices": 1}
    cases += _three(
        dreambooth.WORKLOAD,
        dreambooth.setting(p),
        "benchmarks.dreambooth:step_jax",
        "benchmarks.dreambooth:step_torch",
        None,
        p,
        **sd,
    )
    sh = s["sharded"]
    p = {
        **t,
        "gpu": False,
        "attention_impl": None,
        "resolution": sh["resolution"],
        "batch": sh["batch"],
        "dtype": "float32",
        "fsdp": 8,
        "devices": 8,
    }
    cases.append(
        Case(
            dreambooth.SHARDED,
            dreambooth.setting(p),
            "jaxvision",
            "benchmarks.dreambooth:step_jax",
            p,
            checkpoint=sh["sd"],
            model="SD 1.5" if sh["sd"] == "sd15" else "tiny SD (test size)",
            env=FAKE_8,
        )
    )
    if gpu_order:
        cases.sort(key=lambda c: GPU_ORDER.index(c.workload))  # stable: jaxvision, torch, peer stay in order
    if gpu:  # the GPU suite is meant to finish in minutes; a stuck process must not eat the budget
        cases = [dataclasses.replace(c, timeout_s=180) for c in cases]
    return cases
