"""The embedded default of the DreamBooth demo: a tiny random Stable Diffusion in diffusers layout.

Everything is written by jaxvision's own code (`save_components`), offline and without torch: the
UNet, text encoder and VAE are the "tiny" variants of `jaxvision.models` with random weights
(their outputs are meaningless; the demo says so), the scheduler config is SD's own
(`SD_SCHEDULER_CONFIG`), and the tokenizer is a byte-level CLIP tokenizer: the 256 byte symbols,
their end-of-word forms and CLIP's two special tokens, with no merges. transformers' `CLIPTokenizer` and diffusers' pipeline
load it like any other (every word becomes one token per character), so no vocabulary download
is needed; real checkpoints ship CLIP's full 49408-token vocabulary instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxvision.diffusion.schedule import SD_SCHEDULER_CONFIG
from jaxvision.tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_byte_tokenizer(directory: str | Path) -> int:
    """Writes a merge-free CLIP tokenizer folder; returns its vocabulary size (514)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return len(vocab)


def write_tiny_sd(directory: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Writes a tiny random SD-1.x-architecture pipeline folder (32-pixel latents, 64-pixel images).

    Args:
      directory: the folder to write (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
        `tokenizer/`, `scheduler/`); an existing complete folder is left as it is.
      seed: seed of the random weights.
      prediction_type: "epsilon" or "v_prediction" (written to the scheduler config).
    Returns:
      `directory`.
    """
    from flax.core import meta

    from jaxvision.diffusion.components import StableDiffusionComponents, save_components
    from jaxvision.models import clip_text, unet, vae
    from jaxvision.tokenizer import load_tokenizer

    directory = Path(directory)
    if (directory / "model_index.json").is_file():
        return directory
    vocab_size = write_byte_tokenizer(directory / "tokenizer")
    text_cfg = clip_text.CLIPTextConfig.from_variant(
        "tiny", vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1
    )
    unet_cfg = unet.UNet2DConditionConfig.from_variant("tiny", sample_size=32)
    vae_cfg = vae.AutoencoderKLConfig.from_variant("tiny", sample_size=64)
    modules = (clip_text.build(text_cfg), unet.build(unet_cfg), vae.build(vae_cfg))
    inputs = (clip_text.example_inputs(text_cfg), unet.example_inputs(unet_cfg), vae.example_inputs(vae_cfg))
    params = []
    for key, module, example in zip(jax.random.split(jax.random.key(seed), 3), modules, inputs, strict=True):
        zeros = [jnp.zeros(x.shape, x.dtype) for x in example]
        params.append(meta.unbox(module.init(key, *zeros)["params"]))
    comps = StableDiffusionComponents(
        modules[0],
        params[0],
        modules[1],
        params[1],
        modules[2],
        params[2],
        load_tokenizer(directory / "tokenizer"),
        {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type},
        directory,
    )
    save_components(comps, directory)
    return directory


# Bundled scikit-image photos of one subject (Chelsea the cat), for the demo's instance folder.
DEMO_PHOTOS = ("chelsea.jpg", "chelsea_exif_rotated.jpg")


def prepare_demo(model_path: str | Path, instance_dir: str | Path, *, log=print) -> None:
    """Writes the tiny random model to `model_path` and the bundled subject photos to
    `instance_dir`, each only if missing (so reruns resume instead of starting over)."""
    import shutil

    model_path, instance_dir = Path(model_path), Path(instance_dir)
    if not (model_path / "model_index.json").is_file():
        write_tiny_sd(model_path)
        log(f"wrote a tiny Stable Diffusion with RANDOM weights to {model_path} (its images are noise)")
    if not instance_dir.is_dir() or not any(instance_dir.iterdir()):
        instance_dir.mkdir(parents=True, exist_ok=True)
        assets = Path(__file__).resolve().parents[1] / "assets"
        for name in DEMO_PHOTOS:
            shutil.copy(assets / name, instance_dir / name)
        log(f"copied the bundled photos {', '.join(DEMO_PHOTOS)} (scikit-image, CC0) to {instance_dir}")
