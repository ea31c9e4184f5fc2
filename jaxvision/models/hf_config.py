"""Reading Hugging Face `config.json` dictionaries strictly.

A model config consumes the keys that define its architecture; the generic bookkeeping keys
that transformers and diffusers write into every config are accepted and ignored; anything
else is an error that names the key and the file, because silently ignoring e.g. a
`position_embedding_type` would load weights into the wrong architecture.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jaxvision.errors import ConfigError

# Keys every transformers PretrainedConfig writes (old and new releases), none architectural.
TRANSFORMERS_GENERIC_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation_autoset",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "model_type",
        "id2label",
        "label2id",
        "problem_type",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "use_return_dict",
        "torchscript",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "pruned_heads",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "cross_attention_hidden_size",
        "tf_legacy_loss",
        "use_bfloat16",
        "bos_token_id",
        "pad_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "num_labels",
        "use_cache",
    }
)
# Written as `_diffusers_version`; diffusers only records it: the release jaxvision is tested with.
DIFFUSERS_VERSION = "0.42.1"
# Keys diffusers writes into every component config.
DIFFUSERS_GENERIC_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """Reads `directory/config.json`, with errors that say what is wrong and what to do."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: not a directory; pass a local Hugging Face model folder")
    if not path.exists():
        raise ConfigError(f"{path}: missing; a model folder needs the config.json it was saved with")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); restore the file from the original checkpoint") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return cfg


def take(
    cfg: Mapping[str, Any],
    fields: Iterable[str],
    *,
    source: str,
    generic: frozenset[str] = TRANSFORMERS_GENERIC_KEYS,
) -> dict[str, Any]:
    """The entries of `cfg` named in `fields`; raises on keys that are neither fields nor generic."""
    fields = set(fields)
    unknown = sorted(k for k in cfg if k not in fields and k not in generic)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config key(s) {unknown}: jaxvision does not implement what they configure. "
            f"Remove them if they are inert, or use a checkpoint of a supported architecture."
        )
    return {k: cfg[k] for k in fields if k in cfg}


def diffusers_config_dict(config: Any, class_name: str) -> dict[str, Any]:
    """A frozen config dataclass as a diffusers `config.json` dict (tuples become lists)."""
    import dataclasses

    out: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def pair(value: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))
