"""jaxvision: JAX/Flax ViT and Stable Diffusion at Hugging Face parity, with sharded training."""

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
