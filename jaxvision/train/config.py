"""Run configs: typed frozen dataclass schemas, YAML files that override a base, dotted CLI overrides.

The schema (a frozen, nested dataclass such as a trainer's `DreamBoothConfig`) is the source of
truth: it names every key, its type and its default. A run's values come from three layers,
merged in this order through OmegaConf structured configs, so unknown keys and wrong types fail:

1. the schema defaults (a field without a default is required, like OmegaConf's `???`);
2. the YAML file given with `--config`, after the chain of files it extends: a file whose
   top-level `base:` key names another YAML file (a path relative to the file that says it, or
   absolute) is merged on top of that file, recursively, so a variant states only what differs::

       # configs/dreambooth/sd15_dog.yaml
       # jaxvision dreambooth --config configs/dreambooth/sd15_dog.yaml
       base: base.yaml            # configs/dreambooth/base.yaml
       data:
         instance_dir: data/dog
       train:
         max_steps: 400

   Mappings merge key by key; lists and scalars replace the base value;
3. dotted `key=value` overrides from the command line (`train.max_steps=800`,
   `train.freeze=[embeddings, 'encoder\\.layer\\.[0-5]\\.']`), each value parsed as YAML.

Every error is a `ConfigError` whose message names the key and where its value came from (the YAML
file, or `command line: key=value`). Sections validate their values in `__post_init__` with
`require`, so a bad value is caught both here and when a schema is built directly in Python.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf, SCMode
from omegaconf.errors import OmegaConfBaseException

from jaxvision.errors import ConfigError
from jaxvision.models import kernels
from jaxvision.models.layers import REMAT_POLICIES
from jaxvision.train.checkpoints import CheckpointConfig
from jaxvision.train.mesh import MeshConfig

T = TypeVar("T")

BASE_KEY = "base"
CONFIG_FILENAME = "config.yaml"
DTYPES = ("float32", "bfloat16", "float16")
WANDB_MODES = ("offline", "online", "disabled")


class FieldError(ConfigError):
    """A field of one section has an invalid value; `load_config` adds the section path and source."""

    def __init__(self, field: str, value: Any, requirement: str):
        super().__init__(f"{field}={value!r}: {requirement}")
        self.field = field
        self.value = value
        self.requirement = requirement


def require(ok: bool, field: str, value: Any, requirement: str) -> None:
    """Raises `FieldError` unless `ok`; for use in schema `__post_init__` methods.

    Args:
      ok: whether the value is valid.
      field: the field name inside its section (`"max_steps"`); `load_config` prefixes the section.
      value: the offending value, shown in the message.
      requirement: what a valid value looks like, e.g. `"must be >= 1"`.
    """
    if not ok:
        raise FieldError(field, value, requirement)


def check_attention_impl(value: str | None) -> None:
    """Raises `FieldError` for `attention_impl` values the attention seam does not know."""
    impls = ", ".join(kernels.ATTENTION_IMPLS)
    ok = value is None or value in kernels.ATTENTION_IMPLS
    require(ok, "attention_impl", value, f"choose one of {impls}, or null (JAX chooses)")


# ----------------------------------------------------------------------------- generic sections

# The mesh and checkpoint sections are their modules' own configs, so the two can never disagree.
MeshSection = MeshConfig
CheckpointSection = CheckpointConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Which pretrained model a run starts from.

    Attributes:
      path: a local Hugging Face / diffusers directory (required; nothing is downloaded).
      param_dtype: storage dtype of the trainable parameters (one of `DTYPES`).
      attention_impl: the attention kernel (`jaxvision.models.kernels`): "auto" chooses for the
        devices the step runs on; None lets JAX choose.
    """

    path: str
    param_dtype: str = "float32"
    attention_impl: str | None = "auto"

    def __post_init__(self):
        require(bool(self.path), "path", self.path, "give the local model directory")
        require(self.param_dtype in DTYPES, "param_dtype", self.param_dtype, f"choose one of {', '.join(DTYPES)}")
        check_attention_impl(self.attention_impl)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection:
    """Optimization settings shared by all trainers.

    Attributes:
      max_steps: total optimizer steps; rerunning with a larger value resumes and continues.
      batch_size: global batch size (all devices, all processes, all accumulation micro-steps).
      learning_rate: peak learning rate.
      seed: seed for init, noise and data order.
      optimizer: optimizer name, interpreted by the trainer's optimizer builder (e.g. "adamw").
      schedule: learning-rate schedule name (e.g. "constant", "cosine").
      warmup_steps: linear warmup steps before the schedule.
      weight_decay: decoupled weight decay.
      clip_norm: global gradient-norm clip; None turns clipping off.
      adam_mu_dtype: storage dtype of AdamW's first moment ("bfloat16" halves it; the second moment
        stays fp32); None keeps the parameters' dtype.
      grad_accum_steps: micro-batches accumulated per optimizer step; must divide batch_size.
      dtype: compute dtype of forward and backward passes (one of `DTYPES`).
      remat_policy: rematerialization policy per block (one of `layers.REMAT_POLICIES`).
      freeze: regexes over "/"-joined parameter paths; matching parameters are not trained.
    """

    max_steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    optimizer: str = "adamw"
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    adam_mu_dtype: str | None = None
    grad_accum_steps: int = 1
    dtype: str = "float32"
    remat_policy: str = "none"
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.learning_rate >= 0, "learning_rate", self.learning_rate, "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.clip_norm is None or self.clip_norm > 0, "clip_norm", self.clip_norm, "must be > 0, or null")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        require(
            self.adam_mu_dtype in (None, "float32", "bfloat16"),
            "adam_mu_dtype",
            self.adam_mu_dtype,
            "choose float32 or bfloat16, or null (the parameters' dtype)",
        )
        require(
            self.batch_size % self.grad_accum_steps == 0,
            "grad_accum_steps",
            self.grad_accum_steps,
            f"must divide train.batch_size={self.batch_size}",
        )
        require(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")
        require(
            self.remat_policy in REMAT_POLICIES,
            "remat_policy",
            self.remat_policy,
            f"choose one of {', '.join(REMAT_POLICIES)}",
        )
        for pattern in self.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise FieldError("freeze", pattern, f"not a valid regular expression ({e})") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogSection:
    """Metrics logging: `metrics.jsonl` always, TensorBoard and Weights & Biases optionally."""

    every_steps: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "jaxvision"
    wandb_mode: str = "offline"

    def __post_init__(self):
        require(self.every_steps >= 1, "every_steps", self.every_steps, "must be >= 1")
        require(
            self.wandb_mode in WANDB_MODES, "wandb_mode", self.wandb_mode, f"choose one of {', '.join(WANDB_MODES)}"
        )


# ----------------------------------------------------------------------------- loading


def load_config(schema_cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Builds a run config from the schema defaults, a YAML file (and its `base:` chain) and CLI overrides.

    Args:
      schema_cls: a frozen dataclass type whose fields may be nested dataclass sections. A field
        without a default is required; a section with required fields is declared without a
        default (`train: TrainSection`), one whose fields all have defaults with
        `field(default_factory=LogSection)`.
      path: the YAML config file, or None to use only the defaults and overrides.
      overrides: dotted `key=value` strings; each value is parsed as YAML (`3`, `1e-4`, `[a, b]`, `null`).

    Returns:
      An instance of `schema_cls`, nested sections built as their dataclasses.

    Raises:
      ConfigError: on an unreadable or invalid YAML file, an unknown key, a value of the wrong
        type, a missing required value or a value its section rejects; the message names the key
        and the file or command-line argument it came from.
    """
    if not (isinstance(schema_cls, type) and dataclasses.is_dataclass(schema_cls)):
        raise TypeError(f"schema_cls must be a dataclass type, got {schema_cls!r}")
    try:
        merged = OmegaConf.structured(schema_cls)
    except OmegaConfBaseException as e:
        raise TypeError(f"{schema_cls.__name__} is not a valid structured-config schema: {e}") from None
    if any(f.name == BASE_KEY for f in dataclasses.fields(schema_cls)):
        raise TypeError(f"{schema_cls.__name__} may not have a field named {BASE_KEY!r}; it names the base file")
    # Sections declared without a default (`train: TrainSection`) start as one missing value;
    # expanding them lets unknown keys be checked and a missing value be named down to its leaf.
    merged = OmegaConf.merge(merged, _skeleton(schema_cls))

    sources: list[tuple[str, dict]] = []
    if path is not None:
        sources.extend(_read_chain(Path(path), ()))
    sources.extend(_parse_override(arg) for arg in overrides)

    provenance: dict[str, str] = {}
    for source, data in sources:
        _check_keys(merged, data, "", source, provenance)
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: invalid value for '{e.full_key or '?'}': {_first_line(e)}") from None

    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        examples = ", ".join(f"{key}=..." for key in missing)
        raise ConfigError(
            f"missing required config value(s) {', '.join(repr(k) for k in missing)} of {schema_cls.__name__}"
            f"{_sources_note(sources)}; set them in the config file or on the command line ({examples})"
        )
    try:
        plain = OmegaConf.to_container(merged, resolve=True, structured_config_mode=SCMode.DICT)
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        raise ConfigError(f"{provenance.get(key, 'config')}: cannot resolve '{key}': {_first_line(e)}") from None
    return _build(schema_cls, plain, "", provenance)


def _skeleton(cls: type) -> dict:
    """`{section: {subsection: {}}}` for every dataclass-typed field, recursively."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _skeleton(hints[f.name])
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


def _read_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[str, dict]]:
    """Reads `path` and the files its `base:` key names, base first; each entry is (source, mapping)."""
    resolved = path.expanduser().resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{seen[-1]}: '{BASE_KEY}' makes a cycle: {chain}; remove one of the '{BASE_KEY}:' keys")
    where = f" (named by '{BASE_KEY}:' in {seen[-1]})" if seen else ""
    try:
        text = resolved.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found{where}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}{where}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{resolved}{at}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{resolved}: a config file must be a mapping of keys, got {type(data).__name__}")

    chain: list[tuple[str, dict]] = []
    if BASE_KEY in data:
        base = data.pop(BASE_KEY)
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{resolved}: '{BASE_KEY}' must be the path of another YAML file, got {base!r}")
        base_path = Path(base).expanduser()
        if not base_path.is_absolute():
            base_path = resolved.parent / base_path
        chain.extend(_read_chain(base_path, (*seen, resolved)))
    chain.append((str(resolved), data))
    return chain


def _parse_override(arg: str) -> tuple[str, dict]:
    """Turns `"a.b=value"` into `("command line: a.b=value", {"a": {"b": parsed}})`."""
    source = f"command line: {arg}"
    key, sep, text = arg.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: overrides are dotted key=value pairs, e.g. train.max_steps=1000")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote it") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return source, value


def _check_keys(node: DictConfig, data: Mapping, prefix: str, source: str, provenance: dict[str, str]) -> None:
    """Rejects keys the schema lacks (OmegaConf's own message would not say which file) and records sources."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{source}: config keys must be strings, got {key!r} under '{prefix[:-1] or '<top>'}'")
        known = [str(k) for k in node]  # not `key in node`: that is False for a missing (`???`) value
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            section = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"{source}: unknown config key '{full}'{hint} (keys of {section}: {', '.join(known)})")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and _is_section(child):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{full}' is a section; give a mapping of its keys, not {value!r}")
            _check_keys(child, value, f"{full}.", source, provenance)
        else:
            provenance[full] = source


def _is_section(node: DictConfig) -> bool:
    """True for nodes built from a dataclass (fixed keys), False for free-form dict fields."""
    object_type = OmegaConf.get_type(node)
    return object_type is not None and dataclasses.is_dataclass(object_type)


def _build(cls: type[T], data: dict, prefix: str, provenance: dict[str, str]) -> T:
    """Instantiates `cls` (and nested sections) from plain data, naming the source of a rejected value."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, f"{prefix}{f.name}.", provenance)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except FieldError as e:
        key = f"{prefix}{e.field}"
        source = provenance.get(key, f"the default of {cls.__name__}")
        raise ConfigError(f"{source}: invalid value {key}={e.value!r}: {e.requirement}") from None
    except ConfigError as e:
        # A section validating several fields together (e.g. the mesh): name every source involved.
        involved = sorted({s for k, s in provenance.items() if k.startswith(prefix)})
        where = f" (values from {'; '.join(involved)})" if involved else ""
        raise ConfigError(f"section '{prefix[:-1] or '<top>'}': {e}{where}") from None


def _first_line(e: OmegaConfBaseException) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.splitlines()[0] if msg else type(e).__name__


def _sources_note(sources: list[tuple[str, dict]]) -> str:
    files = [s for s, _ in sources if not s.startswith("command line:")]
    return f" (not set by {', '.join(files)} or the command line)" if files else ""


# ----------------------------------------------------------------------------- writing


def to_dict(cfg: Any) -> Any:
    """The config as plain data: dataclasses to dicts in field order, tuples to lists (what YAML,
    JSON and W&B take). Plain data passes through unchanged."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def to_yaml(cfg: Any) -> str:
    """The config (a dataclass, or `to_dict`'s plain data) as YAML, fields in schema order;
    `load_config` reads it back to an equal config."""
    if not (isinstance(cfg, Mapping) or (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type))):
        raise TypeError(f"to_yaml expects a config dataclass instance, got {type(cfg).__name__}")
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def format_config(cfg: Any, data: Mapping | None = None) -> str:
    """A readable block for trainers to print at start-up: the schema name, then the resolved YAML
    (of `data`, `to_dict(cfg)` when it is already at hand)."""
    body = "".join(f"  {line}\n" for line in to_yaml(cfg if data is None else data).splitlines())
    return f"{type(cfg).__name__} (resolved):\n{body}"


def save_resolved(cfg: Any, output_dir: str | os.PathLike, data: Mapping | None = None) -> Path:
    """Writes `output_dir/config.yaml`, the resolved config, on process 0 only.

    The file is complete on its own (no `base:`), so `--config output_dir/config.yaml` reruns the
    same run. It is written to a temporary name and renamed, so a crash never leaves half a file.

    Args:
      cfg: the config dataclass (its type names the schema in the header).
      output_dir: the run directory.
      data: `to_dict(cfg)`, when the caller has it already.
    Returns:
      The path of `config.yaml` (also on processes that do not write it).
    """
    import jax  # a config can be read without initializing a JAX backend

    path = Path(output_dir) / CONFIG_FILENAME
    if jax.process_index() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved {type(cfg).__name__}, written by jaxvision; rerun with --config {path}\n"
    tmp = path.with_name(f".{CONFIG_FILENAME}.tmp")
    tmp.write_text(header + to_yaml(cfg if data is None else data))
    os.replace(tmp, path)
    return path
