"""ViT-L/16-384 workloads: inference (a batch of images → logits) and one fine-tuning step.

Each function is one benchmark process's work (the orchestrator, `benchmarks.run`, starts a fresh
process per call through `benchmarks.worker`); `p` is its settings dict:
`checkpoint` (a transformers ViT folder), `batch`, `dtype` ("float32" / "bfloat16"), `gpu`,
`warmup`, `iters`, and for fine-tuning `image_size`.

    python -m benchmarks.worker benchmarks.vit:inference_jax '{"checkpoint": "...", "batch": 1}'
"""

from __future__ import annotations

from typing import Any

from benchmarks.timing import (
    block,
    log,
    lower_and_compile,
    memory_bytes,
    program_flops,
    row,
    time_calls,
    timed,
    torch_device,
)

INFERENCE = "vit_l16_384_inference"
FINETUNE = "vit_l16_384_finetune_step"


def analytic_gflop(width: int, depth: int, mlp: int, tokens: int) -> float:
    """GFLOP of one image's encoder forward: 2 FLOPs per multiply-add of the qkv/out projections
    (4 d²), the MLP (2 d m) and the attention scores and mix (2 t d), per token and layer.
    ViT-L/16 at 384 px (577 tokens): 382 GFLOP."""
    return 2 * depth * tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width) / 1e9


def _setting(p: dict) -> str:
    return f"batch {p['batch']}, {p['dtype']}" + (f", {p['image_size']} px" if p.get("image_size") else "")


def inference_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision: `jax.jit` of the classifier forward, AOT-compiled, params and images as arguments."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxvision

    dtype = jnp.dtype(p["dtype"])
    # Inference in bf16 stores the weights in bf16 too, as torch's `model.to(torch.bfloat16)`.
    module, params = jaxvision.from_pretrained(p["checkpoint"], dtype=dtype, param_dtype=dtype)
    if p.get("attention_impl"):
        module = module.clone(attention_impl=p["attention_impl"])
    cfg = module.config
    size = cfg.image_size[0]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((p["batch"], size, size, 3)), dtype)
    forward = jax.jit(lambda params, x: module.apply({"params": params}, x).logits)
    lowered, compiled, compile_s = lower_and_compile(lambda: forward.lower(params, x))
    t = time_calls(lambda: block(compiled(params, x)), warmup=p["warmup"], iters=p["iters"])
    flops = program_flops(lowered, compiled)
    tokens = (size // cfg.patch_size[0]) * (size // cfg.patch_size[1]) + 1
    analytic = analytic_gflop(cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, tokens)
    return [
        row(
            INFERENCE,
            _setting(p),
            "jaxvision",
            t,
            per_call=p["batch"],
            unit="image",
            compile_s=compile_s,
            gflop=analytic * p["batch"],
            xla_gflop=flops / 1e9 if flops else None,
            device=str(jax.devices()[0].device_kind),
        )
    ]


def inference_torch(p: dict) -> list[dict[str, Any]]:
    """transformers' `ViTForImageClassification` (PyTorch), eval mode under `torch.inference_mode`."""
    import numpy as np
    import torch
    import transformers

    device, sync = torch_device(p["gpu"])
    dtype = getattr(torch, p["dtype"])
    model = transformers.ViTForImageClassification.from_pretrained(p["checkpoint"]).eval().to(device, dtype)
    size = model.config.image_size
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((p["batch"], 3, size, size), np.float32))
    x = x.to(device, dtype)

    def call() -> None:
        with torch.inference_mode():
            model(pixel_values=x)
        sync()

    _, first_s = timed(call)
    t = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(INFERENCE, _setting(p), "torch", t, per_call=p["batch"], unit="image", compile_s=first_s)]


def finetune_jax(p: dict) -> list[dict[str, Any]]:
    """jaxvision's fine-tuning step (`trainers.vit_finetune.train.compile_step`, configs/vit/l16_384.yaml's recipe:
    SGD + momentum, clipping, cosine schedule), one optimizer step on a batch of `p["batch"]`.

    Remat is off (`train.remat_policy=none`) so the step does the same work as the torch
    reference, which keeps every activation.
    """
    from pathlib import Path

    import jax
    import numpy as np

    from jaxvision.models.kernels import platform_of
    from jaxvision.train import sharding as sharding_lib
    from jaxvision.train.mesh import make_mesh
    from jaxvision.train.plan import plan_train_step
    from jaxvision.train.state import create_train_state
    from jaxvision.trainers import vit_finetune
    from jaxvision.trainers.vit_finetune import train as ft

    config = Path(__file__).resolve().parents[1] / "configs" / "vit" / "l16_384.yaml"
    overrides = [
        f"model.path={p['checkpoint']}",
        f"model.image_size={p['image_size']}",
        f"train.batch_size={p['batch']}",
        f"train.dtype={p['dtype']}",
        "train.remat_policy=none",
        "mesh.data=1",
        "mesh.fsdp=-1",
    ]
    if p.get("attention_impl"):
        overrides.append(f"model.attention_impl={p['attention_impl']}")
    cfg = vit_finetune.load(str(config), overrides)
    mesh = make_mesh(cfg.mesh)
    # 10 new classes: the head is replaced, as when fine-tuning on new data.
    model = ft.build_model(cfg, tuple(f"class_{i}" for i in range(10)), platform_of(mesh))
    (optimizer, step), compile_s = timed(lambda: ft.compile_step(cfg, model, mesh))
    state, frozen = create_train_state(
        ft.init_fn_for(model), optimizer, jax.random.PRNGKey(0), mesh, params=model.params
    )
    size = p["image_size"]
    rng = np.random.default_rng(0)
    batch = sharding_lib.shard_batch(
        {
            "image": rng.standard_normal((p["batch"], size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 10, p["batch"]).astype(np.int32),
        },
        mesh,
    )
    holder = [state]

    def call() -> None:
        holder[0], metrics = step.compiled(holder[0], frozen, batch)
        block(metrics)

    t = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    flops = program_flops(step.lowered, step.compiled)
    log(f"finetune step: XLA counts {flops and flops / 1e9:.1f} GFLOP")
    return [
        row(
            FINETUNE,
            _setting(p),
            "jaxvision",
            t,
            per_call=p["batch"],
            unit="image",
            compile_s=compile_s,
            gflop=flops / 1e9 if flops else None,
            gflop_source="XLA cost analysis",
            plan=plan_train_step(step),
            memory=memory_bytes(step.compiled),
        )
    ]


def finetune_torch(p: dict) -> list[dict[str, Any]]:
    """The same step in PyTorch: transformers' ViT, new 10-class head, cross-entropy, backward,
    `clip_grad_norm_(1.0)`, SGD with momentum 0.9 (bf16 runs under `torch.autocast`)."""
    import numpy as np
    import torch
    import transformers

    device, sync = torch_device(p["gpu"])
    model = transformers.ViTForImageClassification.from_pretrained(
        p["checkpoint"], num_labels=10, ignore_mismatched_sizes=True, image_size=p["image_size"]
    ).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    size = p["image_size"]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((p["batch"], 3, size, size)).astype(np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, 10, p["batch"])).to(device)
    autocast = p["dtype"] == "bfloat16"

    def call() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(pixel_values=x, interpolate_pos_encoding=True).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    _, first_s = timed(call)
    t = time_calls(call, warmup=p["warmup"], iters=p["iters"])
    return [row(FINETUNE, _setting(p), "torch", t, per_call=p["batch"], unit="image", compile_s=first_s)]
