"""The JAX peers: the last Hugging Face Flax implementations, run by `build/flax-peers-venv`'s python.

transformers 4.57.x `FlaxViTForImageClassification` and diffusers 0.39.x `FlaxUNet2DConditionModel`
(both libraries removed Flax afterwards). Built by `benchmarks/setup_flax_peers.sh`; these modules
import only the standard library, `benchmarks.timing` and that environment's packages, never jaxvision.
"""
