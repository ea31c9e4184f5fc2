"""Prompt tokenisation for the CLIP text encoder, exactly as diffusers' Stable Diffusion pipelines do it.

The BPE itself is transformers' `CLIPTokenizer` read from a checkpoint's `tokenizer/` folder;
jaxvision only checks the folder and fixes the call (pad to `model_max_length` with the
tokenizer's pad token, truncate, keep `<|endoftext|>` last), returning numpy ids for `jit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvision.errors import ConfigError

# Files a Stable Diffusion `tokenizer/` folder ships. `tokenizer.json` alone may stand in for the
# vocabulary and merges (fast-tokenizer exports); tokenizer_config.json carries model_max_length.
VOCAB_FILES = ("vocab.json", "merges.txt")
CONFIG_FILE = "tokenizer_config.json"
FAST_FILE = "tokenizer.json"
# transformers' placeholder when no model_max_length was saved (VERY_LARGE_INTEGER).
_UNSET_MAX_LENGTH = 10**20


def load_tokenizer(path: str | Path) -> Any:
    """Loads transformers' `CLIPTokenizer` from a local folder, offline.

    Args:
      path: the `tokenizer/` folder of a diffusers checkpoint (or a folder holding the same files).
    Returns:
      A `transformers.CLIPTokenizer`.
    Raises:
      ConfigError: the folder is missing, or a file it needs is absent (the message names it).
    """
    from transformers import CLIPTokenizer  # heavy import, only when tokenising

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"{path}: tokenizer folder not found; a Stable Diffusion checkpoint keeps it in tokenizer/ "
            f"({', '.join((*VOCAB_FILES, CONFIG_FILE))})"
        )
    needed = [CONFIG_FILE] + ([] if (path / FAST_FILE).is_file() else list(VOCAB_FILES))
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ConfigError(
            f"{path}: incomplete tokenizer folder, missing {', '.join(missing)}; "
            "copy the tokenizer/ folder of the original checkpoint"
        )
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: could not load a CLIP tokenizer ({e})") from None


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids as `StableDiffusionPipeline` makes them for its text encoder.

    Equivalent to `tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
    truncation=True).input_ids`: `<|startoftext|>`, the prompt's tokens (cut so that
    `<|endoftext|>` still fits), `<|endoftext|>`, then the tokenizer's pad token (SD 1.x pads with
    `<|endoftext|>`, SD 2.x with "!").

    Args:
      tokenizer: a `CLIPTokenizer` (see `load_tokenizer`).
      prompts: one prompt or a list; "" is a valid (unconditional) prompt.
      max_length: tokens per row; default `tokenizer.model_max_length` (77 for every SD release).
    Returns:
      `[batch, max_length]` int32.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length >= _UNSET_MAX_LENGTH:
            raise ConfigError(
                "the tokenizer has no model_max_length (its tokenizer_config.json lacks it); "
                "pass max_length=77 or restore the checkpoint's tokenizer_config.json"
            )
    if not prompts:  # transformers cannot tokenise an empty batch
        return np.zeros((0, max_length), np.int32)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32).reshape(len(prompts), max_length)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters.

    Its values, in order, are the first 256 entries of CLIP's vocabulary (the byte symbols).
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
