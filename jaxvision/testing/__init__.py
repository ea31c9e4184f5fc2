"""Reference checkpoints and tokenizer folders, written offline by the reference libraries.

For the test suite and the benchmarks: `tiny_sd.write_tiny_sd` (a tiny random Stable Diffusion
folder saved by diffusers' own `save_pretrained`) and `clip_tokenizer.write_clip_tokenizer` (a
CLIP tokenizer folder built from OpenCLIP's BPE file). These import torch, diffusers,
transformers and open-clip's vocabulary, so they need the `test` extra; nothing here is imported
by the library itself.
"""
