"""Shared test setup: CPU only, deterministic, quiet."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

# google/vit-large-patch16-384's architecture (transformers `ViTConfig` kwargs) for the full-size tests.
VIT_L16_384 = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    image_size=384,
    patch_size=16,
    num_labels=1000,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    qkv_bias=True,
)


def max_rel_error(actual, expected) -> float:
    """max |a - e| divided by max(1, max |e|): the suite's "error relative to output scale"."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / max(1.0, np.abs(expected).max()))
