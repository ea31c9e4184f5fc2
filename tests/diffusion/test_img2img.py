"""Image-to-image: each scheduler's `add_noise_at` / `set_begin_index` against diffusers' img2img
recipe, whole-pipeline parity with diffusers' `StableDiffusionImg2ImgPipeline` on a tiny random
checkpoint, input validation and compile-once behaviour.

RNG: diffusers draws the img2img noise (and the VAE posterior sample) from a torch generator.
The parity tests remove that difference by handing diffusers the very arrays jaxvision uses:
`randn_tensor` in the img2img pipeline module (the start noise) and in diffusers' VAE module (the
posterior sample) is monkeypatched to return them.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_error
from diffusers.models.autoencoders import vae as diffusers_vae
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as diffusers_img2img
from PIL import Image

from jaxvision.diffusion import make_scheduler
from jaxvision.diffusion.pipeline import (
    LATENTS,
    PIXELS,
    START_NOISE,
    VAE_SAMPLE,
    StableDiffusionPipeline,
    _init_images,
)
from jaxvision.testing.tiny_sd import SD15_SCHEDULER, write_tiny_sd

DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DIFFUSERS_SCHEDULERS = {
    "ddpm": (diffusers.DDPMScheduler, {}),
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, DPMPP),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**DPMPP, "use_karras_sigmas": True}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
}
DETERMINISTIC = ("ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras", "lms")
SHAPE = (2, 8, 8, 4)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, oil painting!"]


def _schedulers(name: str):
    """The diffusers scheduler as a pipeline builds it from the SD 1.5 config, and ours from its config."""
    cls, overrides = DIFFUSERS_SCHEDULERS[name]
    reference = cls.from_config(diffusers.PNDMScheduler.from_config(SD15_SCHEDULER).config, **overrides)
    return reference, make_scheduler(name, reference.config)


def _t_start(steps: int, strength: float) -> int:
    """diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps`."""
    return max(steps - min(int(steps * strength), steps), 0)


def _reference_start(reference, steps: int, strength: float):
    """set_timesteps + set_begin_index as diffusers' img2img pipeline calls them; returns the begin index."""
    reference.set_timesteps(steps)
    begin = _t_start(steps, strength) * reference.order
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(begin)
    return begin


@pytest.mark.parametrize("name", sorted(DIFFUSERS_SCHEDULERS))
@pytest.mark.parametrize("steps", [10, 7])
def test_add_noise_at_matches_diffusers(name, steps):
    """`add_noise_at(state, x, noise, begin)` equals diffusers' `add_noise(x, noise, timesteps[begin:][:1])`
    after `set_timesteps` + `set_begin_index`, for strengths 0.3 / 0.5 / 0.75 / 1.0 (relative error
    <= 1e-6), and `order` matches diffusers' (PNDM's is 1: its repeated timestep is sliced at t_start)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    for strength in (0.3, 0.5, 0.75, 1.0):
        reference, ours = _schedulers(name)
        assert ours.order == reference.order
        begin = _reference_start(reference, steps, strength)
        t = reference.timesteps[begin:][:1].repeat(SHAPE[0])
        nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))  # noqa: E731
        expected = reference.add_noise(nchw(x), nchw(noise), t).numpy().transpose(0, 2, 3, 1)
        state = ours.set_begin_index(ours.set_timesteps(steps, SHAPE), begin)
        np.testing.assert_array_equal(np.asarray(state.timesteps), reference.timesteps.numpy().astype(np.float32))
        got = ours.add_noise_at(state, jnp.asarray(x), jnp.asarray(noise), begin)
        assert max_rel_error(got, expected) <= 1e-6, (name, strength)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_steps_from_begin_index_match_diffusers(name):
    """Stepping from the img2img begin index matches diffusers step by step (relative error <= 1e-5):
    PNDM's counter-relative Euler start and Heun restart, DPM++'s first-order first step and LMS's
    order ramp are all measured from the first step run, as in diffusers."""
    steps = 8
    rng = np.random.default_rng(1)
    for strength in (0.4, 0.75, 1.0):
        reference, ours = _schedulers(name)
        begin = _reference_start(reference, steps, strength)
        state = ours.set_begin_index(ours.set_timesteps(steps, SHAPE), begin)
        x = rng.standard_normal(SHAPE).astype(np.float32)
        x_ref = torch.from_numpy(x.transpose(0, 3, 1, 2))
        for i in range(begin, int(state.timesteps.shape[0])):
            out = rng.standard_normal(SHAPE).astype(np.float32)
            t = reference.timesteps[i]
            ref_in = reference.scale_model_input(x_ref, t).numpy().transpose(0, 2, 3, 1)
            assert max_rel_error(ours.scale_model_input(state, jnp.asarray(x), i), ref_in) <= 1e-5
            x_ref = reference.step(torch.from_numpy(out.transpose(0, 3, 1, 2)), t, x_ref).prev_sample
            x, state = ours.step(state, jnp.asarray(out), i, jnp.asarray(x))
            err = max_rel_error(x, x_ref.numpy().transpose(0, 2, 3, 1))
            assert err <= 1e-5, (name, strength, i, err)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-img2img")
    write_tiny_sd(path)
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(path)
    reference.set_progress_bar_config(disable=True)
    with jax.default_matmul_precision("highest"):
        pipe = StableDiffusionPipeline.from_pretrained(path)
    return path, reference, pipe


def _feed(monkeypatch, module, arrays_nhwc):
    """Makes `module.randn_tensor` return the given NHWC arrays (as NCHW torch), in order."""
    queue = [torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))) for a in arrays_nhwc]

    def randn_tensor(shape, **kwargs):
        out = queue.pop(0)
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_matches_diffusers_from_latents(tiny_sd, monkeypatch, scheduler, strength, guidance):
    """Same weights, prompts, init latents (diffusers takes a 4-channel `image` as init latents) and
    start noise → final latents within 1e-4 relative (fp32, highest precision) of diffusers'
    `StableDiffusionImg2ImgPipeline`, for DDIM / PNDM / Euler / DPM++ 2M, strengths 0.3 / 0.75 / 1.0,
    guidance 7.5 and 1.0 (no CFG); 5 steps, so strength 0.3 runs 1 step (PNDM: 2)."""
    _, reference, pipe = tiny_sd
    cls, overrides = DIFFUSERS_SCHEDULERS[scheduler]
    reference.scheduler = cls.from_config(reference.scheduler.config, **overrides)
    rng = np.random.default_rng(2)
    init = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=5, guidance_scale=guidance, strength=strength)
    _feed(monkeypatch, diffusers_img2img, [noise])
    with torch.no_grad():
        expected = reference(**kwargs, image=torch.from_numpy(init.transpose(0, 3, 1, 2)), output_type="latent")
    expected = expected.images.numpy().transpose(0, 2, 3, 1)
    with jax.default_matmul_precision("highest"):
        got = pipe(**kwargs, image=init, latents=noise, scheduler=scheduler, output_type="latent")
    assert max_rel_error(got, expected) <= 1e-4


def test_matches_diffusers_from_pil(tiny_sd, monkeypatch):
    """The whole pixel path — PIL → [-1, 1], VAE encode, per-image posterior sample × scaling factor,
    noising, the loop and VAE decoding — matches diffusers' img2img from the same PIL images when
    diffusers is handed the posterior draws and start noise jaxvision derives from the seeds:
    final latents within 1e-4 relative, decoded images within 1e-4 absolute (PNDM, strength 0.75)."""
    _, reference, pipe = tiny_sd
    reference.scheduler = diffusers.PNDMScheduler.from_config(reference.scheduler.config)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in PROMPTS]
    seeds = [5, 9]
    keys = [jax.random.key(s) for s in seeds]
    posterior_eps = np.stack([jax.random.normal(jax.random.fold_in(k, VAE_SAMPLE), (8, 12, 4)) for k in keys])
    start_noise = np.stack([jax.random.normal(jax.random.fold_in(k, START_NOISE), (8, 12, 4)) for k in keys])
    kwargs = dict(prompt=PROMPTS, image=images, num_inference_steps=5, guidance_scale=7.5, strength=0.75)
    results = {}
    for output_type in ("latent", "np"):
        _feed(monkeypatch, diffusers_vae, list(posterior_eps[:, None]))  # one encode per image
        _feed(monkeypatch, diffusers_img2img, [start_noise])
        generators = [torch.Generator().manual_seed(s) for s in seeds]  # makes diffusers encode per image
        with torch.no_grad():
            out = reference(**kwargs, generator=generators, output_type=output_type).images
        results[output_type] = out.numpy().transpose(0, 2, 3, 1) if output_type == "latent" else out
    with jax.default_matmul_precision("highest"):
        latents = pipe(**kwargs, seed=seeds, scheduler="pndm", output_type="latent")
        decoded = pipe(**kwargs, seed=seeds, scheduler="pndm", output_type="np")
    assert max_rel_error(latents, results["latent"]) <= 1e-4
    assert decoded.shape == results["np"].shape == (2, 16, 24, 3)
    assert np.abs(decoded - results["np"]).max() <= 1e-4


def test_end_to_end_pil(tiny_sd):
    """A PIL image of any size and mode is converted to RGB, resized down to a multiple of 8 and
    gives finite images of that size; one image serves several prompts (the same configuration as
    `test_matches_diffusers_from_pil`, so it reuses that compile)."""
    _, _, pipe = tiny_sd
    im = Image.fromarray(np.random.default_rng(4).integers(0, 256, (21, 29, 3), dtype=np.uint8)).convert("RGBA")
    kwargs = dict(image=im, strength=0.75, num_inference_steps=5, scheduler="pndm")
    with jax.default_matmul_precision("highest"):
        pil = pipe(PROMPTS, **kwargs)
    assert len(pil) == 2 and all(p.size == (24, 16) for p in pil)
    out = np.stack([np.asarray(p) for p in pil])
    assert np.isfinite(out).all() and not np.array_equal(out[0], out[1])  # different prompts and seeds


def test_init_image_sizes():
    """PIL images go to (width, height) when given, else to their size rounded down to a multiple of 8;
    arrays are normalised to [-1, 1]; 4-channel arrays are init latents, used as they are."""
    im = Image.new("RGB", (35, 21), (255, 0, 0))
    mode, x = _init_images([im, im], None, None, 2, 4)
    assert mode == PIXELS and x.shape == (2, 16, 32, 3)
    np.testing.assert_allclose(x[0, 0, 0], [1.0, -1.0, -1.0])
    mode, x = _init_images(im, 24, 16, 2, 4)
    assert mode == PIXELS and x.shape == (1, 24, 16, 3)
    mode, x = _init_images(np.full((16, 8, 3), 0.25, np.float32), None, None, 2, 4)
    assert mode == PIXELS and x.shape == (1, 16, 8, 3) and np.allclose(x, -0.5)
    latents = np.random.default_rng(0).standard_normal((2, 8, 4, 4)).astype(np.float32)
    mode, x = _init_images(latents, None, None, 2, 4)
    assert mode == LATENTS and np.array_equal(x, latents)


def test_bad_input(tiny_sd):
    """Out-of-range strength, a strength that leaves no step, and malformed images are named errors."""
    _, _, pipe = tiny_sd
    arr = np.zeros((16, 16, 3), np.float32)
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            pipe("a", image=arr, strength=strength)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        pipe("a", image=arr, strength=0.1, num_inference_steps=5)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe("a", image=np.zeros((12, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        pipe("a", image=np.full((16, 16, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="got shape"):
        pipe("a", image=np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="3 init images for 2 prompts"):
        pipe(["a", "b"], image=np.zeros((3, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("a", image=arr, latents=np.zeros((1, 4, 4, 4), np.float32))


def test_compiles_once_and_seeds_are_per_image(tiny_sd):
    """For a fixed start step, new init images (one per prompt, or one for all), prompts, seeds,
    guidance scales and strengths with the same start step reuse the compiled sampler; image i
    depends only on its own seed and init image, in any batch position."""
    path, _, _ = tiny_sd
    pipe = StableDiffusionPipeline.from_pretrained(path)
    rng = np.random.default_rng(7)
    arr = rng.random((2, 16, 16, 3), np.float32)
    kw = dict(num_inference_steps=4, output_type="latent", scheduler="dpmpp_2m", strength=0.5)
    a = pipe(["a cat", "a dog"], image=arr, seed=[3, 4], **kw)
    assert pipe.trace_count == 1
    b = pipe(["a dog", "a cat"], image=arr[::-1], seed=[4, 3], **kw)
    np.testing.assert_array_equal(a[0], b[1])
    assert np.isfinite(a).all() and not np.allclose(a[0], a[1])
    kw.update(strength=0.6, output_type="np")  # int(4 * 0.6) == int(4 * 0.5): the same start step
    out = pipe(["x"], image=rng.random((16, 16, 3), np.float32), num_images_per_prompt=2, guidance_scale=3.0, **kw)
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all() and not np.allclose(out[0], out[1])
    assert pipe.trace_count == 1
