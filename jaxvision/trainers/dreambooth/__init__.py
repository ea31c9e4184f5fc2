"""DreamBooth fine-tuning of Stable Diffusion (Ruiz et al., 2022): `jaxvision dreambooth`.

    jaxvision dreambooth --config configs/dreambooth/sd15.yaml model.path=SD_DIR \\
        data.instance_dir=photos/ data.instance_prompt="a photo of sks dog" data.class_prompt="a photo of a dog"

A trainer package holds its config, data, loss and `run`; everything around the step (mesh,
sharded state, checkpoints, tracking, atomic export) comes from the training core,
`jaxvision.train`. Read it in this order:

- `config`: the run-config schema (`DreamBoothConfig`) and `load(path, overrides)`.
- `data`: instance / class image folders, deterministic batches of `(seed, step)`, class-image
  generation with the jitted sampler (cached with a manifest).
- `cache`: optional VAE-latent and text-embedding caches.
- `loss`: the DreamBooth objective (`dreambooth_loss`, `make_loss_fn`).
- `train`: `build_networks` (one construction path for `run` and `plan`), `compile_step`,
  `run` (mesh, model, data, step, restore, loop, export) and `plan` (the memory plan).
- `outputs`: validation grids and the diffusers export.
"""

from jaxvision.trainers.dreambooth.config import DreamBoothConfig, load
from jaxvision.trainers.dreambooth.train import plan, run

__all__ = ["DreamBoothConfig", "load", "plan", "run"]
