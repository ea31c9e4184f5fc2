"""Declarative key tables: Flax param paths ↔ PyTorch state-dict keys, with named transforms.

A table is a tuple of `Rule(flax, torch, transform)`. Patterns use `{i}`-style integer
placeholders shared by both sides: `Rule("encoder/layer_{i}/mlp/fc1/kernel",
"encoder.layer.{i}.intermediate.dense.weight", LINEAR)`. Loading walks a shape-only template
(`jax.eval_shape(module.init, ...)`), so the table is checked against the exact model being
built; every checkpoint key must be consumed once and every leaf filled once, or the load fails
with one message listing all problems. Export runs the same table backwards.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.errors import WeightLoadError


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named pair of layout conversions: PyTorch → Flax and back."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# nn.Linear stores [out, in]; nn.Dense [in, out].
LINEAR = Transform("linear_T", lambda a: a.T, lambda a: a.T)
# nn.Conv2d stores [O, I, H, W]; nn.Conv [H, W, I, O].
CONV = Transform("conv_oihw_to_hwio", lambda a: np.transpose(a, (2, 3, 1, 0)), lambda a: np.transpose(a, (3, 2, 0, 1)))
# A 1x1 conv stored where the Flax model uses a Dense (diffusers' proj_in/out without linear projection).
CONV1X1_AS_LINEAR = Transform("conv1x1_to_linear", lambda a: a[:, :, 0, 0].T, lambda a: a.T[:, :, None, None])


@dataclasses.dataclass(frozen=True)
class Rule:
    flax: str
    torch: str
    transform: Transform = IDENTITY


def linear_rules(f: str, t: str, transform: Transform = LINEAR, bias: bool = True) -> list[Rule]:
    """A Dense at Flax path `f` ↔ a torch layer with `weight` (+ `bias`) at key prefix `t`."""
    rules = [Rule(f"{f}/kernel", f"{t}.weight", transform)]
    return rules + [Rule(f"{f}/bias", f"{t}.bias")] if bias else rules


def conv_rules(f: str, t: str) -> list[Rule]:
    """An NHWC `nn.Conv` at Flax path `f` ↔ a torch `nn.Conv2d` at key prefix `t`."""
    return linear_rules(f, t, CONV)


def norm_rules(f: str, t: str) -> list[Rule]:
    """A LayerNorm / GroupNorm (`scale`, `bias`) ↔ torch's (`weight`, `bias`)."""
    return [Rule(f"{f}/scale", f"{t}.weight"), Rule(f"{f}/bias", f"{t}.bias")]


def _compile(pattern: str) -> re.Pattern:
    """`"a/layer_{i}/b"` → a regex matching the literal parts, `{i}` capturing an integer named `i`."""
    parts = re.split(r"(\{\w+\})", pattern)
    regex = "".join(f"(?P<{p[1:-1]}>\\d+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex)


class KeyTable:
    """A compiled, ordered table of rules; the first rule whose pattern matches wins."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)
        self._flax = [(_compile(r.flax), r) for r in self.rules]

    def to_torch_key(self, flax_path: str) -> tuple[str, Transform] | None:
        for regex, rule in self._flax:
            m = regex.fullmatch(flax_path)
            if m:
                return rule.torch.format(**m.groupdict()), rule.transform
        return None


def flatten(tree: Mapping) -> dict[str, object]:
    """`{"a": {"b": x}}` → `{"a/b": x}`, unboxing Flax partitioning metadata."""
    tree = flax.core.meta.unbox(tree)
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def unflatten(flat: Mapping[str, object]) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _summarise(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items[:limit]) + more


def load_params(
    template: Mapping,
    state: Mapping[str, np.ndarray],
    table: KeyTable,
    *,
    source: str,
    strip_prefix: str = "",
) -> dict:
    """Fills a shape-only param template from a PyTorch-named state dict, strictly.

    Args:
      template: `jax.eval_shape(module.init, ...)["params"]` (boxed or not).
      state: PyTorch key → array (may be lazy memmaps).
      table: the model's key table.
      source: the file the state came from, for error messages.
      strip_prefix: a key prefix to drop first (e.g. "text_model." variants); keys without it
        are kept as they are.
    Returns:
      A nested dict of numpy arrays in the template's dtypes.
    Raises:
      WeightLoadError: listing missing, unexpected, mis-shaped and mis-typed keys together.
    """
    if strip_prefix:
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    flat_template = flatten(template)
    used: set[str] = set()
    bad_shape, bad_dtype, no_rule = [], [], []
    missing: list[tuple[str, str, tuple[int, ...]]] = []  # (checkpoint key, param path, param shape)
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat_template.items():
        match = table.to_torch_key(path)
        if match is None:
            no_rule.append(path)
            continue
        key, transform = match
        if key in used:
            raise WeightLoadError(f"key table maps two parameters to {key!r} (second: {path}); a table bug")
        if key not in state:
            missing.append((key, path, tuple(leaf.shape)))
            continue
        used.add(key)
        raw = state[key]
        value = transform.to_flax(np.asarray(raw))
        if tuple(value.shape) != tuple(leaf.shape):
            bad_shape.append(
                f"{key}: checkpoint {tuple(raw.shape)} → {tuple(value.shape)}, model expects "
                f"{tuple(leaf.shape)} (for {path})"
            )
            continue
        want = np.dtype(leaf.dtype)
        # Floats cast to the model's param dtype (an fp32 file into bf16 params, as transformers'
        # torch_dtype does); float <-> integer is a mismatch. jnp's issubdtype knows ml_dtypes' bf16.
        if jnp.issubdtype(want, jnp.floating) != jnp.issubdtype(value.dtype, jnp.floating):
            bad_dtype.append(f"{key}: checkpoint dtype {value.dtype}, model expects {want}")
            continue
        out[path] = np.asarray(value, dtype=want)
    unexpected = sorted(set(state) - used)
    problems = []
    if no_rule:
        problems.append(_summarise("model parameters with no rule in the key table, a jaxvision bug", no_rule))
    if missing:
        lines = [f"{key}  (for {path}, shape {shape})" for key, path, shape in missing]
        problems.append(_summarise("missing from the checkpoint", lines))
    if unexpected:
        problems.append(_summarise("unexpected checkpoint keys, not used by this model", unexpected))
    if bad_shape:
        problems.append(_summarise("shape mismatches", bad_shape))
    if bad_dtype:
        problems.append(_summarise("dtype mismatches", bad_dtype))
    if problems:
        raise WeightLoadError(
            f"{source}: the checkpoint does not match the model built from its config.json:\n"
            + "\n".join(problems)
            + "\nCheck that config.json belongs to these weights, or re-export the checkpoint."
        )
    return unflatten(out)


def export_params(params: Mapping, table: KeyTable, *, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Runs the key table backwards: Flax params → PyTorch-named, PyTorch-layout numpy arrays."""
    out = {}
    for path, value in flatten(params).items():
        match = table.to_torch_key(path)
        if match is None:
            raise WeightLoadError(f"parameter {path} has no rule in the key table; cannot export it")
        key, transform = match
        arr = np.asarray(jax.device_get(value))
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype)
        out[key] = np.ascontiguousarray(transform.to_torch(arr))
    return out
