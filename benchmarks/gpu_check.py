"""Checks to run first on a borrowed GPU: what is installed, and whether cuDNN attention is right and used.

    python -m benchmarks.gpu_check --smoke          # exit status 0 when jaxvision imports and runs here
    python -m benchmarks.gpu_check --out check.json # the full check (about half a minute on an H100)

The full check runs `layers.attention(implementation="cudnn")` on the shapes jaxvision's models
send it in bf16 (SD 1.5's 4096-token self-attention and its 77-token cross-attention, ViT-L/16-384's
577 tokens, CLIP's causal 77 tokens, SD 2.1's head_dim 64 at 96×96 latents) and compares output and
query gradient with the fp32 einsum reference on the same bf16 inputs (‖Δ‖/‖ref‖; bf16 inputs and
a bf16 output give ~4e-3, so 2e-2 is the bound), the gradient taken through `jax.checkpoint` as the models' remat does. It
also reads the compiled forward and gradient programs to say whether cuDNN's fused kernel
(`__cudnn$fmha…`) is in them or the seam fell back to XLA (`cudnn_unsupported`).
Nothing here needs torch; `benchmarks.run --gpu` does the timing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

# (name, batch, q_len, kv_len, heads, head_dim, causal)
SHAPES = (
    ("sd15 self-attention 64x64", 2, 4096, 4096, 8, 40, False),
    ("sd15 cross-attention 64x64", 2, 4096, 77, 8, 40, False),
    ("vit-l16-384", 8, 577, 577, 16, 64, False),
    ("clip-l text (causal)", 2, 77, 77, 12, 64, True),
    ("sd21 self-attention 96x96", 2, 9216, 9216, 5, 64, False),
)
BOUND = 2e-2  # relative L2 error of a bf16 attention against the fp32 reference on the same inputs
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "diffusers", "safetensors")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def smoke() -> None:
    """Imports jaxvision's model stack and runs a tiny ViT forward on the default device."""
    import jax
    import jax.numpy as jnp

    from jaxvision.models.vit import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=(32, 32),
        labels=("a", "b"),
    )
    attention = "cudnn" if jax.default_backend() == "gpu" else None
    model = ViTForImageClassification(cfg, dtype=jnp.bfloat16, attention_impl=attention)
    x = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), x)
    out = jax.jit(model.apply)(params, x)
    print(f"smoke: jaxvision runs on {jax.devices()[0].device_kind}: logits {out.logits.shape}", file=sys.stderr)


def check_attention(
    name: str, b: int, lq: int, lk: int, h: int, d: int, causal: bool, implementation: str = "cudnn"
) -> dict[str, Any]:
    """One shape: the seam with `implementation` against the fp32 einsum reference, output and dq."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxvision.models import layers

    keys = jax.random.split(jax.random.PRNGKey(hash(name) % 2**31), 4)
    q = jax.random.normal(keys[0], (b, lq, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, lk, h, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, lk, h, d), jnp.bfloat16)
    g = jax.random.normal(keys[3], (b, lq, h, d), jnp.float32)

    def fused(q, k, v):
        return layers.attention(q, k, v, is_causal=causal, implementation=implementation)

    def reference(q, k, v):
        f32 = (t.astype(jnp.float32) for t in (q, k, v))
        with jax.default_matmul_precision("highest"):
            return layers.reference_attention(*f32, is_causal=causal)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g)

    # The gradient goes through `jax.checkpoint`, as in the models (remat): there jax's cuDNN rules
    # run outside the seam's reach, so a shape cuDNN rejects fails here instead of falling back.
    grad_fused = jax.jit(jax.grad(loss(jax.checkpoint(fused))))
    hlo = jax.jit(fused).lower(q, k, v).compile().as_text()
    grad_hlo = grad_fused.lower(q, k, v).compile().as_text()
    out, ref = jax.jit(fused)(q, k, v), jax.jit(reference)(q, k, v)
    dq, dq_ref = grad_fused(q, k, v), jax.jit(jax.grad(loss(reference)))(q, k, v)

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    result = {
        "shape": name,
        "q": [b, lq, h, d],
        "kv_len": lk,
        "causal": causal,
        "cudnn_kernel_in_forward": "cudnn$fmha" in hlo,
        "cudnn_kernel_in_gradient": "cudnn$fmha" in grad_hlo,
        "fallback_reason": layers.cudnn_unsupported(q, k, None),
        "rel_error_out": rel(out, ref),
        "rel_error_dq": rel(dq, dq_ref),
        "finite": bool(np.isfinite(np.asarray(out, np.float32)).all()),
    }
    result["ok"] = result["finite"] and result["rel_error_out"] < BOUND and result["rel_error_dq"] < BOUND
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="only check that jaxvision imports and runs")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    import jax

    info = {"versions": versions(), "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend()}
    print(json.dumps(info), file=sys.stderr)
    if args.smoke:
        smoke()
        return 0
    results = []
    for shape in SHAPES:
        try:
            r = check_attention(*shape)
        except Exception as e:  # a failing shape is a finding, not the end of the check
            r = {"shape": shape[0], "ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    if args.out:
        args.out.write_text(json.dumps({**info, "attention": results}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
