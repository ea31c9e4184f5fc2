"""LoRA (Hu et al., 2021): low-rank adapters on chosen Dense kernels, merged on the fly.

Each targeted Dense kernel W `[in, out]` (by default the UNet's attention projections, and the
CLIP text encoder's when it is trained) gets two trainable leaves beside it in the param tree,
`lora_down` `[in, rank]` and `lora_up` `[rank, out]`. The model computes with
`W + scale · lora_down @ lora_up`, `scale = alpha / rank`: `merge_lora` builds those kernels
inside the jitted loss, so the Flax modules stay unchanged and the merge costs one rank-r matmul
per kernel next to the forward pass. `lora_up` starts at zero, so step 0 is the base model
exactly. `FREEZE_BASE` freezes every other leaf, so the optimizer state and the checkpoints hold
only the adapters. Adapters sit under their network (`unet/...`, `text_encoder/...`), so
per-network settings keyed on those prefixes apply to them too.

The PEFT file that diffusers' `load_lora_weights` reads is written by `jaxvision.weights.lora_files`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from jaxvision.errors import ConfigError
from jaxvision.train.config import FieldError, require

PyTree = Any
DOWN, UP = "lora_down", "lora_up"
# Freezes every leaf that is not an adapter (`re.search` semantics, as `train.freeze`).
FREEZE_BASE = rf"^(?!.*/({DOWN}|{UP})$)"
# Regexes over "/"-joined module paths (the Dense layer's path, without "/kernel").
UNET_ATTENTION = r"^unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)$"
TEXT_ATTENTION = r"^text_encoder/.*/self_attn/(q_proj|k_proj|v_proj|out_proj)$"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """The `train.lora` section: low-rank adapters instead of full fine-tuning.

    Attributes:
      rank: adapter rank r; 0 turns LoRA off (the networks are trained in full).
      alpha: the update is scaled by `alpha / rank`; null means alpha = rank (scale 1, as
        diffusers' `train_dreambooth_lora.py`).
      targets: regexes (`re.search`) over "/"-joined Dense-layer paths such as
        `unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q`; the text encoder's
        layers are adapted only with `train.train_text_encoder`.
      export_merged: also write the full model with the adapters merged to `output_dir/export/`
        (the LoRA weights always go to `output_dir/pytorch_lora_weights.safetensors`).
    """

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = (UNET_ATTENTION, TEXT_ATTENTION)
    export_merged: bool = True

    def __post_init__(self):
        require(self.rank >= 0, "rank", self.rank, "must be >= 0 (0 turns LoRA off)")
        require(self.alpha is None or self.alpha > 0, "alpha", self.alpha, "must be > 0, or null (alpha = rank)")
        object.__setattr__(self, "targets", tuple(self.targets))
        require(bool(self.targets), "targets", list(self.targets), "give at least one regex over layer paths")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise FieldError("targets", pattern, f"not a valid regular expression ({e})") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """`alpha / rank` (1 when LoRA is off, where it is never used)."""
        return 1.0 if not self.enabled or self.alpha is None else self.alpha / self.rank


# ----------------------------------------------------------------------------- adapters


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple((leaf.value if isinstance(leaf, meta.Partitioned) else leaf).shape)


def select_targets(params: PyTree, cfg: LoraConfig, networks: Sequence[str]) -> list[str]:
    """The Dense-layer paths that get adapters, in flatten order.

    Args:
      params: `{"unet": ..., "text_encoder": ..., ...}` (arrays, shapes, or logical-axis boxes).
      cfg: the LoRA config; every target regex must match some layer of `params`.
      networks: the top-level subtrees that may be adapted (the text encoder only when trained).
    Returns:
      Module paths such as `unet/mid_block/attentions_0/transformer_blocks_0/attn1/to_q`.
    Raises:
      ConfigError: a regex matches no layer (a typo would silently adapt nothing), a matched
        layer is not a Dense (2-D kernel), or no layer of `networks` is matched.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    kernels = {path.removesuffix("/kernel"): leaf for path, leaf in flat.items() if path.endswith("/kernel")}
    patterns = [re.compile(p) for p in cfg.targets]
    for pattern in patterns:
        if not any(pattern.search(m) for m in kernels):
            example = next((m for m in kernels if "attn" in m), next(iter(kernels), "<none>"))
            raise ConfigError(
                f"train.lora.targets: {pattern.pattern!r} matches no layer; layer paths look like {example!r}"
            )
    selected = [m for m in kernels if m.split("/")[0] in networks and any(p.search(m) for p in patterns)]
    for m in selected:
        if len(_leaf_shape(kernels[m])) != 2:
            raise ConfigError(
                f"train.lora.targets: {m} has a kernel of shape {_leaf_shape(kernels[m])}; LoRA adapts Dense "
                "layers (2-D kernels) only, so narrow the regex"
            )
    if not selected:
        raise ConfigError(
            f"train.lora.targets={list(cfg.targets)} matches no layer of the trained networks ({', '.join(networks)})"
        )
    return selected


def init_lora(params: PyTree, cfg: LoraConfig, networks: Sequence[str], rng: jax.Array) -> PyTree:
    """Fresh adapters for `select_targets(params, cfg, networks)`; only the adapter leaves.

    `lora_down` ~ N(0, (1/rank)²) (PEFT's "gaussian" init, which diffusers' LoRA DreamBooth
    uses), `lora_up` = 0, both fp32 masters. Boxed (logical-axis) kernels give boxed adapters
    that share the kernel's input / output axis names, so they shard alongside it.

    Returns:
      A nested dict with `<module>/lora_down` `[in, rank]` and `<module>/lora_up` `[rank, out]`
      leaves, disjoint from `params` (combine them with `freeze.merge_params`).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    r = cfg.rank
    out: dict[str, Any] = {}
    for i, module in enumerate(select_targets(params, cfg, networks)):
        kernel = flat[f"{module}/kernel"]
        d_in, d_out = _leaf_shape(kernel)
        down = jax.random.normal(jax.random.fold_in(rng, i), (d_in, r), jnp.float32) / r
        up = jnp.zeros((r, d_out), jnp.float32)
        if isinstance(kernel, meta.Partitioned):
            down = meta.Partitioned(down, names=(kernel.names[0], None))
            up = meta.Partitioned(up, names=(None, kernel.names[1]))
        out[f"{module}/{DOWN}"], out[f"{module}/{UP}"] = down, up
    return traverse_util.unflatten_dict(out, sep="/")


def merge_lora(params: PyTree, scale: float) -> PyTree:
    """The tree the models run on: each adapted `kernel` becomes `W + scale · down @ up`
    (computed in fp32, cast back to W's dtype) and the adapter leaves are dropped.

    A tree without adapters comes back unchanged. Differentiable (the train step takes its
    gradient with respect to the adapters) and cheap next to a forward pass.
    """

    def walk(tree: Any) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        if DOWN not in tree:
            return {k: walk(v) for k, v in tree.items()}
        w = tree["kernel"]
        # Rank-r products are tiny; full fp32 keeps the merge exact on TF32 / bf16-pass hardware.
        delta = jnp.matmul(tree[DOWN], tree[UP], precision=jax.lax.Precision.HIGHEST)
        merged = {k: v for k, v in tree.items() if k not in (DOWN, UP)}
        merged["kernel"] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
        return merged

    return walk(params)


def lora_loss(loss_fn: Callable[[PyTree, Any, jax.Array], Any], scale: float) -> Callable:
    """`loss_fn` over the merged tree: `(params with adapters, batch, rng) -> loss_fn(merge_lora(params), ...)`."""

    def merged_loss(params: PyTree, batch: Any, rng: jax.Array) -> Any:
        return loss_fn(merge_lora(params, scale), batch, rng)

    return merged_loss
