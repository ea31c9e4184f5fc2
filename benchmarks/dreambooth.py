"""One DreamBooth train step of SD 1.5 (UNet *and* text encoder trained, VAE frozen), with its memory.

configs/dreambooth/sd15.yaml's recipe: prior preservation (a batch of `batch` instance and
`batch` class images), AdamW, clipping at 1.0, per-block remat `nothing_saveable` (the torch
reference turns on gradient checkpointing in both networks to match), `train_text_encoder=true`.
`p`: `checkpoint` (a diffusers SD folder), `resolution`, `batch`, `dtype`, `gpu`,
`attention_impl`, `fsdp` (mesh.fsdp; the sharded variant runs on 8 fake CPU devices, the
orchestrator sets `XLA_FLAGS=--xla_force_host_platform_device_count=8`), `warmup`, `iters`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.timing import block, log, memory_bytes, program_flops, row, time_calls, timed, torch_device

WORKLOAD = "sd15_dreambooth_step"
SHARDED = "sd15_dreambooth_step_sharded"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dreambooth" / "sd15.yaml"


def setting(p: dict) -> str:
    rows = 2 * p["batch"]
    mesh = f", fsdp {p['fsdp']} of {p['devices']} devices" if p.get("devices", 1) > 1 else ""
    return f"{p['resolution']} px, {rows} rows (batch {p['batch']} + prior), {p['dtype']}{mesh}"


def step_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision's DreamBooth step (`trainers.dreambooth.train.compile_step`, the trainer's own), AOT-compiled with
    donated state; the memory plan is `plan_train_step`'s per-device bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxvision.models.kernels import platform_of
    from jaxvision.train import sharding as sharding_lib
    from jaxvision.train.mesh import make_mesh
    from jaxvision.train.plan import plan_train_step
    from jaxvision.train.state import create_train_state
    from jaxvision.trainers import dreambooth as db
    from jaxvision.trainers.dreambooth import train as db_train

    devices = p.get("devices", 1)
    if len(jax.devices()) != devices:
        raise RuntimeError(f"expected {devices} devices, JAX sees {len(jax.devices())} (XLA_FLAGS not applied?)")
    overrides = [
        f"model.path={p['checkpoint']}",
        "data.instance_dir=unused-by-the-step",
        f"data.resolution={p['resolution']}",
        f"train.batch_size={p['batch']}",
        f"train.dtype={p['dtype']}",
        "train.train_text_encoder=true",
        "mesh.data=1",
        f"mesh.fsdp={p.get('fsdp', 1)}",
    ]
    if p.get("attention_impl"):
        overrides.append(f"model.attention_impl={p['attention_impl']}")
    cfg = db.load(str(CONFIG), overrides)
    mesh = make_mesh(cfg.mesh)
    nets = db_train.build_networks(cfg, platform_of(mesh))  # the trainer's own networks and kernels
    comps, text_encoder = nets.components, nets.text_encoder
    (init_fn, optimizer, rng, step), compile_s = timed(lambda n=nets: db_train.compile_step(cfg, mesh, n))
    base = {"unet": comps.unet_params, "text_encoder": comps.text_encoder_params, "vae": comps.vae_params}
    state, frozen = create_train_state(init_fn, optimizer, rng, mesh, params=base)
    del base, comps, nets
    n, r = db_train.rows_per_step(cfg), cfg.data.resolution
    g = np.random.default_rng(0)
    batch = sharding_lib.shard_batch(
        {
            "pixel_values": g.uniform(-1, 1, (n, r, r, 3)).astype(np.float32),
            "input_ids": g.integers(0, 1000, (n, text_encoder.config.max_position_embeddings)).astype(np.int32),
            "prior_mask": np.repeat(np.arange(2, dtype=np.float32), p["batch"]),
        },
        mesh,
    )
    holder = [state]

    def call() -> None:
        holder[0], metrics = step.compiled(holder[0], frozen, batch)
        block(metrics)

    timing = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    flops = program_flops(step.lowered, step.compiled)
    plan = plan_train_step(step)
    log(
        f"dreambooth step: {timing.median_s:.2f} s, per-device total {plan['per_device_bytes']['total'] / 2**30:.2f} GiB"
    )
    return [
        row(
            SHARDED if devices > 1 else WORKLOAD,
            setting(p),
            "jaxvision",
            timing,
            per_call=1,
            unit="step",
            compile_s=compile_s,
            gflop=flops / 1e9 if flops else None,
            gflop_source="XLA cost analysis (counts the remat recomputation; per device when sharded)",
            plan=plan,
            memory=memory_bytes(step.compiled),
            dtype_note=str(jnp.dtype(p["dtype"])),
        )
    ]


def step_torch(p: dict) -> list[dict[str, Any]]:
    """The step as diffusers' `examples/dreambooth/train_dreambooth.py` takes it (PyTorch): VAE
    encode (no grad), noise and timesteps, text encoder + UNet forward, instance MSE + prior MSE,
    backward, `clip_grad_norm_(1.0)`, AdamW; gradient checkpointing on; bf16 via `torch.autocast`."""
    import itertools

    import diffusers
    import numpy as np
    import torch
    import transformers

    device, sync = torch_device(p["gpu"])
    root = Path(p["checkpoint"])
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").to(device).train()
    text = transformers.CLIPTextModel.from_pretrained(root / "text_encoder").to(device).train()
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae").to(device).eval().requires_grad_(False)
    unet.enable_gradient_checkpointing()
    text.gradient_checkpointing_enable()
    noise_scheduler = diffusers.DDPMScheduler.from_pretrained(root / "scheduler")
    params = list(itertools.chain(unet.parameters(), text.parameters()))
    opt = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.01)
    b, r = p["batch"], p["resolution"]
    g = np.random.default_rng(0)
    pixels = torch.from_numpy(g.uniform(-1, 1, (2 * b, 3, r, r)).astype(np.float32)).to(device)
    ids = torch.from_numpy(g.integers(0, 1000, (2 * b, text.config.max_position_embeddings))).to(device)
    autocast = p["dtype"] == "bfloat16"

    def call() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (2 * b,), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            context = text(ids)[0]
            pred = unet(noisy, t, context).sample
        pred_inst, pred_prior = pred.float().chunk(2)
        noise_inst, noise_prior = noise.float().chunk(2)
        loss = torch.nn.functional.mse_loss(pred_inst, noise_inst) + torch.nn.functional.mse_loss(
            pred_prior, noise_prior
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    _, first_s = timed(call)
    timing = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(WORKLOAD, setting(p), "torch", timing, unit="step", compile_s=first_s)]
