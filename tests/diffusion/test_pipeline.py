"""Whole-pipeline parity with diffusers' `StableDiffusionPipeline` on a tiny random checkpoint,
plus compile-once behaviour and input validation."""

import diffusers
import jax
import numpy as np
import pytest
import torch
from conftest import max_rel_error

import jaxvision
from jaxvision.diffusion.pipeline import StableDiffusionPipeline
from jaxvision.testing.tiny_sd import write_tiny_sd

DIFFUSERS_SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, oil painting!"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    reference = write_tiny_sd(path)
    with jax.default_matmul_precision("highest"):
        pipe = StableDiffusionPipeline.from_pretrained(path)
    return path, reference, pipe


def _start_latents(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
@pytest.mark.parametrize(("guidance", "negative"), [(7.5, None), (7.5, ["blurry", "low quality"]), (1.0, None)])
def test_matches_diffusers(tiny_sd, scheduler, guidance, negative):
    """Same weights, prompts and start latents → final latents within 1e-4 and decoded images within
    1e-4 (fp32, highest precision) of diffusers, for DDIM / PNDM / Euler / DPM++ 2M, with and without
    negative prompts, guidance 1.0 (no CFG) and 7.5."""
    _, reference, pipe = tiny_sd
    cls, overrides = DIFFUSERS_SCHEDULERS[scheduler]
    reference.scheduler = cls.from_config(reference.scheduler.config, **overrides)
    latents = _start_latents()
    kwargs = dict(
        prompt=PROMPTS, negative_prompt=negative, num_inference_steps=5, guidance_scale=guidance, height=16, width=16
    )
    with torch.no_grad():
        ref_latents = (
            reference(**kwargs, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="latent")
            .images.numpy()
            .transpose(0, 2, 3, 1)
        )
        ref_images = reference(
            **kwargs, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="np"
        ).images
    with jax.default_matmul_precision("highest"):
        ours_latents = pipe(**kwargs, latents=latents, scheduler=scheduler, output_type="latent")
        ours_images = pipe(**kwargs, latents=latents, scheduler=scheduler, output_type="np")
    assert max_rel_error(ours_latents, ref_latents) <= 1e-4
    assert ours_images.shape == ref_images.shape == (2, 16, 16, 3)
    assert np.abs(ours_images - ref_images).max() <= 1e-4


def test_compiles_once_for_new_prompts_seeds_and_guidance(tiny_sd):
    """New prompts, seeds and guidance scales reuse the compiled sampler (no retrace)."""
    path, _, _ = tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, seed=0, output_type="np")
    assert pipe.trace_count == 1
    pipe(
        ["a dog", "a boat"],
        num_inference_steps=3,
        guidance_scale=9.0,
        seed=[7, 8],
        output_type="np",
        negative_prompt="ugly",
    )
    assert pipe.trace_count == 1
    pil = pipe(["x", "y"], num_inference_steps=3, guidance_scale=2.0, seed=3)
    assert pipe.trace_count == 1 and pil[0].size == (16, 16)


def test_seeds_are_per_image(tiny_sd):
    """Image i depends only on its own seed: the same seed gives the same image in any batch position."""
    _, _, pipe = tiny_sd
    a = pipe(["a cat", "a dog"], num_inference_steps=2, seed=[11, 12], output_type="latent", scheduler="euler_a")
    b = pipe(["a dog", "a cat"], num_inference_steps=2, seed=[12, 11], output_type="latent", scheduler="euler_a")
    np.testing.assert_array_equal(a[0], b[1])
    assert np.isfinite(a).all() and not np.allclose(a[0], a[1])


def test_bad_input(tiny_sd):
    _, _, pipe = tiny_sd
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("a", height=12, width=16)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        pipe("a", num_inference_steps=0)
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; valid names are \["):
        pipe("a", scheduler="heun")
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", output_type="tensor")


def test_missing_component_and_unknown_class(tiny_sd, tmp_path):
    """A missing component folder, or a model_index.json class jaxvision lacks, is named in the error."""
    import json
    import shutil

    path, _, _ = tiny_sd
    broken = tmp_path / "sd"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(jaxvision.ConfigError, match=r"vae: component folder missing"):
        StableDiffusionPipeline.from_pretrained(broken)
    shutil.copytree(path / "vae", broken / "vae")
    index = json.loads((broken / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(jaxvision.ConfigError, match=r"unet is diffusers\.UNet2DModel, which jaxvision does not"):
        StableDiffusionPipeline.from_pretrained(broken)


def test_generate_cli(tiny_sd, tmp_path):
    """`jaxvision generate` writes one PNG per image plus a grid, from the tiny checkpoint."""
    import subprocess
    import sys

    from PIL import Image

    path, _, _ = tiny_sd
    out = tmp_path / "gen"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxvision",
            "generate",
            "--model",
            str(path),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--scheduler",
            "ddim",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "compiles it" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (32, 16)


_EIGHT_DEVICES = """
import sys
import jax, numpy as np
from jax.sharding import Mesh
from jaxvision.diffusion.pipeline import StableDiffusionPipeline
assert jax.device_count() == 8, jax.devices()
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
kw = dict(prompt=[f"prompt {i}" for i in range(8)], num_inference_steps=3, guidance_scale=7.5, seed=5,
          output_type="np", scheduler="euler_a")
eight = pipe(**kw)
one = pipe(**kw, mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
print("MAXDIFF", float(np.abs(eight - one).max()))
three = pipe(**{**kw, "prompt": kw["prompt"][:3]})  # 3 images over 8 devices: the pipeline pads
print("PADDED", three.shape[0], float(np.abs(three - one[:3]).max()), "PROGRAMS", len(pipe._compiled))
"""


def test_eight_devices_match_one(tiny_sd, tmp_path):
    """Data-parallel sampling over 8 (fake CPU) devices gives the same images as 1 device (≤ 1e-5),
    with an ancestral scheduler, so per-image noise is checked to be independent of sharding. A
    batch of 3 on 8 devices is padded by the pipeline and returns exactly the 3 images asked for,
    equal to the same seeds' images on 1 device; each mesh gets its own compiled program, and the
    padded batch reuses the 8-device program of the full batch."""
    import os
    import subprocess
    import sys

    path, _, _ = tiny_sd
    script = tmp_path / "eight.py"
    script.write_text(_EIGHT_DEVICES)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.split("MAXDIFF")[1].split()[0])
    assert diff <= 1e-5
    count, padded_diff, _, programs = proc.stdout.split("PADDED")[1].split()
    assert int(count) == 3 and float(padded_diff) <= 1e-5
    assert int(programs) == 2  # (8 devices, batch 8: also the padded batch of 3), (1 device, batch 8)
