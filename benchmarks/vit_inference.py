"""ViT inference throughput: jaxvision (JAX/XLA) vs transformers (PyTorch), side by side, same weights.

    python -m benchmarks.vit_inference                      # ViT-L/16-384, batch 1 and 8, fp32
    python -m benchmarks.vit_inference --variant B/16 --image-size 224 --iters 5

Random weights are written once by transformers' `save_pretrained` and loaded by both libraries,
so both run the identical network. Compile time (JAX) and the first torch call are reported
separately from the steady-state median. No timing here is asserted anywhere; it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    import torch
    import transformers

    import jaxvision
    from jaxvision.models.vit import VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="L/16", choices=list(VARIANTS))
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    width, depth, heads, mlp, patch = VARIANTS[args.variant]
    config = transformers.ViTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        patch_size=patch,
        image_size=args.image_size,
        num_labels=1000,
    )
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    ref = transformers.ViTForImageClassification(config).eval()
    tokens = (args.image_size // patch) ** 2 + 1
    # 2 FLOPs per MAC: qkv+out (4 d^2) and MLP (2 d m) per token, attention (2 t d) per token, per layer.
    gflop = 2 * depth * tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width) / 1e9
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        module, params = jaxvision.from_pretrained(tmp)
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    print(
        f"ViT {args.variant} @ {args.image_size}px, fp32, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU threads, {gflop:.1f} GFLOP/image"
    )
    print(
        f"{'batch':>5} {'jaxvision img/s':>16} {'torch img/s':>12} {'ratio':>6} {'jax GFLOP/s':>12} {'compile s':>10}"
    )
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        x = np.random.default_rng(0).standard_normal((batch, args.image_size, args.image_size, 3), np.float32)
        xj = jnp.asarray(x)
        t0 = time.perf_counter()
        compiled = forward.lower(params, xj).compile()
        compile_s = time.perf_counter() - t0
        compiled(params, xj).block_until_ready()
        jax_s = _median_seconds(lambda c=compiled, xj=xj: c(params, xj).block_until_ready(), args.iters)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        with torch.inference_mode():
            ref(xt)
            torch_s = _median_seconds(lambda xt=xt: ref(xt), args.iters)
        row = dict(
            batch=batch,
            jax_images_per_s=batch / jax_s,
            torch_images_per_s=batch / torch_s,
            ratio=torch_s / jax_s,
            jax_gflops=gflop * batch / jax_s,
            compile_s=compile_s,
        )
        results.append(row)
        print(
            f"{batch:>5} {row['jax_images_per_s']:>16.2f} {row['torch_images_per_s']:>12.2f} "
            f"{row['ratio']:>6.2f} {row['jax_gflops']:>12.1f} {compile_s:>10.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variant": args.variant, "image_size": args.image_size, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
