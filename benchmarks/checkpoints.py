"""Random-weight reference checkpoints for the benchmarks, written once by the reference libraries.

`python -m benchmarks.checkpoints vit-l16-384 sd15 tiny-sd` writes what is missing under
`build/bench-cache/` (transformers' / diffusers' own `save_pretrained`, safetensors); every
benchmark process then loads the same files, torch with `from_pretrained` and jaxvision with
`jaxvision.from_pretrained`, so both run the identical network. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from benchmarks.timing import CACHE_DIR, log

DONE = ".complete"  # written last: a directory without it is a partial write and is rebuilt


def _write_once(name: str, write) -> Path:
    directory = CACHE_DIR / name
    if (directory / DONE).is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log(f"writing random-weight checkpoint {directory} ...")
    write(directory)
    (directory / DONE).write_text("ok\n")
    return directory


def vit_l16_384() -> Path:
    """google/vit-large-patch16-384's architecture (1000 ImageNet classes), random weights."""

    def write(directory: Path) -> None:
        import torch
        import transformers

        from jaxvision.models.vit import VARIANTS

        width, depth, heads, mlp, patch = VARIANTS["L/16"]
        torch.manual_seed(0)
        config = transformers.ViTConfig(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp,
            patch_size=patch,
            image_size=384,
            num_labels=1000,
        )
        transformers.ViTForImageClassification(config).save_pretrained(directory, safe_serialization=True)

    return _write_once("vit-l16-384", write)


def sd15() -> Path:
    """Stable Diffusion 1.5's UNet / VAE / CLIP-L text encoder configs in diffusers layout, random weights."""

    def write(directory: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.sampling import write_sd15

        write_sd15(directory)

    return _write_once("sd15", write)


def tiny_sd() -> Path:
    """The test suite's tiny SD1-style pipeline (for smoke runs; its timings say nothing about SD)."""

    def write(directory: Path) -> None:
        from jaxvision.testing.tiny_sd import write_tiny_sd

        write_tiny_sd(directory)

    return _write_once("tiny-sd", write)


CHECKPOINTS = {"vit-l16-384": vit_l16_384, "sd15": sd15, "tiny-sd": tiny_sd}


def path_of(name: str) -> Path:
    """The cached checkpoint directory of `name` (written first if missing)."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown benchmark checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", choices=list(CHECKPOINTS))
    for name in p.parse_args(argv).names:
        print(path_of(name))


if __name__ == "__main__":
    main()
