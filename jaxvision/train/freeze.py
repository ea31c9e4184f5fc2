"""Freezing: split a parameter tree into trainable and frozen subtrees by regexes over paths.

Paths are the "/"-joined dict keys (`vit/layer_0/attention/query/kernel`). Frozen leaves leave the
trainable tree entirely, so the optimizer never sees them: they get no optimizer state (zero
bytes, not zero-valued moments), no gradient is computed for them, and they are passed to the
train step as a separate, non-donated argument.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

from jaxvision.errors import ConfigError

PyTree = Any


def param_paths(params: PyTree) -> list[str]:
    """The "/"-joined path of every leaf of a nested-dict parameter tree, in flatten order."""
    return ["/".join(map(str, k)) for k in traverse_util.flatten_dict(params)]


def compile_patterns(freeze: Sequence[str]) -> list[re.Pattern[str]]:
    patterns = []
    for pattern in freeze:
        try:
            patterns.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"train.freeze: {pattern!r} is not a valid regular expression ({e})") from e
    return patterns


def is_frozen(path: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """A path is frozen when any pattern matches it (`re.search`, so anchor with ^...$ if needed)."""
    return any(p.search(path) for p in patterns)


def partition_params(params: PyTree, freeze: Sequence[str]) -> tuple[PyTree, PyTree]:
    """Splits `params` into `(trainable, frozen)` nested dicts; each leaf lands in exactly one.

    Args:
      params: nested dict of arrays (or `ShapeDtypeStruct`s).
      freeze: regexes over "/"-joined paths.
    Returns:
      Two nested dicts (possibly empty) whose union is `params`.
    Raises:
      ConfigError: a pattern matches no parameter (a typo would silently train everything).
    """
    patterns = compile_patterns(freeze)
    flat = traverse_util.flatten_dict(params, sep="/")
    for pattern in patterns:
        if not any(pattern.search(path) for path in flat):
            raise ConfigError(
                f"train.freeze: pattern {pattern.pattern!r} matches no parameter; "
                f"paths look like {next(iter(flat), '<none>')!r}"
            )
    trainable = {k: v for k, v in flat.items() if not is_frozen(k, patterns)}
    frozen = {k: v for k, v in flat.items() if is_frozen(k, patterns)}
    return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
    """The inverse of `partition_params`: one nested dict holding both subtrees."""
    flat = traverse_util.flatten_dict(trainable, sep="/")
    for key, value in traverse_util.flatten_dict(frozen, sep="/").items():
        if key in flat:
            raise ValueError(f"parameter {key!r} is both trainable and frozen")
        flat[key] = value
    return traverse_util.unflatten_dict(flat, sep="/")
