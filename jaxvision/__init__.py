"""jaxvision: JAX/Flax ViT and Stable Diffusion at Hugging Face parity, with sharded training.

The reading order of the package, outside in:

- `from_pretrained` / `save_pretrained` (`pretrained.py`) load and write Hugging Face folders:
  `models/` holds the Flax modules (one frozen config dataclass each; which attention and conv
  kernels run is a module field, `models/kernels.py`, chosen by the caller for its devices) and
  `weights/` the file formats and one declarative key table per model, applied strictly.
- `StableDiffusionPipeline` (`diffusion/`) samples with the whole denoising loop in one jit, over
  schedulers that are pure functions of their state.
- `train/` is the training core: mesh and sharding rules, train state and optimizers, the jitted
  step, Orbax checkpoints, tracking, typed configs, memory plans, and the run scaffold
  (`train/run.py`) every trainer composes. It never imports a trainer.
- `trainers/` holds one package per trainer (`dreambooth/`, `vit_finetune/`), each its config,
  data, loss and `run`, registered in `trainers.TRAINERS`, which the command line (`cli.py`,
  thin) reads.
- `image.py`, `tokenizer.py`, `inference.py`, `quantize.py`, `export/` serve the above;
  `demo/` writes the embedded default of `make demo`; `testing/` writes reference checkpoints
  with the PyTorch libraries for the tests and benchmarks.
"""

from jaxvision.diffusion.pipeline import StableDiffusionPipeline
from jaxvision.errors import ConfigError, ImageDecodeError, JaxVisionError, WeightLoadError
from jaxvision.inference import classify, embed
from jaxvision.pretrained import from_pretrained, save_pretrained

__all__ = [
    "ConfigError",
    "ImageDecodeError",
    "JaxVisionError",
    "StableDiffusionPipeline",
    "WeightLoadError",
    "classify",
    "embed",
    "from_pretrained",
    "save_pretrained",
]
__version__ = "0.1.0"
