"""ViT fine-tuning (or training from scratch) for image classification: `jaxvision finetune`.

    jaxvision finetune --config configs/vit/digits.yaml
    jaxvision finetune --config configs/vit/l16_384.yaml model.path=/ckpt/vit-large-patch16-384 \\
        data.train_dir=data/train data.eval_dir=data/val output_dir=runs/l16
    jaxvision finetune --config configs/vit/tfds.yaml model.path=/ckpt/vit-base-patch16-224 \\
        data.tfds_name=beans data.data_dir=~/tensorflow_datasets

Read in this order: `config` (the `FinetuneConfig` schema), `data` (class folders, TFDS or
scikit-learn's digits through grain, with a checkpointable iterator), `train` (`build_model`,
`compile_step`, `run`, `plan`). Everything around the step comes from `jaxvision.train`.
"""

from jaxvision.trainers.vit_finetune.config import FinetuneConfig, load
from jaxvision.trainers.vit_finetune.train import plan, run

__all__ = ["FinetuneConfig", "load", "plan", "run"]
